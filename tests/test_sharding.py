import numpy as np
import pytest

from jaxtl.sharding import global_batch, make_mesh, prefetch
from jaxtl.train import batches


def test_batches_cover_every_clip_once_and_mask_the_padding():
    seen = []
    for idx, mask in batches(45, 16, 4, np.random.default_rng(0)):
        assert len(idx) == 16 and len(mask) == 16
        seen += list(idx[mask > 0])
    assert sorted(seen) == list(range(45))


def test_batch_size_rounds_up_to_the_device_count():
    idx, mask = next(batches(10, 6, 4, None))
    assert len(idx) == 8 and mask.sum() == 8


def test_global_batch_is_sharded_along_data():
    mesh = make_mesh()
    b = global_batch(mesh, {"x": np.arange(8.0).reshape(8, 1)})
    np.testing.assert_array_equal(np.asarray(b["x"]), np.arange(8.0).reshape(8, 1))
    assert b["x"].sharding.spec[0] == "data"


def test_prefetch_keeps_order_and_surfaces_errors():
    assert list(prefetch(iter(range(10)))) == list(range(10))

    def broken():
        yield 1
        raise ValueError("producer failed")

    with pytest.raises(ValueError, match="producer failed"):
        list(prefetch(broken()))
