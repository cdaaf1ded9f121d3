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

from conftest import write_tone
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


def test_frozen_base_after_a_run_equals_the_weights_file(cfg, tmp_path):
    from jaxtl.model import VGG16Base
    from jaxtl.weights import load_vgg16_weights, save_npz

    file = tmp_path / "vgg.npz"
    save_npz(VGG16Base().init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3))), file)
    T.run(dataclasses.replace(cfg, weights=str(file)), log=quiet)
    trained = T.restore_run(cfg.out, "latest").variables["params"]
    for name, want in load_vgg16_weights(file)["params"].items():
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(trained["base"][name][leaf], want[leaf])
    assert _losses(cfg.out)[0] != _losses(cfg.out)[-1]  # and the head did train


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


@pytest.mark.parametrize("recipe", ["seed", "jaxtl"])
def test_train_evaluate_predict_at_64_pixels(cfg, recipe):
    """Restore builds the model at the run's own image size (a flatten head's shape depends on it)."""
    cfg = T.TrainConfig.from_recipe(recipe, data=cfg.data, image_size=64, epochs=2, batch_size=8, weights="random",
                                    out=cfg.out, cache_dir=cfg.cache_dir, workers=1, progress=False)
    summary = T.run(cfg, log=quiet)
    result = evaluate(cfg.out)
    assert result["n"] == summary["n_test"]
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"])
    record = json.loads(Path(cfg.out, "split.json").read_text())
    files = [c["path"] for c in record["clips"] if c["side"] == "test"]
    top1 = [r["top"][0]["label"] for r in predict(cfg.out, files)]
    assert top1 == [result["classes"][p] for p in result["predictions"]]
    assert Path(cfg.out, "confusion_matrix.png").stat().st_size > 0


def test_run_writes_what_users_read(cfg):
    T.run(cfg, log=quiet)
    out = Path(cfg.out)
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "split.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and 0 <= summary["test_accuracy"] <= 1
    assert T.TrainConfig(**json.loads((out / "config.json").read_text())) == cfg
    rows = _rows(out)  # compile time is reported apart from the epochs' seconds, and paid once
    assert rows[0]["compile_seconds"] > 0 and [r["compile_seconds"] for r in rows[1:]] == [0.0, 0.0]
    assert summary["compile_seconds"] == pytest.approx(sum(r["compile_seconds"] for r in rows))


def test_evaluate_uses_the_recorded_test_set_and_names_missing_classes(cfg, tmp_path, capsys):
    import shutil

    from jaxtl.evaluate import main as evaluate_main

    data = tmp_path / "data"
    shutil.copytree(cfg.data, data)
    summary = T.run(dataclasses.replace(cfg, data=str(data)), log=quiet)
    write_tone(data / "tone" / "new.wav", seconds=0.6, sr=16000)  # the folder grows after training
    result = evaluate(cfg.out)
    assert (result["n"], result["accuracy"]) == (summary["n_test"], pytest.approx(summary["test_accuracy"]))
    shutil.rmtree(data / "noise")
    partial = evaluate(cfg.out, data=str(data))
    assert partial["missing_classes"] == ["noise"] and sorted(partial["per_class"]) == ["chirp", "clicks", "tone"]
    assert evaluate_main([cfg.out, "--data", str(data)]) == 0
    assert "the data holds no clip of 1 of the run's classes: noise" in capsys.readouterr().out
    assert evaluate_main([cfg.out]) == 2  # a recorded test clip is gone: said in one line, not re-split
    err = capsys.readouterr().err.strip()
    assert "a test clip of" in err and "is missing" in err and "\n" not in err


