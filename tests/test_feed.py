import numpy as np
import pytest

from jaxtl.feed import epoch_plan, even_batch_size


def test_one_device_follows_the_global_permutation_in_masked_batches():
    clips = np.arange(100, 145)
    idx, mask = epoch_plan(clips, np.zeros(200, int), 1, 16, np.random.default_rng(0))
    order = clips[np.random.default_rng(0).permutation(45)]  # the plain reference: one permutation, cut in 16s
    assert idx.shape == mask.shape == (3, 16)
    np.testing.assert_array_equal(idx[mask > 0], order)
    assert mask[:2].all() and mask[2].sum() == 45 - 32
    assert set(idx[2][mask[2] == 0]) == {order[32]}  # padding repeats a row of its batch, masked


@pytest.mark.parametrize("positions", [2, 3, 4])
def test_every_epoch_covers_each_clip_once_each_device_taking_only_its_own(positions):
    clips = np.arange(50)
    owner = clips % positions
    per_device = -(-10 // positions)
    for epoch in range(3):
        idx, mask = epoch_plan(clips, owner, positions, 10, np.random.default_rng([0, epoch]))
        assert sorted(idx[mask > 0]) == list(clips)  # the same clips as one process, each once
        by_device = idx.reshape(len(idx), positions, per_device)
        for d in range(positions):
            assert (owner[by_device[:, d]] == d).all()  # padding included: a device reads only what it holds
    first, _ = epoch_plan(clips, owner, positions, 10, np.random.default_rng([0, 0]))
    second, _ = epoch_plan(clips, owner, positions, 10, np.random.default_rng([0, 1]))
    assert not np.array_equal(first, second)  # a new order every epoch


@pytest.mark.parametrize("n,largest,multiple", [(100, 64, 1), (60, 64, 1), (64, 64, 1), (65, 64, 1), (1, 64, 2),
                                                (129, 64, 8), (7, 8, 4)])
def test_even_batch_size_covers_the_rows_in_fewest_batches_with_least_padding(n, largest, multiple):
    size = even_batch_size(n, largest, multiple)
    fewest = -(-n // largest)
    assert size % multiple == 0 and -(-n // size) == fewest
    assert size * fewest - n < fewest * multiple  # padding under one multiple per batch
