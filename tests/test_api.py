"""The Python API and the `jaxtl` command: the README's notebook example runs as written; the console
script and --version work; the default run trains on the demo set inside the package."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jaxtl
from jaxtl.data import DEMO

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_as_written(data_dir, tmp_path, monkeypatch):
    """The README's example, executed verbatim (on the small synthetic set: $JAXTL_DATA points at it)."""
    block = re.search(r"<!-- tested by tests/test_api.py -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README's Python API example is missing its marker"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXTL_DATA", str(data_dir))
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    summary, run, scores = scope["summary"], scope["run"], scope["scores"]
    assert scores["accuracy"] == pytest.approx(summary["test_accuracy"]) and scores["n"] == summary["n_test"]
    labels, probs = scope["labels"], scope["probabilities"]
    assert len(labels) == 3 and probs.shape == (3, len(run.classes))
    assert labels == [run.classes[i] for i in probs.argmax(-1)]
    assert probs.sum(-1) == pytest.approx(1.0, abs=1e-5)
    import soundfile as sf

    waves = [sf.read(p)[0] for p in sorted(DEMO.glob("7_*.wav"))[:3]]  # arrays at the run's rate (8 kHz)
    assert run.sample_rate == 8000
    from_arrays, p2 = run.predict(waves)
    assert from_arrays == labels and p2 == pytest.approx(probs, abs=1e-4)
    paths = sorted(DEMO.glob("7_*.wav"))[:3]
    mixed, p3 = run.predict([paths[0], waves[1], str(paths[2])])  # paths and arrays keep their order
    assert mixed == labels and p3 == pytest.approx(probs, abs=1e-4)


def test_console_script_and_version():
    exe = Path(sys.executable).parent / "jaxtl"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"jaxtl {jaxtl.__version__}"
    bad = subprocess.run([str(exe), "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: jaxtl {train,evaluate,predict,weights,tune}" in bad.stderr
    helped = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: jaxtl train" in helped and "--holdout-group" in helped


def test_default_run_trains_on_the_demo_set_and_verbose_0_prints_only_the_summary(tmp_path, monkeypatch, capsys):
    from jaxtl.train import main

    monkeypatch.delenv("JAXTL_DATA", raising=False)
    out = tmp_path / "run"
    assert main(["--image-size", "32", "--epochs", "2", "--weights", "random", "--verbose", "0", "--workers", "1",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr()
    assert len(printed.out.strip().splitlines()) == 1 and printed.out.startswith("test accuracy") and not printed.err
    assert "held-out speaker yweweler" in printed.out and "(speaker-dependent" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == str(DEMO) and summary["holdout"]["group"] == "yweweler"
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] + summary["holdout"]["n"] == 300
    sides = {}
    for c in json.loads((out / "split.json").read_text())["clips"]:
        sides.setdefault(c["side"], set()).add(Path(c["path"]).stem.split("_")[1])
    assert sides["holdout"] == {"yweweler"} and "yweweler" not in sides["train"] | sides["val"] | sides["test"]
    assert "held-out speaker yweweler" in (out / "report.md").read_text()
    saved = json.loads((out / "config.json").read_text())  # the recipe's --mode auto, resolved and saved
    assert (saved["mode"], saved["head"]) == ("frozen", "lda") and summary["epochs_run"] == 1  # fitted, not trained
    from jaxtl.evaluate import evaluate

    held = evaluate(str(out), side="holdout", progress=False)  # the recorded held-out speaker, from the checkpoint
    assert (held["n"], held["accuracy"]) == (60, pytest.approx(summary["holdout"]["accuracy"]))


def test_the_demo_set_is_balanced_and_attributed():
    names = [p.stem.split("_") for p in DEMO.glob("*.wav")]
    cells = {}
    for digit, speaker, _ in names:
        cells[(digit, speaker)] = cells.get((digit, speaker), 0) + 1
    assert len(names) == 300 and set(cells.values()) == {6} and len(cells) == 50
    attribution = (DEMO.parent / "ATTRIBUTION.md").read_text()
    assert "CC BY-SA 4.0" in attribution and "free-spoken-digit-dataset" in attribution
    assert (DEMO.parent / "LICENSE.md").is_file()