def test_a_config_from_another_version_is_one_line(cfg, capsys):
    from jaxtl.evaluate import main as evaluate_main

    Path(cfg.out).mkdir(parents=True)
    Path(cfg.out, "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "warp_factor": 9}))
    assert T.main(["--resume", "--out", cfg.out]) == 2
    assert evaluate_main([cfg.out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("another jaxtl version (settings warp_factor are unknown" in e for e in err)


KILL = textwrap.dedent("""
    import json, os, signal, sys
    import orbax.checkpoint as ocp
    from jaxtl import train as T
    cfg, how, n = T.TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if how == "step":  # before the n-th train step: between two steps of an epoch
        real_init, calls = T.Steps.__init__, []
        def init(self, *a, **k):
            real_init(self, *a, **k)
            train = self.train
            def counted(*a, **k):
                calls.append(1)
                if len(calls) == n:
                    die()
                return train(*a, **k)
            self.train = counted
        T.Steps.__init__ = init
    elif how == "between-saves":  # after the first of the two saves (best, latest) of the n-th epoch
        real_save, saves = ocp.CheckpointManager.save, {}
        def save(self, step, *a, **k):
            saves[step] = saves.get(step, 0) + 1
            if saves[step] == 2 and len(saves) == n:
                die()
            return real_save(self, step, *a, **k)
        ocp.CheckpointManager.save = save
    elif how == "mid-save":  # inside the n-th save to `latest`: data written, not yet renamed into place
        from orbax.checkpoint._src.path import atomicity
        real, calls = atomicity.AtomicRenameTemporaryPath.finalize, []
        async def finalize(self, *a, **k):
            if self.get_final().parent.name == "latest":
                calls.append(1)
            if len(calls) == n:
                die()
            return await real(self, *a, **k)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    T.run(cfg, log=lambda *_: None)
""")


def _killed_run(cfg, how: str, n: int) -> None:
    """`cfg` run in a subprocess that SIGKILLs itself as `how` and `n` say (see KILL)."""
    killed = subprocess.run([sys.executable, "-c", KILL, json.dumps(dataclasses.asdict(cfg)), how, str(n)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(data_dir, tmp_path_factory):
    """A 4-epoch fine-tuning run (steps fed from the host, dropout on: every rng in play), run uninterrupted:
    the reference of every interrupted-then-resumed run below."""
    root = tmp_path_factory.mktemp("resume")
    cfg = T.TrainConfig(data=str(data_dir), image_size=32, epochs=4, batch_size=8, weights="random", normalize=True,
                        mode="finetune", dropout=0.3, lr=3e-4, patience=0, out=str(root / "whole"),
                        cache_dir=str(root / "cache"), workers=1, progress=False)
    T.run(cfg, log=quiet)
    return cfg


def test_sigkill_between_two_steps_then_resume_gives_the_uninterrupted_run(whole, tmp_path):
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"))
    per_epoch = _rows(whole.out)[0]["step"]
    assert per_epoch >= 3
    _killed_run(cfg, "step", per_epoch + 2)  # epoch 2, after its first step
    assert len(_losses(cfg.out)) == 1
    logs = []
    T.run(dataclasses.replace(cfg, resume=True), log=logs.append)
    assert any(f"after stage 1 epoch 1 (step {per_epoch})" in line for line in logs), logs
    np.testing.assert_allclose(_losses(cfg.out), _losses(whole.out), rtol=1e-5)


@pytest.mark.parametrize("part", ["state", "meta"])
def test_resume_after_a_corrupt_newest_checkpoint_continues_from_the_one_before(whole, tmp_path, part):
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"), epochs=2)
    T.run(cfg, log=quiet)
    latest = Path(cfg.out) / "checkpoints" / "latest"
    newest = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    for f in (latest / str(newest) / part).rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupt")
    logs = []
    T.run(dataclasses.replace(cfg, epochs=4, resume=True), log=logs.append)
    assert any("after stage 1 epoch 1 " in line for line in logs), logs  # epoch 2's save was the corrupt one
    np.testing.assert_allclose(_losses(cfg.out), _losses(whole.out), rtol=1e-5)


def test_kill_between_saving_best_and_latest_keeps_the_best_model(whole, tmp_path):
    best, last_improved = float("inf"), None
    for epoch, row in enumerate(_rows(whole.out)):
        if row["val_loss"] < best - 1e-7:
            best, last_improved = row["val_loss"], epoch
    assert last_improved and last_improved >= 1, "the reference run must improve after its first epoch"
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"))
    _killed_run(cfg, "between-saves", last_improved + 1)
    T.run(dataclasses.replace(cfg, resume=True), log=quiet)
    np.testing.assert_allclose(_losses(cfg.out), _losses(whole.out), rtol=1e-5)
    want, got = T.restore_run(whole.out, "best"), T.restore_run(cfg.out, "best")
    assert got.meta["epoch"] == want.meta["epoch"] == last_improved
    for a, b in zip(jax.tree.leaves(want.variables), jax.tree.leaves(got.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sigkill_mid_checkpoint_save_resumes_from_the_previous_one(whole, tmp_path):
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"))
    _killed_run(cfg, "mid-save", 2)
    first_step = T.Checkpoints(Path(cfg.out) / "checkpoints").steps()
    assert len(first_step) == 1  # the half-written save does not count
    T.run(dataclasses.replace(cfg, resume=True), log=quiet)
    np.testing.assert_allclose(_losses(cfg.out), _losses(whole.out), rtol=1e-5)
    want, got = T.restore_run(whole.out, "latest"), T.restore_run(cfg.out, "latest")
    assert want.meta["epoch"] == got.meta["epoch"] == 3
    for a, b in zip(jax.tree.leaves(want.variables), jax.tree.leaves(got.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The run every multi-device and multi-process run below must follow, in one process on one device."""
    root = tmp_path_factory.mktemp("one")
    cfg = T.TrainConfig(data=str(data_dir), image_size=32, epochs=3, batch_size=8, weights="random", normalize=True,
                        out=str(root / "run"), cache_dir=str(root / "cache"), workers=1, progress=False, patience=0)
    T.run(cfg, log=quiet)
    return cfg


FOUR_DEVICES = textwrap.dedent("""
    import json, sys, jax, numpy as np
    from jaxtl import train as T
    from jaxtl.sharding import global_batch, make_mesh
    assert len(jax.devices()) == 4
    batch = global_batch(make_mesh(), {"x": np.arange(16.0).reshape(8, 2)})["x"]
    rows = sorted((s.device.id, np.asarray(s.data)[:, 0].tolist()) for s in batch.addressable_shards)
    assert [r for _, r in rows] == [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0], [12.0, 14.0]], rows
    T.run(T.TrainConfig(**json.loads(sys.argv[1])), log=lambda *_: None)
""")


def test_four_devices_follow_one_and_each_holds_a_quarter_of_a_batch(one_process, tmp_path):
    four = dataclasses.replace(one_process, out=str(tmp_path / "four"), cache_dir=str(tmp_path / "fresh-cache"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, json.dumps(dataclasses.asdict(four))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(_losses(four.out), _losses(one_process.out), rtol=1e-4)
    assert len(list(Path(four.cache_dir).glob("prefix-*.h5"))) == 1  # its own prefix pass ran, on 4 devices


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


def test_resume_without_a_run_or_a_checkpoint_and_rerun_into_a_used_directory(cfg, capsys, tmp_path):
    assert T.main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "holds no run" in capsys.readouterr().err
    Path(cfg.out).mkdir(parents=True)
    Path(cfg.out, "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))  # killed before its first save
    logs = []
    T.run(dataclasses.replace(cfg, epochs=1, resume=True), log=logs.append)
    assert any("had saved no checkpoint yet; starting over" in line for line in logs)
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


def _two_processes(argv: list[str], per_process: list[list[str]]) -> list[subprocess.Popen]:
    """`python -m jaxtl.train ARGV` as processes 0 and 1 of one run on 127.0.0.1 (finished, output read)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = argv + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, json.dumps(argv + ["--process-id", str(i)]
                                                                               + per_process[i])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        for p in procs:
            p.output = p.communicate(timeout=300)[0]
    finally:
        for p in procs:
            p.kill()
    return procs


def test_two_processes_with_fresh_caches_follow_the_one_process_run(one_process, tmp_path):
    out, cache = str(tmp_path / "two"), tmp_path / "fresh-cache"
    c = one_process
    argv = ["--recipe", "seed", "--data", c.data, "--image-size", "32", "--epochs", "3", "--batch-size", "8",
            "--weights", "random", "--normalize", "--out", out, "--cache-dir", str(cache), "--workers", "1",
            "--no-progress", "--patience", "0"]
    procs = _two_processes(argv, [[], []])
    assert all(p.returncode == 0 for p in procs), procs[0].output[-3000:] + procs[1].output[-3000:]
    assert "2 device(s), 2 process(es)" in procs[0].output
    assert "(0 from cache, 40 computed)" in procs[0].output  # process 0 extracted, the other read its cache
    assert len(list(cache.glob("prefix-*.h5"))) == 1  # the prefix pass ran split over both processes
    np.testing.assert_allclose(_losses(out), _losses(c.out), rtol=1e-4)
    assert T.restore_run(out, "latest").meta["epoch"] == 2


def test_two_processes_with_different_weights_stop_naming_them(one_process, tmp_path):
    from jaxtl.model import VGG16Base
    from jaxtl.weights import save_npz

    file = tmp_path / "vgg.npz"
    save_npz(VGG16Base().init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3))), file)
    argv = ["--data", one_process.data, "--image-size", "32", "--out", str(tmp_path / "two"), "--cache-dir",
            str(tmp_path / "cache"), "--workers", "1", "--no-progress"]
    procs = _two_processes(argv, [["--weights", "random"], ["--weights", str(file)]])
    assert [p.returncode for p in procs] == [2, 2], procs[0].output[-3000:]
    assert "the processes hold different weights (processes [0] vs [1])" in procs[0].output


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


def test_bad_files_stop_the_run_or_are_skipped_and_reported(cfg, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cfg.data, data)
    (data / "tone" / "broken.wav").write_text("not audio")
    (data / "tone" / "cut.wav").write_bytes((data / "tone" / "tone_000.wav").read_bytes()[:60])  # 8 of its samples
    write_tone(data / "tone" / "one.wav", seconds=1 / 8000)  # a single sample
    bad = dataclasses.replace(cfg, data=str(data), epochs=1, cache_dir=str(tmp_path / "cache"))
    argv = ["--recipe", "seed", "--data", str(data), "--image-size", "32", "--epochs", "1", "--weights", "random",
            "--cache-dir", bad.cache_dir, "--workers", "1", "--no-progress", "--out", str(tmp_path / "error")]
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "wav: " in err and "use --on-bad-file skip" in err
    summary = T.run(dataclasses.replace(bad, on_bad_file="skip", out=str(tmp_path / "skip")), log=quiet)
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 40
    skipped = (tmp_path / "skip" / "skipped.tsv").read_text()
    assert "broken.wav\tnot a readable audio file" in skipped
    assert "cut.wav\ttruncated: its header declares" in skipped
    assert "one.wav\ttoo short: 3 samples at 22050 Hz" in skipped  # one sample at 8 kHz, resampled


def test_bfloat16_convolutions_run_in_bfloat16_and_saves_stay_float32(cfg):
    import orbax.checkpoint as ocp

    cfg = dataclasses.replace(cfg, dtype="bfloat16", mode="finetune", epochs=1)
    model = cfg.model(4)
    params, norm = T.init_params(model, cfg, (1, 32, 32, 3), None)
    labels = T.param_labels(params, 10)
    tx = T.make_optimizer(cfg, labels, cfg.base_lr)
    x = model.apply({"params": params}, jnp.zeros((2, 32, 32, 3)), 10, method=T.Classifier.prefix)
    batch = {"x": x, "y": jnp.zeros(2, jnp.int32), "mask": jnp.ones(2)}
    step = jax.jit(lambda s, b: T.train_step(s, b, jax.random.PRNGKey(0), model=model, cfg=cfg, tx=tx,
                                             labels=labels, k=10, cached=True))
    hlo = step.lower(T.create_train_state(params, norm, tx), batch).as_text()
    convs = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
    assert len(convs) >= 3 and all("xbf16>" in line.split("->")[-1] for line in convs), convs[:2]
    T.run(cfg, log=quiet)
    (step_dir,) = (Path(cfg.out) / "checkpoints" / "latest").iterdir()
    with ocp.StandardCheckpointer() as c:
        saved = c.restore((step_dir / "state").absolute())  # no template: the dtypes as written
    assert {leaf.dtype for leaf in jax.tree.leaves(saved["params"])} == {np.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(saved["opt_state"]) if np.ndim(leaf)} == {np.dtype("float32")}


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
