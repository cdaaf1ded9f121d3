import numpy as np
import pytest

from jaxtl.sharding import global_batch, make_mesh, prefetch


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


def test_a_prefetch_left_early_stops_its_thread():
    import threading
    import time

    before = threading.active_count()
    for _ in prefetch(iter(range(100)), size=1):  # a stop request after the first batch
        break
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before  # not blocked on a full queue for the rest of the process
