import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl import train as T
from jaxtl.data import synthetic
from jaxtl.evaluate import evaluate
from jaxtl.model import CONV_NAMES, N_CONV
from jaxtl.predict import predict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("synthetic"), clips_per_class=10)


@pytest.fixture
def cfg(data_dir, tmp_path):
    return T.TrainConfig(data=str(data_dir), image_size=32, epochs=3, batch_size=8, weights="random",
                         normalize=True, out=str(tmp_path / "run"), cache_dir=str(data_dir.parent / "cache"),
                         workers=1, progress=False, patience=0)


def quiet(*_):
    pass


def _losses(run_dir):
    return [json.loads(line)["train_loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _leaves_changed(a, b):
    return jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)


@pytest.mark.parametrize("mode,k", [("frozen", 13), ("finetune", 10), ("finetune-1", 12), ("scratch", 0)])
def test_each_mode_trains_exactly_its_set(cfg, mode, k):
    cfg = dataclasses.replace(cfg, mode=mode.split("-")[0], finetune_convs=1 if mode.endswith("-1") else 3,
                              lr=1e-2, base_lr=1e-2, weights=None if mode == "scratch" else "random")
    assert cfg.stages()[0][0] == k
    model = cfg.model(3)
    params, norm = T.init_params(model, cfg, (1, 32, 32, 3), None)
    labels = T.param_labels(params, k)
    tx = T.make_optimizer(cfg, labels, cfg.base_lr)
    state = T.create_train_state(params, norm, tx)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
    for cached in (False, True):
        inp = x if not cached else model.apply({"params": params}, x, k, method=T.Classifier.prefix)
        batch = {"x": inp, "y": jnp.array([0, 1, 2, 0]), "mask": jnp.ones(4)}
        step = jax.jit(lambda s, b: T.train_step(s, b, jax.random.PRNGKey(1), model=model, cfg=cfg, tx=tx,
                                                 labels=labels, k=k, cached=cached))
        new, _ = step(state, batch)
        changed = _leaves_changed(state.params, new.params)
        for i, name in enumerate(CONV_NAMES):
            want = i >= k
            assert changed["base"][name]["kernel"] == want, (mode, name, cached)
            if not want:  # frozen: bit-identical, the very same values
                np.testing.assert_array_equal(new.params["base"][name]["kernel"], params["base"][name]["kernel"])
        assert all(jax.tree.leaves(changed["head"]))


def test_frozen_params_bit_identical_after_a_run(cfg):
    T.run(cfg, log=quiet)
    run = T.restore_run(cfg.out, "latest")
    init, _ = T.init_params(cfg.model(4), cfg, (1, 32, 32, 3), None)
    for name in CONV_NAMES:
        np.testing.assert_array_equal(run.variables["params"]["base"][name]["kernel"],
                                      init["base"][name]["kernel"])
    assert any(jax.tree.leaves(_leaves_changed(init["head"], run.variables["params"]["head"])))


def test_cached_prefix_and_in_step_prefix_agree(cfg, tmp_path):
    T.run(dataclasses.replace(cfg, mode="finetune", out=str(tmp_path / "a")), log=quiet)
    T.run(dataclasses.replace(cfg, mode="finetune", cache_prefix=False, out=str(tmp_path / "b")), log=quiet)
    np.testing.assert_allclose(_losses(tmp_path / "a"), _losses(tmp_path / "b"), rtol=1e-4)


def test_progressive_runs_both_stages_and_keeps_counting_steps(cfg):
    cfg = dataclasses.replace(cfg, mode="progressive", epochs=2, finetune_epochs=2)
    T.run(cfg, log=quiet)
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[-1]["step"] == 4 * rows[0]["step"]


def test_normalisation_statistics_come_from_the_training_split(cfg):
    prep = T.prepare(cfg, log=quiet)
    model = cfg.model(len(prep.classes))
    params, _ = T.init_params(model, cfg, (1, 32, 32, 3), None)
    mesh = T.make_mesh()
    acts = T.compute_prefix(model, params, prep, cfg, N_CONV, mesh, "x")
    norm = T._fit_norm(model, params, T.Inputs(prep, cfg, acts), prep, cfg, N_CONV, True, mesh)
    flat = acts["taps"]
    np.testing.assert_allclose(norm["head"]["mean"], flat[prep.train].mean(0), rtol=1e-5, atol=1e-7)
    assert not np.allclose(norm["head"]["mean"], flat.mean(0))  # not fitted on val or test
    T.run(cfg, log=quiet)
    restored = T.restore_run(cfg.out)
    np.testing.assert_allclose(restored.variables["norm"]["head"]["mean"], flat[prep.train].mean(0), rtol=1e-5,
                               atol=1e-7)


def test_evaluate_and_predict_match_the_in_memory_model(cfg):
    summary = T.run(cfg, log=quiet)
    result = evaluate(cfg.out)
    assert result["n"] == summary["n_test"]
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"])
    prep = T.prepare(cfg, log=quiet)
    files = [prep.paths[i] for i in prep.test]
    top1 = [r["top"][0]["label"] for r in predict(cfg.out, files)]
    assert top1 == [result["classes"][p] for p in result["predictions"]]
    assert Path(cfg.out, "confusion_matrix.png").stat().st_size > 0


def test_run_writes_what_users_read(cfg):
    T.run(cfg, log=quiet)
    out = Path(cfg.out)
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and 0 <= summary["test_accuracy"] <= 1
    assert T.TrainConfig(**json.loads((out / "config.json").read_text())) == cfg


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from jaxtl import train as T
    cfg = T.TrainConfig(**json.loads(sys.argv[1]))
    def die(stage, epoch):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    T.run(cfg, log=lambda *_: None, on_epoch_end=die)
""")


def _whole_run_then_killed_run(cfg, tmp_path, script):
    """An uninterrupted run into tmp_path/whole, then the same config run by `script`, which SIGKILLs itself."""
    T.run(dataclasses.replace(cfg, out=str(tmp_path / "whole")), log=quiet)
    killed = subprocess.run([sys.executable, "-c", script, json.dumps(dataclasses.asdict(cfg))],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def test_resume_after_sigkill_continues_with_the_same_losses(cfg, tmp_path):
    cfg = dataclasses.replace(cfg, epochs=4, dropout=0.3)
    _whole_run_then_killed_run(cfg, tmp_path, KILL_SCRIPT)
    assert len(_losses(cfg.out)) == 2
    T.run(dataclasses.replace(cfg, resume=True), log=quiet)
    np.testing.assert_allclose(_losses(cfg.out), _losses(tmp_path / "whole"), rtol=1e-5)


def test_four_devices_match_one(cfg, tmp_path):
    T.run(cfg, log=quiet)
    four = dataclasses.replace(cfg, out=str(tmp_path / "four"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    script = ("import json,sys,jax; from jaxtl import train as T; assert len(jax.devices()) == 4; "
              "T.run(T.TrainConfig(**json.loads(sys.argv[1])), log=lambda *_: None)")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(dataclasses.asdict(four))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(_losses(four.out), _losses(cfg.out), rtol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--image-size", "16"], "--image-size must be at least 32"),
    (["--mode", "scratch", "--weights", "x.h5"], "--mode scratch trains from random init"),
    (["--test-size", "1.5"], "--test-size must be between 0 and 1"),
])
def test_bad_flags_give_one_line_errors(argv, message, capsys, tmp_path):
    assert T.main(argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_unknown_choice_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        T.main(["--mode", "sideways"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_resume_without_a_run_and_rerun_into_a_used_directory(cfg, capsys, tmp_path):
    assert T.main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "holds no run" in capsys.readouterr().err
    T.run(dataclasses.replace(cfg, epochs=1), log=quiet)
    with pytest.raises(T.ConfigError, match="already holds a run"):
        T.run(cfg, log=quiet)


def test_help_documents_every_setting():
    text = " ".join(T.build_parser().format_help().split())
    for f in dataclasses.fields(T.TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "seed recipe: 10)" in text and "(default: 32)" in text and "(default: 0.001)" in text


SEED_SETTINGS = {  # the Keras recipe as written
    "representation": "mfcc", "sample_rate": 22050, "n_mfcc": 13, "n_fft": 2048, "hop_length": 512, "n_mels": 128,
    "image_size": 224, "fit": "pad", "preprocess": "unit", "mode": "frozen", "taps": "5", "pooling": "flatten",
    "hidden": 256, "dropout": 0.0, "normalize": False, "epochs": 10, "batch_size": 32, "lr": 1e-3,
    "base_lr": 1e-5, "val_size": 0.2, "test_size": 0.2, "split": "stratified", "seed": 42, "patience": 3,
    "plateau_patience": 2, "plateau_factor": 0.5, "finetune_convs": 3, "weight_decay": 0.0,
}


def test_recipe_seed_reproduces_the_seed_settings(tmp_path):
    cfg = T.config_from_args(["--recipe", "seed"])
    assert cfg.recipe == "seed"
    assert {k: getattr(cfg, k) for k in SEED_SETTINGS} == SEED_SETTINGS
    assert T.config_from_args(["--recipe", "seed", "--epochs", "3"]).epochs == 3


def test_default_recipe_is_jaxtl_and_flags_override_it():
    cfg = T.config_from_args([])
    assert cfg.recipe == "jaxtl" and cfg.normalize and cfg.taps == "3,4,5"
    assert {k: getattr(cfg, k) for k in T.RECIPES["jaxtl"]} == T.RECIPES["jaxtl"]
    assert T.config_from_args(["--no-normalize", "--taps", "5"]).normalize is False


def test_resume_takes_the_saved_config_and_only_the_flags_given(cfg, tmp_path):
    Path(cfg.out).mkdir(parents=True)
    Path(cfg.out, "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    resumed = T.config_from_args(["--resume", "--out", cfg.out, "--epochs", "7"])
    assert resumed == dataclasses.replace(cfg, resume=True, epochs=7)


KILL_MID_SAVE = textwrap.dedent("""
    import json, os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    from jaxtl import train as T
    cfg = T.TrainConfig(**json.loads(sys.argv[1]))
    real, calls = atomicity.AtomicRenameTemporaryPath.finalize, []
    async def finalize(self, *a, **k):
        if self.get_final().parent.name == "latest":
            calls.append(1)
        if len(calls) == 2:  # epoch 2's save to `latest`: data written, not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)
        return await real(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    T.run(cfg, log=lambda *_: None)
""")


def test_sigkill_mid_checkpoint_save_resumes_from_the_previous_one(cfg, tmp_path):
    cfg = dataclasses.replace(cfg, epochs=3, patience=0)
    _whole_run_then_killed_run(cfg, tmp_path, KILL_MID_SAVE)
    ckpt = T.Checkpoints(Path(cfg.out) / "checkpoints")
    first_step = ckpt.steps()[0]
    assert ckpt.steps() == [first_step]  # the half-written save does not count
    T.run(dataclasses.replace(cfg, resume=True), log=quiet)
    np.testing.assert_allclose(_losses(cfg.out), _losses(tmp_path / "whole"), rtol=1e-5)
    whole, resumed = T.restore_run(tmp_path / "whole", "latest"), T.restore_run(cfg.out, "latest")
    assert whole.meta["epoch"] == resumed.meta["epoch"] == 2
    for a, b in zip(jax.tree.leaves(whole.variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(cfg, capsys):
    T.run(dataclasses.replace(cfg, epochs=1), log=quiet)
    steps_before = T.Checkpoints(Path(cfg.out) / "checkpoints").steps()
    bad = ["--out", cfg.out, "--resume", "--epochs", "3"]
    saved = json.loads(Path(cfg.out, "config.json").read_text())
    Path(cfg.out, "config.json").write_text(json.dumps({**saved, "lr": 1e30}))
    assert T.main(bad + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "training diverged: non-finite loss at step" in err and "\n" not in err.strip()
    assert T.Checkpoints(Path(cfg.out) / "checkpoints").steps() == steps_before


TWO_PROCESSES = textwrap.dedent("""
    import json, sys
    from jaxtl import train as T
    sys.exit(T.main(json.loads(sys.argv[1])))
""")


def test_two_processes_follow_the_one_process_trajectory(cfg, tmp_path):
    import socket

    T.run(cfg, log=quiet)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "two")
    base = ["--recipe", "seed", "--data", cfg.data, "--image-size", "32", "--epochs", "3", "--batch-size", "8",
            "--weights", "random", "--normalize", "--out", out, "--cache-dir", cfg.cache_dir, "--workers", "1",
            "--no-progress", "--patience", "0", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, json.dumps(base + ["--process-id", str(i)])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 device(s), 2 process(es)" in outputs[0]
    np.testing.assert_allclose(_losses(out), _losses(cfg.out), rtol=1e-4)
    assert T.restore_run(out, "latest").meta["epoch"] == 2


def test_augmentation_copies_extend_only_the_training_split(cfg):
    plain = T.prepare(cfg, log=quiet)
    aug = T.prepare(dataclasses.replace(cfg, augment_copies=2), log=quiet)
    n = len(plain.y)
    assert len(aug.y) == n + 2 * len(plain.train)
    np.testing.assert_array_equal(aug.val, plain.val)
    np.testing.assert_array_equal(aug.test, plain.test)
    assert set(aug.train[len(plain.train):]) == set(range(n, len(aug.y)))
    assert len(set(aug.keys)) == len(aug.keys)  # every copy has its own identity
    first_copy = n
    source = plain.train[0]
    assert aug.paths[first_copy] == plain.paths[source] and aug.y[first_copy] == plain.y[source]
    assert not np.array_equal(aug.feats.clip(first_copy), plain.feats.clip(source))


def test_prefix_cache_computes_only_clips_it_has_not_seen(cfg, monkeypatch):
    calls = []
    real = T.compute_prefix

    def counting(*args, **kw):
        out = real(*args, **kw)
        calls.append(len(next(iter(out.values()))))
        return out

    monkeypatch.setattr(T, "compute_prefix", counting)
    small = dataclasses.replace(cfg, max_clips=20, epochs=1, out=cfg.out + "-small", cache_dir=cfg.out + "-cache")
    T.run(small, log=quiet)
    T.run(dataclasses.replace(small, max_clips=None, out=cfg.out + "-all"), log=quiet)
    T.run(dataclasses.replace(small, max_clips=None, out=cfg.out + "-again"), log=quiet)
    assert calls == [20, 40 - 20]  # the third run computed nothing


def test_bad_files_stop_the_run_or_are_skipped_and_reported(cfg, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cfg.data, data)
    broken = data / "tone" / "broken.wav"
    broken.write_text("not audio")
    bad = dataclasses.replace(cfg, data=str(data), epochs=1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(T.DataError, match=r"broken\.wav: not a readable audio file"):
        T.run(bad, log=quiet)
    summary = T.run(dataclasses.replace(bad, on_bad_file="skip", out=str(tmp_path / "skip")), log=quiet)
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 40
    assert "broken.wav" in (tmp_path / "skip" / "skipped.tsv").read_text()
    assert any("broken.wav" in s for s in summary["skipped_files"])


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state(cfg):
    T.run(dataclasses.replace(cfg, dtype="bfloat16", mode="finetune", epochs=1), log=quiet)
    ckpt = T.Checkpoints(Path(cfg.out) / "checkpoints")
    model = cfg.model(4)
    params, norm = T.init_params(model, cfg, (1, 32, 32, 3), None)
    labels = T.param_labels(params, 10)
    template = T.create_train_state(params, norm, T.make_optimizer(cfg, labels, cfg.base_lr))
    state, _ = T.restore_state(ckpt, template, 10)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim} == {jnp.dtype("float32")}


def test_frozen_convs_are_written_once_per_run_not_by_every_epoch(cfg):
    T.run(dataclasses.replace(cfg, epochs=2), log=quiet)
    root = Path(cfg.out) / "checkpoints"

    def size(d: Path) -> int:
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())

    frozen_bytes = 4 * sum(leaf.size for leaf in jax.tree.leaves(T.restore_run(cfg.out).variables["params"]["base"]))
    assert size(root / "frozen") > frozen_bytes / 2
    steps = list((root / "latest").iterdir())
    assert len(steps) == 2 and all(size(step) < frozen_bytes / 20 for step in steps)
    assert set(T.restore_run(cfg.out, "latest").variables["params"]["base"]) == set(T.CONV_NAMES)


@pytest.mark.parametrize("n,largest,multiple", [(100, 64, 1), (60, 64, 1), (64, 64, 1), (65, 64, 1), (1, 64, 2),
                                                (129, 64, 8), (7, 8, 4)])
def test_even_batch_size_covers_the_rows_in_fewest_batches_with_least_padding(n, largest, multiple):
    size = T.even_batch_size(n, largest, multiple)
    fewest = -(-n // largest)
    assert size % multiple == 0 and -(-n // size) == fewest
    assert size * fewest - n < fewest * multiple  # padding under one multiple per batch


def test_without_out_each_run_gets_its_own_directory_and_resume_asks_for_one(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    T.run(dataclasses.replace(cfg, out=None, epochs=1), log=quiet)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("seed-") and json.loads((run_dir / "config.json").read_text())["out"] == \
        f"runs/{run_dir.name}"
    with pytest.raises(T.ConfigError, match="--resume needs --out"):
        T.config_from_args(["--resume"])
