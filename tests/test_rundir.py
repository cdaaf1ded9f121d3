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
