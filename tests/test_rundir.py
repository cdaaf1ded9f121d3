import dataclasses
import json
from pathlib import Path

import pytest

from conftest import quiet
from jaxtl.config import ConfigError, config_from_args
from jaxtl.rundir import RunDirError
from jaxtl.train import main, run


def test_resume_without_a_run_or_a_checkpoint_and_rerun_into_a_used_directory(cfg, capsys, tmp_path):
    assert main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "holds no run" in capsys.readouterr().err
    Path(cfg.out).mkdir(parents=True)
    Path(cfg.out, "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))  # killed before its first save
    logs = []
    run(dataclasses.replace(cfg, epochs=1, resume=True), log=logs.append)
    assert any("had saved no checkpoint yet; starting over" in line for line in logs)
    with pytest.raises(RunDirError, match="already holds a run"):
        run(cfg, log=quiet)


def test_without_out_each_run_gets_its_own_directory_and_resume_asks_for_one(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(dataclasses.replace(cfg, out=None, epochs=1), log=quiet)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("seed-") and json.loads((run_dir / "config.json").read_text())["out"] == \
        f"runs/{run_dir.name}"
    with pytest.raises(ConfigError, match="--resume needs --out"):
        config_from_args(["--resume"])


def test_resume_refuses_data_that_changed_since_the_run_started(cfg, tmp_path):
    import shutil

    from conftest import write_tone
    from jaxtl.data import DataError

    data = tmp_path / "data"
    shutil.copytree(cfg.data, data)
    cfg = dataclasses.replace(cfg, data=str(data), epochs=1)
    run(cfg, log=quiet)
    write_tone(data / "tone" / "late.wav", seconds=0.5, sr=16000)
    with pytest.raises(DataError, match="the data changed since the run started"):  # a new clip re-splits
        run(dataclasses.replace(cfg, epochs=2, resume=True), log=quiet)
    (data / "tone" / "late.wav").unlink()
    write_tone(data / "chirp" / "chirp_000.wav", seconds=0.3, sr=16000)  # a clip rewritten in place
    with pytest.raises(DataError, match="chirp_000.wav is new, gone, moved to another side or rewritten"):
        run(dataclasses.replace(cfg, epochs=2, resume=True), log=quiet)
