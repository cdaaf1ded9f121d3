import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import losses, quiet, weights_file
from jaxtl.api import load_run
from jaxtl.config import ConfigError
from jaxtl.evaluate import evaluate
from jaxtl.rundir import recorded_test_clips
from jaxtl.train import run


def test_an_ensemble_scores_as_its_members_mean_probability_and_resumes_member_by_member(cfg, tmp_path):
    # one weight file: the members differ by their training seed alone, and share every split
    cfg = dataclasses.replace(cfg, ensemble=2, hidden=0, weights=str(weights_file(tmp_path / "vgg.npz")))
    summary = run(cfg, log=quiet)
    members = [Path(cfg.out) / "members" / str(i) for i in range(2)]
    assert [json.loads((m / "config.json").read_text())["train_seed"] for m in members] == [42, 43]
    assert (members[0] / "split.json").read_text() == (members[1] / "split.json").read_text()
    assert losses(members[0]) != losses(members[1])
    # in memory, from each member's own run directory: the mean of their probabilities
    paths, labels = recorded_test_clips(Path(cfg.out))
    probs = np.mean([load_run(m).predict(paths)[1] for m in members], axis=0)
    ensemble = load_run(cfg.out)
    truth = np.searchsorted(ensemble.classes, labels)
    assert summary["test_accuracy"] == float(np.mean(probs.argmax(-1) == truth))
    assert evaluate(cfg.out, progress=False)["accuracy"] == summary["test_accuracy"]
    np.testing.assert_allclose(ensemble.predict(paths)[1], probs, rtol=1e-4, atol=1e-6)
    assert [m["seed"] for m in summary["members"]] == [42, 43] and "Ensemble of 2" in (Path(cfg.out) / "report.md"
                                                                                      ).read_text()
    # killed during member 2's last epoch: member 1 is kept as it is, member 2 redoes that epoch from its checkpoint
    whole = losses(members[1])
    (members[1] / "summary.json").unlink()
    newest = max((members[1] / "checkpoints" / "latest").iterdir(), key=lambda p: int(p.name))
    shutil.rmtree(newest)
    done = (members[0] / "metrics.jsonl").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="trained with other settings \\(lr\\)"):
        run(dataclasses.replace(cfg, resume=True, lr=0.5), log=quiet)
    assert json.loads((Path(cfg.out) / "config.json").read_text())["lr"] == cfg.lr  # nothing was written
    lines = []
    again = run(dataclasses.replace(cfg, resume=True), log=lines.append)
    assert any("member 1/2: finished before" in line for line in lines)
    assert any("member 2/2: training seed 43, resumed" in line for line in lines)
    assert any("resumed" in line and "after stage 1 epoch 2" in line for line in lines)
    assert (members[0] / "metrics.jsonl").stat().st_mtime_ns == done
    np.testing.assert_allclose(losses(members[1]), whole, rtol=1e-5)
    assert again["test_accuracy"] == summary["test_accuracy"]
