import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl.checkpoint import CheckpointError, Checkpoints


def _state(value):
    params = {"frozen": jnp.full(3, value), "head": jnp.full(2, value)}
    labels = {"frozen": "frozen", "head": "head"}
    tx = optax.multi_transform({"frozen": optax.set_to_zero(), "head": optax.adam(1e-3)}, labels)
    opt_state = tx.init(params)
    grads = {"frozen": jnp.zeros(3), "head": jnp.full(2, value)}
    _, opt_state = tx.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(int(value))}


def test_masked_optimizer_state_round_trips(tmp_path):
    ckpt = Checkpoints(tmp_path / "c")
    state = _state(3.0)
    ckpt.save(3, state, {"epoch": 1, "classes": ["a", "b"]})
    restored, meta, step = ckpt.restore(_state(0.0))
    assert meta == {"epoch": 1, "classes": ["a", "b"]} and step == 3
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    adam = restored["opt_state"].inner_states["head"].inner_state[0]
    assert isinstance(adam.mu["frozen"], optax.MaskedNode)  # frozen params hold no optimizer state


def test_keeps_latest_n_and_the_best(tmp_path):
    ckpt = Checkpoints(tmp_path / "c", keep=2)
    for step, best in ((1, True), (2, False), (3, False)):
        save = (step, _state(float(step)), {"epoch": step})
        ckpt.save(*save, best=save if best else None)
    assert ckpt.steps() == [2, 3] and ckpt.steps("best") == [1]
    state, meta, _ = ckpt.restore(_state(0.0), "best")
    assert meta["epoch"] == 1 and float(state["params"]["head"][0]) == 1.0


def test_a_deferred_best_is_the_epoch_it_names_not_the_newest(tmp_path):
    ckpt = Checkpoints(tmp_path / "c")
    ckpt.save(5, _state(5.0), {"epoch": 5}, best=(3, _state(3.0), {"epoch": 3}))
    best, meta, step = ckpt.restore(_state(0.0), "best")
    assert (step, meta["epoch"], float(best["params"]["head"][0])) == (3, 3, 3.0)
    latest, meta, step = ckpt.restore(_state(0.0))
    assert (step, meta["epoch"], float(latest["params"]["head"][0])) == (5, 5, 5.0)


@pytest.mark.parametrize("part", ["state", "meta"])
def test_half_written_save_is_ignored_and_corrupt_one_falls_back(tmp_path, part, caplog):
    ckpt = Checkpoints(tmp_path / "c", keep=3)
    ckpt.save(1, _state(1.0), {"epoch": 1})
    ckpt.save(2, _state(2.0), {"epoch": 2})
    (tmp_path / "c" / "latest" / "3.orbax-checkpoint-tmp-123").mkdir()  # a save killed midway
    for f in (tmp_path / "c" / "latest" / "2" / part).rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupt")
    ckpt = Checkpoints(tmp_path / "c")
    state, meta, step = ckpt.restore(_state(0.0))
    assert step == 1 and meta["epoch"] == 1 and float(state["step"]) == 1  # state and meta of one save
    assert f"latest/2 is unreadable ({part})" in caplog.text
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []  # orbax's ERROR lines held back


def test_orbax_reports_on_damaged_save_metadata_reach_no_one(tmp_path, caplog):
    ckpt = Checkpoints(tmp_path / "c")
    ckpt.save(2, _state(2.0), {"epoch": 2})
    (tmp_path / "c" / "latest" / "2" / "_CHECKPOINT_METADATA").write_text("corrupt")  # orbax's own record only
    ckpt = Checkpoints(tmp_path / "c")
    assert ckpt.steps() == [2] and ckpt.restore(_state(0.0))[2] == 2  # the state and meta themselves are sound
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []


def test_meta_decides_the_template(tmp_path):
    ckpt = Checkpoints(tmp_path / "c")
    ckpt.save(5, _state(5.0), {"epoch": 5})
    seen = []
    ckpt.restore(lambda meta: seen.append(meta["epoch"]) or _state(0.0))
    assert seen == [5]


def test_a_shape_mismatch_is_named_not_taken_for_corruption(tmp_path):
    ckpt = Checkpoints(tmp_path / "c")
    ckpt.save(1, _state(1.0), {"epoch": 1})
    ckpt.save(2, _state(2.0), {"epoch": 2})
    other = _state(0.0)
    other["params"]["head"] = jnp.zeros(7)
    with pytest.raises(CheckpointError, match=r"params/head has shape \(2,\) in the checkpoint but \(7,\)"):
        ckpt.restore(other)


def test_a_param_on_one_side_only_is_named(tmp_path):
    ckpt = Checkpoints(tmp_path / "c")
    ckpt.save(1, _state(1.0), {"epoch": 1})
    other = _state(0.0)
    other["params"]["extra"] = jnp.zeros(3)
    with pytest.raises(CheckpointError, match="params/extra is only in the model the run's config builds"):
        ckpt.restore(other)


def test_best_is_written_before_latest(tmp_path, monkeypatch):
    ckpt = Checkpoints(tmp_path / "c")
    order = []
    for which in ("latest", "best"):
        manager = getattr(ckpt, which)
        real = manager.save
        monkeypatch.setattr(manager, "save", lambda *a, _real=real, _w=which, **k: order.append(_w) or _real(*a, **k))
    ckpt.save(1, _state(1.0), {"epoch": 1}, best=(1, _state(1.0), {"epoch": 1}))
    assert order == ["best", "latest"]  # `latest` is the commit point: a kill between leaves best ahead, not stale


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint saved yet"):
        Checkpoints(tmp_path / "c").restore(_state(0.0))
