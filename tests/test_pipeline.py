import dataclasses

import numpy as np
import pytest

from conftest import quiet
from jaxtl.pipeline import batches, even_batch_size, prepare


def test_augmentation_copies_extend_only_the_training_split(cfg):
    plain = prepare(cfg.data_spec(), log=quiet)
    aug = prepare(dataclasses.replace(cfg, augment_copies=2).data_spec(), log=quiet)
    n = len(plain.y)
    assert len(aug.y) == n + 2 * len(plain.train) and aug.n_files == plain.n_files == n
    np.testing.assert_array_equal(aug.val, plain.val)
    np.testing.assert_array_equal(aug.test, plain.test)
    assert set(aug.train[len(plain.train):]) == set(range(n, len(aug.y)))
    assert len(set(aug.keys)) == len(aug.keys)  # every copy has its own identity
    first_copy = n
    source = plain.train[0]
    assert aug.paths[first_copy] == plain.paths[source] and aug.y[first_copy] == plain.y[source]
    assert not np.array_equal(aug.feats.clip(first_copy), plain.feats.clip(source))


def test_vtlp_copies_warp_the_mel_axis_of_the_pitch_tempo_copies(cfg):
    base = dataclasses.replace(cfg, representation="logmel", augment_copies=1, time_stretch=0.0, pitch_shift=0.0)
    plain = prepare(base.data_spec(), log=quiet)
    warped = prepare(dataclasses.replace(base, vtlp=0.2).data_spec(), log=quiet)
    copy, source = plain.n_files, plain.train[0]
    assert warped.keys[copy] != plain.keys[copy]  # the warp is part of a copy's identity (and cache key)
    np.testing.assert_allclose(plain.feats.clip(copy), plain.feats.clip(source), atol=1e-4)  # no warp: the clip
    assert not np.allclose(warped.feats.clip(copy), plain.feats.clip(source), atol=1e-2)


def test_batches_cover_every_clip_once_and_mask_the_padding():
    seen = []
    for idx, mask in batches(45, 16, 4, np.random.default_rng(0)):
        assert len(idx) == 16 and len(mask) == 16
        seen += list(idx[mask > 0])
    assert sorted(seen) == list(range(45))


def test_batch_size_rounds_up_to_the_device_count():
    idx, mask = next(batches(10, 6, 4, None))
    assert len(idx) == 8 and mask.sum() == 8


@pytest.mark.parametrize("n,largest,multiple", [(100, 64, 1), (60, 64, 1), (64, 64, 1), (65, 64, 1), (1, 64, 2),
                                                (129, 64, 8), (7, 8, 4)])
def test_even_batch_size_covers_the_rows_in_fewest_batches_with_least_padding(n, largest, multiple):
    size = even_batch_size(n, largest, multiple)
    fewest = -(-n // largest)
    assert size % multiple == 0 and -(-n // size) == fewest
    assert size * fewest - n < fewest * multiple  # padding under one multiple per batch
