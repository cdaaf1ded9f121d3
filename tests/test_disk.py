"""A full or read-only disk under the cache, the run directory and the checkpoints: one line or one warning,
never a traceback, a temporary file left behind, or an earlier save lost."""

import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import losses, quiet
from jaxtl import train
from jaxtl.checkpoint import Checkpoints
from jaxtl.disk import write_text
from jaxtl.restore import restore_run


@pytest.fixture
def small_disk(tmp_path):
    """mount(kilobytes, *options): a tmpfs of that size in tmp_path, unmounted after the test (root and mount
    are needed: skipped where the machine does not allow them)."""
    mounted = []

    def mount(kilobytes: int, *options: str) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={kilobytes}k", *options]), "tmpfs",
                               str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:120]}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    """Take every free byte of `directory`'s filesystem."""
    with open(directory / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def leftovers(root: Path) -> list[str]:
    """Temporary files and directories of interrupted writes under `root`."""
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name or "orbax-checkpoint-tmp" in p.name]


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from jaxtl.disk import DiskError

    path = tmp_path / "summary.json"
    write_text(path, "old")

    real = Path.write_text

    def full(self, text):  # the fault at the write call, after part of the text went to disk
        real(self, text[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskError, match=r"summary.json: cannot write summary.json: No space left on device \(.* "
                                        r"free there\)$"):
        write_text(path, "new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("disk", ["full", pytest.param("read-only", marks=pytest.mark.slow)])
def test_a_cache_on_a_full_or_read_only_disk_warns_and_the_run_ends_as_with_a_cache(cfg, small_disk, caplog, disk):
    clean = train.run(dataclasses.replace(cfg, cache_dir=str(cfg.out) + "-cache"), log=quiet)
    cache = small_disk(64, "ro") if disk == "read-only" else small_disk(64)
    if disk == "full":
        fill(cache)
    got = train.run(dataclasses.replace(cfg, out=cfg.out + "-2", cache_dir=str(cache)), log=quiet)
    assert losses(cfg.out + "-2") == pytest.approx(losses(cfg.out), rel=1e-5)
    assert got["test_accuracy"] == clean["test_accuracy"]
    warnings = [r.getMessage() for r in caplog.records if "cannot write the cache" in r.getMessage()]
    reason = "No space left on device" if disk == "full" else "Read-only file system"
    assert len(warnings) == 2 and all(f": cannot write the cache: {reason} (" in w for w in warnings), warnings
    assert {Path(w.split(": ")[1]).name.split("-")[0] for w in warnings} == {"features", "prefix"}  # each named
    assert leftovers(cache) == []


TRAIN = textwrap.dedent("""
    import sys
    from jaxtl import checkpoint, train
    if sys.argv[1] == "midway":  # no refusal up front: the disk fills while orbax writes
        checkpoint.check_room = lambda *a: None
    sys.exit(train.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("when", ["up-front", "midway"])
def test_a_run_directory_without_room_for_the_frozen_weights_stops_in_one_line(cfg, small_disk, when):
    out = small_disk(1024) / "run"  # room for config.json, not for 58 MB of VGG16 convs
    flags = ["--recipe", "seed", "--data", cfg.data, "--image-size", "32", "--epochs", "1", "--weights", "random",
             "--out", str(out), "--cache-dir", cfg.cache_dir, "--workers", "1", "--verbose", "0"]
    done = subprocess.run([sys.executable, "-c", TRAIN, when, *flags], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2  # and the whole of stderr is one line (orbax's own noise kept back)
    needs = r"needs \d+\.\d MB, " if when == "up-front" else ""
    assert re.fullmatch(rf"error: {out}/checkpoints: cannot save the run's frozen weights: No space left on device "
                        rf"\({needs}\d+\.\d KB free there\)\n", done.stderr), done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["out"] == str(out)  # what was written stays readable
    assert leftovers(out) == []


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_the_one_before_stays(cfg, small_disk, capsys,
                                                                                   monkeypatch):
    out = small_disk(80 * 1024) / "run"  # room for the frozen convs and the first saves
    saves, real_save = [], Checkpoints.save

    def save(self, step, *a, **k):
        saves.append(step)
        if len(saves) == 2:  # the disk fills up between the first and the second checkpoint
            fill(out.parent)
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(Checkpoints, "save", save)
    monkeypatch.setattr(train, "config_from_args", lambda argv: dataclasses.replace(cfg, out=str(out)))
    assert train.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: {out}/checkpoints/(best|latest): cannot save checkpoint step {saves[1]}: No space "
                        r"left on device \(needs .*, 0 B free there\)", err), err
    assert restore_run(out, "latest").meta["epoch"] == 0  # the save before is whole and readable
    assert leftovers(out) == []


def test_a_compilation_cache_that_cannot_be_written_is_one_warning_and_compiling_goes_on(small_disk):
    cache = small_disk(64, "ro")
    script = ("import sys, jax, jax.numpy as jnp; from jaxtl.steps import use_compile_cache; "
              "use_compile_cache(sys.argv[1]); print(jax.config.jax_compilation_cache_dir, "
              "float(jax.jit(lambda x: x * 2)(jnp.ones(2)).sum()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    done = subprocess.run([sys.executable, "-c", script, str(cache)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["None", "4.0"], done.stderr[-2000:]
    assert re.fullmatch(rf"warning: {cache}/xla: cannot write the compilation cache: Read-only file system "
                        r"\(.* free there\); compiling without it\n", done.stderr), done.stderr
