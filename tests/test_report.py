"""The run report: written by train and by evaluate, naming every stage, images inline in the HTML, and a
command that rebuilds the run's config."""

import dataclasses
import shlex
from pathlib import Path

import numpy as np

from conftest import quiet
from jaxtl.config import TrainConfig, config_from_args
from jaxtl.evaluate import evaluate
from jaxtl.report import reproduce_command, scores
from jaxtl.train import run


def test_report_names_every_stage_and_evaluate_adds_its_result(cfg):
    summary = run(dataclasses.replace(cfg, epochs=2), log=quiet)
    out = Path(cfg.out)
    md = (out / "report.md").read_text()
    assert "| setup | split | model | features+prefix | epochs | test | total |" in md
    assert list(summary["stage_seconds"]) == ["setup", "split", "model", "features+prefix", "epochs", "test"]
    assert f"test accuracy **{100 * summary['test_accuracy']:.1f} %** on {summary['n_test']} clips" in md
    assert "![training curves](curves.png)" in md and "confusion_test.png" in md
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == md.count("![") and ".png'" not in html
    evaluate(cfg.out, progress=False)
    assert "## Evaluate: the run's recorded test set" in (out / "report.md").read_text()


def test_a_run_without_validation_clips_still_reports(cfg):
    summary = run(dataclasses.replace(cfg, val_size=0.0, epochs=2), log=quiet)
    md = (Path(cfg.out) / "report.md").read_text()
    assert summary["val_accuracy"] is None and "validation accuracy" not in md
    assert f"test accuracy **{100 * summary['test_accuracy']:.1f} %**" in md


def test_reproduce_command_rebuilds_the_config():
    cfg = TrainConfig.from_recipe("jaxtl", image_size=64, taps="3,4", normalize=False, data="my clips/x",
                                  weight_decay=0.0, out="runs/a")
    argv = shlex.split(reproduce_command(dataclasses.asdict(cfg)))
    assert argv[:2] == ["jaxtl", "train"]
    assert config_from_args(argv[2:]) == cfg


def test_scores_match_a_plain_count():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    s = scores(y, pred, ["a", "b", "c", "d"])
    cm = np.zeros((4, 4), int)
    for t, p in zip(y, pred):
        cm[t, p] += 1
    assert s["confusion_matrix"] == cm.tolist() and s["missing_classes"] == ["d"]
    assert s["accuracy"] == np.trace(cm) / 50
    recall_b = cm[1, 1] / cm[1].sum()
    assert abs(s["per_class"]["b"]["recall"] - recall_b) < 1e-12
