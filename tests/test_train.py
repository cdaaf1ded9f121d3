"""Whole runs: what a run writes, stages, resume after every kind of interruption, several devices and
processes, bad input, and golden numbers that pin the trajectory of each mode."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from conftest import losses, metrics, overwrite, quiet, wait_until_ready, weights_file, write_tone
from jaxtl.backbones.vgg import VGG16
from jaxtl.cache import FeatureCache
from jaxtl.checkpoint import Checkpoints
from jaxtl.config import TrainConfig
from jaxtl.restore import restore_run
from jaxtl.train import main, run

CONV_NAMES = VGG16.units

GOLDEN = json.loads((Path(__file__).parent / "golden_runs.json").read_text())["runs"]


def assert_golden(name: str, run_dir, summary: dict | None = None) -> None:
    """The run's losses (and test accuracy) are those recorded before train.py was split by concern."""
    want = GOLDEN[name]
    rows = metrics(run_dir)
    np.testing.assert_allclose([r["train_loss"] for r in rows], want["train_loss"], rtol=1e-4)
    np.testing.assert_allclose([r["val_loss"] for r in rows], want["val_loss"], rtol=1e-4)
    if summary is not None:
        assert summary["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1.01 / summary["n_test"])


def test_frozen_base_after_a_run_equals_the_weights_file(cfg, tmp_path):
    from jaxtl.weights import load_vgg16_weights

    file = weights_file(tmp_path / "vgg.npz")
    run(dataclasses.replace(cfg, weights=str(file)), log=quiet)
    trained = restore_run(cfg.out, "latest").variables["params"]
    for name, want in load_vgg16_weights(file)["params"].items():
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(trained["base"][name][leaf], want[leaf])
    assert losses(cfg.out)[0] != losses(cfg.out)[-1]  # and the head did train


def test_progressive_runs_both_stages_and_keeps_counting_steps(cfg):
    cfg = dataclasses.replace(cfg, **GOLDEN["progressive"]["settings"])
    summary = run(cfg, log=quiet)
    rows = metrics(cfg.out)
    assert [(r["stage"], r["epoch"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[-1]["step"] == 4 * rows[0]["step"]
    assert_golden("progressive", cfg.out, summary)


def test_scratch_follows_its_golden_run(cfg):
    cfg = dataclasses.replace(cfg, **GOLDEN["scratch"]["settings"])
    assert_golden("scratch", cfg.out, run(cfg, log=quiet))


def test_run_writes_what_users_read(cfg):
    run(cfg, log=quiet)
    out = Path(cfg.out)
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "split.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and 0 <= summary["test_accuracy"] <= 1
    assert TrainConfig(**json.loads((out / "config.json").read_text())) == cfg
    rows = metrics(out)  # compile time is reported apart from the epochs' seconds, and paid once
    assert rows[0]["compile_seconds"] > 0 and [r["compile_seconds"] for r in rows[1:]] == [0.0, 0.0]
    assert summary["compile_seconds"] == pytest.approx(sum(r["compile_seconds"] for r in rows))


KILL = textwrap.dedent("""
    import json, os, signal, sys
    import orbax.checkpoint as ocp
    from jaxtl.config import TrainConfig
    from jaxtl.steps import TrainPrograms
    from jaxtl.train import run
    cfg, how, n = TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if how == "step":  # before the n-th train step: between two steps of an epoch
        real_init, calls = TrainPrograms.__init__, []
        def init(self, *a, **k):
            real_init(self, *a, **k)
            train = self.train
            def counted(*a, **k):
                calls.append(1)
                if len(calls) == n:
                    die()
                return train(*a, **k)
            self.train = counted
        TrainPrograms.__init__ = init
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
    run(cfg, log=lambda *_: None)
""")


def _killed_run(cfg, how: str, n: int) -> None:
    """`cfg` run in a subprocess that SIGKILLs itself as `how` and `n` say (see KILL)."""
    killed = subprocess.run([sys.executable, "-c", KILL, json.dumps(dataclasses.asdict(cfg)), how, str(n)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


# The tests on `whole` run in one worker (the README's `--dist loadgroup`), which builds it once.
ON_WHOLES_WORKER = pytest.mark.xdist_group("whole")


@pytest.fixture(scope="module")
def whole(data_dir, tmp_path_factory):
    """A 3-epoch fine-tuning run (steps fed from the host, dropout on: every rng in play), run uninterrupted:
    the reference of every interrupted-then-resumed run below."""
    root = tmp_path_factory.mktemp("resume")
    cfg = TrainConfig(data=str(data_dir), image_size=32, epochs=3, batch_size=8, weights="random", normalize=True,
                      patience=0, out=str(root / "whole"), cache_dir=str(root / "cache"), workers=1, verbose=0,
                      checkpoint_every=0,
                      **GOLDEN["finetune"]["settings"])
    run(cfg, log=quiet)
    return cfg


@ON_WHOLES_WORKER
def test_finetune_follows_its_golden_run(whole):
    assert_golden("finetune", whole.out)


@ON_WHOLES_WORKER
def test_sigkill_between_two_steps_then_resume_gives_the_uninterrupted_run(whole, tmp_path):
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"))
    per_epoch = metrics(whole.out)[0]["step"]
    assert per_epoch >= 3
    _killed_run(cfg, "step", per_epoch + 2)  # epoch 2, after its first step
    assert len(losses(cfg.out)) == 1
    logs = []
    run(dataclasses.replace(cfg, resume=True), log=logs.append)
    assert any(f"after stage 1 epoch 1 (step {per_epoch})" in line for line in logs), logs
    np.testing.assert_allclose(losses(cfg.out), losses(whole.out), rtol=1e-5)


@ON_WHOLES_WORKER
@pytest.mark.parametrize("part", ["state", "meta"])
def test_resume_after_a_corrupt_newest_checkpoint_continues_from_the_one_before(whole, tmp_path, part, capfd):
    import shutil

    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"))
    shutil.copytree(whole.out, cfg.out)  # a finished run whose newest save then got damaged
    latest = Path(cfg.out) / "checkpoints" / "latest"
    newest = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    for f in (latest / str(newest) / part).rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupt")
    logs = []
    run(dataclasses.replace(cfg, resume=True), log=logs.append)
    assert any("after stage 1 epoch 2 " in line for line in logs), logs  # epoch 3's save was the corrupt one
    np.testing.assert_allclose(losses(cfg.out), losses(whole.out), rtol=1e-5)
    assert "absl" not in capfd.readouterr().err  # jaxtl's own warning says it, orbax's ERROR lines do not


@pytest.mark.slow
@ON_WHOLES_WORKER
def test_a_run_killed_before_its_first_timed_checkpoint_starts_over_and_ends_the_same(whole, tmp_path):
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"), checkpoint_every=1e9)  # saves only at the end
    _killed_run(cfg, "step", metrics(whole.out)[0]["step"] + 2)  # in epoch 2: nothing saved yet
    logs = []
    run(dataclasses.replace(cfg, resume=True), log=logs.append)
    assert any("had saved no checkpoint yet; starting over" in line for line in logs), logs
    np.testing.assert_allclose(losses(cfg.out), losses(whole.out), rtol=1e-5)


@pytest.mark.slow
@ON_WHOLES_WORKER
def test_kill_between_saving_best_and_latest_keeps_the_best_model(whole, tmp_path):
    best, last_improved = float("inf"), None
    for epoch, row in enumerate(metrics(whole.out)):
        if row["val_loss"] < best - 1e-7:
            best, last_improved = row["val_loss"], epoch
    assert last_improved and last_improved >= 1, "the reference run must improve after its first epoch"
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"))
    _killed_run(cfg, "between-saves", last_improved + 1)
    run(dataclasses.replace(cfg, resume=True), log=quiet)
    np.testing.assert_allclose(losses(cfg.out), losses(whole.out), rtol=1e-5)
    want, got = restore_run(whole.out, "best"), restore_run(cfg.out, "best")
    assert got.meta["epoch"] == want.meta["epoch"] == last_improved
    for a, b in zip(jax.tree.leaves(want.variables), jax.tree.leaves(got.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@ON_WHOLES_WORKER
def test_resume_goes_on_without_an_unreadable_best_and_refuses_other_weights(whole, tmp_path, capsys):
    import shutil

    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"))
    shutil.copytree(whole.out, cfg.out)
    latest = Path(cfg.out) / "checkpoints" / "latest"
    shutil.rmtree(latest / str(max(int(p.name) for p in latest.iterdir())))  # as if killed before the last save
    for f in (Path(cfg.out) / "checkpoints" / "best").rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupt")
    logs = []
    run(dataclasses.replace(cfg, resume=True), log=logs.append)
    assert any("no readable checkpoint" in line and "taken from the resumed state" in line for line in logs)
    np.testing.assert_allclose(losses(cfg.out), losses(whole.out), rtol=1e-5)
    other = weights_file(tmp_path / "vgg.npz")
    assert main(["--resume", "--out", cfg.out, "--weights", str(other), "--epochs", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on weights random init" in err and "resume with the same --weights" in err and "\n" not in err


@pytest.mark.slow
@ON_WHOLES_WORKER
def test_sigkill_mid_checkpoint_save_resumes_from_the_previous_one(whole, tmp_path):
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"))
    _killed_run(cfg, "mid-save", 2)
    first_step = Checkpoints(Path(cfg.out) / "checkpoints").steps()
    assert len(first_step) == 1  # the half-written save does not count
    run(dataclasses.replace(cfg, resume=True), log=quiet)
    np.testing.assert_allclose(losses(cfg.out), losses(whole.out), rtol=1e-5)
    want, got = restore_run(whole.out, "latest"), restore_run(cfg.out, "latest")
    assert want.meta["epoch"] == got.meta["epoch"] == 2
    for a, b in zip(jax.tree.leaves(want.variables), jax.tree.leaves(got.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


SIGNALLED = textwrap.dedent("""
    import json, os, sys, time
    from jaxtl import train
    from jaxtl.config import TrainConfig
    from jaxtl.steps import TrainPrograms
    given, n, go = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]  # a config, or the command's flags
    real_init, calls = TrainPrograms.__init__, []
    def init(self, *a, **k):  # before the n-th train step: say so, and wait until the signal has been sent
        real_init(self, *a, **k)
        step = self.train
        def counted(*a, **k):
            calls.append(1)
            if len(calls) == n:
                print("ready", flush=True)
                while not os.path.exists(go):
                    time.sleep(0.01)
            return step(*a, **k)
        self.train = counted
    TrainPrograms.__init__ = init
    if isinstance(given, dict):  # the command line as a user runs it, on this config
        train.config_from_args = lambda argv: TrainConfig(**given)
    sys.exit(train.main(given if isinstance(given, list) else []))
""")


def _signalled_run(cfg, sig: int, n: int, tmp_path) -> subprocess.CompletedProcess:
    """`cfg` run by `jaxtl train` in a session of its own, sent `sig` from outside just before its n-th train
    step (between two steps), then left to finish."""
    go = tmp_path / f"sent-{sig}"
    proc = _signalled(dataclasses.asdict(cfg), n, go)
    try:
        wait_until_ready(proc)
        proc.send_signal(sig)
        go.touch()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _signalled(given: dict | list, n: int, go: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SIGNALLED, json.dumps(given), str(n), str(go)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@ON_WHOLES_WORKER
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM"),  # SIGINT: the same path, slow set
                                 pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow)])
def test_a_signal_between_two_steps_saves_there_says_how_to_resume_and_the_resumed_run_ends_uninterrupted(
        whole, tmp_path, sig):
    cfg = dataclasses.replace(whole, out=str(tmp_path / "run"), checkpoint_every=1e9)  # no timed save would come
    epoch = 1 if sig == signal.SIGTERM else 2  # the first epoch (no `best` saved yet), or the second
    step = metrics(whole.out)[0]["step"] * (epoch - 1) + 2
    done = _signalled_run(cfg, sig, step, tmp_path)  # after the epoch's first step
    assert done.returncode == 128 + sig, done.stderr[-2000:]
    assert done.stderr.strip() == (f"interrupted at stage 1 epoch {epoch} (step {step}); continue with: jaxtl "
                                   f"train --out {cfg.out} --resume")  # one line, no traceback
    assert Checkpoints(Path(cfg.out) / "checkpoints").steps() == [step]
    assert main(["--out", cfg.out, "--resume", "--batch-size", "4", "--verbose", "0"]) == 2  # other batches: refused
    logs = []
    run(dataclasses.replace(cfg, resume=True), log=logs.append)
    assert any(f"in stage 1 epoch {epoch} after batch 2 (step {step})" in line for line in logs), logs
    assert not [line for line in logs if "warning" in line], logs
    np.testing.assert_allclose(losses(cfg.out), losses(whole.out), rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in metrics(cfg.out)], [r["val_loss"] for r in metrics(whole.out)],
                               rtol=1e-5)


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The run every multi-device and multi-process run below must follow, in one process on one device (and
    the cache a damaged copy of which must give the same run)."""
    root = tmp_path_factory.mktemp("one")
    cfg = TrainConfig(data=str(data_dir), image_size=32, epochs=3, batch_size=8, weights="random", normalize=True,
                      out=str(root / "run"), cache_dir=str(root / "cache"), workers=1, verbose=0, patience=0)
    return cfg, run(cfg, log=quiet)


def test_damaged_feature_and_prefix_shards_are_named_recomputed_and_the_run_ends_as_a_clean_one(one_process,
                                                                                              tmp_path, caplog):
    import shutil

    cfg, summary = one_process
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache_dir, cache)
    (features,) = cache.glob("features-*/rows-*.h5")
    (prefix_rows,) = cache.glob("prefix-*/rows-*.h5")
    overwrite(features, "flat", 0x3F)  # finite garbage: what only the CRCs can tell (NaN: tests/test_cache.py)
    overwrite(prefix_rows, "acts/taps", 0x3F)
    again = run(dataclasses.replace(cfg, out=str(tmp_path / "run"), cache_dir=str(cache)), log=quiet)
    warned = [r.getMessage() for r in caplog.records if "damaged cache shard" in r.getMessage()]
    assert len(warned) == 2 and {str(features), str(prefix_rows)} == {w.split(": ")[1] for w in warned}, warned
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(cfg.out), rtol=1e-5)
    assert again["test_accuracy"] == summary["test_accuracy"]


def test_frozen_follows_its_golden_run(one_process):
    assert_golden("frozen", one_process[0].out, one_process[1])


FOUR_DEVICES = textwrap.dedent("""
    import dataclasses, json, sys, jax, numpy as np
    from jaxtl.config import TrainConfig
    from jaxtl.feed import StepFeed
    from jaxtl.sharding import make_mesh
    from jaxtl.train import run
    assert len(jax.devices()) == 4
    owner = np.arange(40) % 4  # each device owns 10 of 40 clips; a device table holds its own rows only
    feed = StepFeed(np.arange(40) * 10, np.arange(40), owner, None, {"taps": np.arange(80.0).reshape(40, 2)})
    feed.put_on_devices(make_mesh(), "sharded", log=lambda *_: None)
    for name, of_clip in (("x", lambda a: a[:, 0] // 2), ("y", lambda a: a // 10)):  # inputs and labels
        leaf = feed.table.arrays[name]["taps"] if name == "x" else feed.table.arrays[name]
        held = sorted((s.device.id, of_clip(np.asarray(s.data))) for s in leaf.addressable_shards)
        assert [r.tolist() for _, r in held] == [np.flatnonzero(owner == d).tolist() for d in range(4)], held
    assert (feed.table.slot == np.arange(40) // 4).all()  # a clip's row in its device's table
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    for layout in ("sharded", "replicated"):
        run(dataclasses.replace(cfg, inputs=layout, out=cfg.out + "-" + layout, verbose=2), log=print)
""")


@pytest.fixture(scope="module")
def four_devices(one_process, tmp_path_factory):
    """The one-process run on 4 forced CPU devices, its head-only inputs sharded and replicated."""
    four = dataclasses.replace(one_process[0], out=str(tmp_path_factory.mktemp("four") / "run"),
                               cache_dir=str(tmp_path_factory.mktemp("four-cache")))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, json.dumps(dataclasses.asdict(four))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return four, proc.stdout


def test_four_devices_each_hold_a_quarter_and_sharded_inputs_follow_replicated_ones(four_devices, one_process):
    four, output = four_devices
    assert "inputs: sharded" in output and "inputs: replicated" in output
    sharded, replicated = losses(four.out + "-sharded"), losses(four.out + "-replicated")
    np.testing.assert_allclose(sharded, replicated, rtol=1e-5)
    assert len(sharded) == len(losses(one_process[0].out))  # every epoch ran (each device its own batches)


def test_two_processes_of_two_devices_hold_their_shares_and_follow_one_process_of_four(four_devices, tmp_path):
    four, _ = four_devices
    out, cache = str(tmp_path / "two"), tmp_path / "fresh-cache"
    argv = ["--recipe", "seed", "--data", four.data, "--image-size", "32", "--epochs", "3", "--batch-size", "8",
            "--weights", "random", "--normalize", "--out", out, "--cache-dir", str(cache), "--workers", "1",
            "--verbose", "1", "--patience", "0"]  # --inputs auto: process 0's choice, taken by both
    procs = _two_processes(argv, [[], []], devices=2)
    assert all(p.returncode == 0 for p in procs), procs[0].output[-3000:] + procs[1].output[-3000:]
    summary = json.loads((Path(out) / "summary.json").read_text())
    # process 0 owns devices 0 and 1: round-robin over 4 devices within each split, its share is balanced
    mine = sum(int(np.sum(np.arange(summary[f"n_{side}"]) % 4 < 2)) for side in ("train", "val", "test"))
    assert f"4 device(s), 2 process(es), {mine} clips held here" in procs[0].output
    assert f"features: {mine} clips (0 from cache, {mine} computed) in this process" in procs[0].output
    shards = []
    for shard in cache.glob("prefix-*/rows-*.h5"):
        with h5py.File(shard, "r") as f:
            shards.append({k.decode() for k in f["keys"][:]})
    # each process cached the prefix rows of its own share, and no clip twice
    assert sorted(map(len, shards)) == sorted([mine, 40 - mine]) and not shards[0] & shards[1]
    np.testing.assert_allclose(losses(out), losses(four.out + "-sharded"), rtol=1e-4)
    assert restore_run(out, "latest").meta["epoch"] == 2


def test_features_stream_into_the_prefix_pass_a_chunk_at_a_time(one_process, tmp_path, monkeypatch):
    from jaxtl import cache as cachelib
    from jaxtl import pipeline

    events, extract, add = [], pipeline.ClipFeatures.__call__, cachelib.ActivationCache.add
    monkeypatch.setattr(pipeline.ClipFeatures, "__call__",
                        lambda self, ids: events.append(("features", len(ids))) or extract(self, ids))
    monkeypatch.setattr(cachelib.ActivationCache, "add",
                        lambda self, keys, acts: events.append(("cached", len(keys))) or add(self, keys, acts))
    one, summary = one_process
    streamed = dataclasses.replace(one, stream_chunk=8, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"))
    got = run(streamed, log=quiet)
    assert [n for e, n in events if e == "features"] == [8] * 5  # features a chunk at a time
    assert [n for e, n in events if e == "cached"] == [8] * 5  # each chunk's prefix rows cached when done
    # the VGG16 pass began before the last chunk's features were extracted (the host thread reads ahead)
    assert events.index(("cached", 8)) < max(i for i, e in enumerate(events) if e[0] == "features")
    # the same features and the same run as without streaming (the one-process run: 40 clips, chunk 2048)
    ours, theirs = FeatureCache(streamed.cache_dir, streamed.features()), FeatureCache(one.cache_dir, one.features())
    keys = list(theirs.shards.index())
    assert len(keys) == 40 and len(ours.shards.files()) == 5
    mine, base = ours.read(keys), theirs.read(keys)
    for k in keys:
        np.testing.assert_array_equal(mine[k], base[k])
    np.testing.assert_allclose(losses(streamed.out), losses(one.out), rtol=1e-5)
    assert got["test_accuracy"] == summary["test_accuracy"]


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(cfg, capsys):
    run(dataclasses.replace(cfg, epochs=1), log=quiet)
    steps_before = Checkpoints(Path(cfg.out) / "checkpoints").steps()
    bad = ["--out", cfg.out, "--resume", "--epochs", "3"]
    saved = json.loads(Path(cfg.out, "config.json").read_text())
    Path(cfg.out, "config.json").write_text(json.dumps({**saved, "lr": 1e30}))
    assert main(bad + ["--verbose", "0"]) == 2
    err = capsys.readouterr().err
    assert "training diverged: non-finite loss at step" in err and "\n" not in err.strip()
    assert Checkpoints(Path(cfg.out) / "checkpoints").steps() == steps_before


TWO_PROCESSES = textwrap.dedent("""
    import json, sys
    from jaxtl.train import main
    sys.exit(main(json.loads(sys.argv[1])))
""")


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _two_processes(argv: list[str], per_process: list[list[str]], devices: int = 1) -> list[subprocess.Popen]:
    """`python -m jaxtl.train ARGV` as processes 0 and 1 of one run on 127.0.0.1, each with `devices` CPU
    devices (finished, output read)."""
    argv = argv + ["--coordinator", _free_port(), "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
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


def test_two_processes_with_different_weights_stop_naming_them(one_process, tmp_path):
    file = weights_file(tmp_path / "vgg.npz")
    argv = ["--data", one_process[0].data, "--image-size", "32", "--out", str(tmp_path / "two"), "--cache-dir",
            str(tmp_path / "cache"), "--workers", "1", "--verbose", "0"]
    procs = _two_processes(argv, [["--weights", "random"], ["--weights", str(file)]])
    assert [p.returncode for p in procs] == [2, 2], procs[0].output[-3000:]
    assert "the processes hold different weights (processes [0] vs [1])" in procs[0].output


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_saved_and_resumed_they_end_uninterrupted(
        one_process, tmp_path):
    flags = ["--recipe", "seed", "--mode", "finetune", "--data", one_process[0].data, "--image-size", "32",
             "--epochs", "2", "--batch-size", "8", "--weights", "random", "--normalize", "--workers", "1",
             "--verbose", "0", "--patience", "0", "--checkpoint-every", "1e9", "--cache-dir", str(tmp_path / "cache")]
    reference = str(tmp_path / "reference")  # the same run, uninterrupted, in one process of two devices
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", TWO_PROCESSES, json.dumps(flags + ["--out", reference])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    per_epoch = metrics(reference)[0]["step"]
    out, go = str(tmp_path / "two"), tmp_path / "sent"
    coordinator = _free_port()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    procs = [_signalled(flags + ["--out", out, "--coordinator", coordinator, "--num-processes", "2", "--process-id",
                                 str(i)], per_epoch + 2 if i == 1 else 0, go, env) for i in range(2)]
    try:
        wait_until_ready(procs[1])
        procs[1].send_signal(signal.SIGTERM)  # process 1 only, between two steps of epoch 2
        go.touch()
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    line = f"interrupted at stage 1 epoch 2 (step {per_epoch + 2}); continue with: jaxtl train --out {out} --resume"
    assert [p.returncode for p in procs] == [143, 143] and [e.strip() for e in errs] == [line, line], errs
    assert Checkpoints(Path(out) / "checkpoints").steps() == [per_epoch + 2]
    procs = _two_processes(["--out", out, "--resume", "--verbose", "0"], [[], []])
    assert all(p.returncode == 0 for p in procs), procs[0].output[-3000:] + procs[1].output[-3000:]
    np.testing.assert_allclose(losses(out), losses(reference), rtol=1e-4)


def test_bad_files_stop_the_run_or_are_skipped_and_reported(cfg, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cfg.data, data)
    (data / "tone" / "broken.wav").write_text("not audio")
    (data / "tone" / "cut.wav").write_bytes((data / "tone" / "tone_000.wav").read_bytes()[:60])  # 8 of its samples
    write_tone(data / "tone" / "one.wav", seconds=1 / 8000)  # a single sample
    bad = dataclasses.replace(cfg, data=str(data), epochs=1, cache_dir=str(tmp_path / "cache"))
    argv = ["--recipe", "seed", "--data", str(data), "--image-size", "32", "--epochs", "1", "--weights", "random",
            "--cache-dir", bad.cache_dir, "--workers", "1", "--verbose", "0", "--out", str(tmp_path / "error")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "wav: " in err and "use --on-bad-file skip" in err
    summary = run(dataclasses.replace(bad, on_bad_file="skip", out=str(tmp_path / "skip")), log=quiet)
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 40
    skipped = (tmp_path / "skip" / "skipped.tsv").read_text()
    assert "broken.wav\tnot a readable audio file" in skipped
    assert "cut.wav\ttruncated: its header declares" in skipped
    assert "one.wav\ttoo short: 3 samples at 22050 Hz" in skipped  # one sample at 8 kHz, resampled


def test_frozen_convs_are_written_once_per_run_not_by_every_epoch(cfg):
    run(dataclasses.replace(cfg, epochs=2), log=quiet)
    root = Path(cfg.out) / "checkpoints"

    def size(d: Path) -> int:
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())

    frozen_bytes = 4 * sum(leaf.size for leaf in jax.tree.leaves(restore_run(cfg.out).variables["params"]["base"]))
    assert size(root / "frozen") > frozen_bytes / 2
    steps = list((root / "latest").iterdir())
    assert len(steps) == 2 and all(size(step) < frozen_bytes / 20 for step in steps)
    assert set(restore_run(cfg.out, "latest").variables["params"]["base"]) == set(CONV_NAMES)


@pytest.mark.parametrize("verbose", [1, 2])
def test_verbose_1_shows_one_bar_over_the_epochs_and_verbose_2_a_line_per_epoch(cfg, capsys, verbose):
    run(dataclasses.replace(cfg, verbose=verbose), log=print)
    printed = capsys.readouterr()
    per_epoch = [line for line in printed.out.splitlines() if line.startswith("stage 1 epoch ")]
    assert len(per_epoch) == (3 if verbose == 2 else 0)
    bar = "stage 1/1: 100%|" in printed.err and "| 3/3 [" in printed.err
    assert bar == (verbose == 1)
    assert printed.out.splitlines()[-1].startswith("test accuracy")


def test_checkpoints_every_n_seconds_keep_the_best_epoch_and_the_end(cfg, tmp_path):
    """With saves spaced in time (the default), a stage still ends saved, and `best` is the best epoch's
    state, as with a save after every epoch."""
    every = dataclasses.replace(cfg, epochs=4, lr=0.05, normalize=False)  # validation loss rises after epoch 1
    spaced = dataclasses.replace(every, checkpoint_every=1e9, out=str(tmp_path / "spaced"))
    run(every, log=quiet)
    run(spaced, log=quiet)
    np.testing.assert_allclose(losses(spaced.out), losses(every.out), rtol=1e-6)
    per_epoch = metrics(every.out)[0]["step"]
    assert Checkpoints(Path(spaced.out) / "checkpoints").steps() == [4 * per_epoch]
    assert Checkpoints(Path(every.out) / "checkpoints").steps() == [3 * per_epoch, 4 * per_epoch]
    want, got = restore_run(every.out, "best"), restore_run(spaced.out, "best")
    assert got.meta["epoch"] == want.meta["epoch"] == 0  # saved with the last epoch's checkpoint, as it was
    for a, b in zip(jax.tree.leaves(want.variables), jax.tree.leaves(got.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_mixup_reaches_the_step(one_process, tmp_path):
    mixed = dataclasses.replace(one_process[0], epochs=1, mixup=0.4, out=str(tmp_path / "mixed"))
    run(mixed, log=quiet)
    assert abs(losses(mixed.out)[0] - GOLDEN["frozen"]["train_loss"][0]) > 1e-2  # the same run without mixup
