import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from conftest import quiet, write_tone
from jaxtl.config import TrainConfig
from jaxtl.evaluate import evaluate
from jaxtl.evaluate import main as evaluate_main
from jaxtl.predict import predict
from jaxtl.train import run


@pytest.mark.parametrize("recipe", ["seed", "jaxtl"])
def test_train_evaluate_predict_at_64_pixels(cfg, recipe):
    """Restore builds the model at the run's own image size (a flatten head's shape depends on it)."""
    cfg = TrainConfig.from_recipe(recipe, data=cfg.data, image_size=64, epochs=2, batch_size=8, weights="random",
                                    out=cfg.out, cache_dir=cfg.cache_dir, workers=1, verbose=0)
    summary = run(cfg, log=quiet)
    result = evaluate(cfg.out)
    assert result["n"] == summary["n_test"]
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"])
    record = json.loads(Path(cfg.out, "split.json").read_text())
    files = [c["path"] for c in record["clips"] if c["side"] == "test"]
    top1 = [r["top"][0]["label"] for r in predict(cfg.out, files)]
    assert top1 == [result["classes"][p] for p in result["predictions"]]
    assert Path(cfg.out, "confusion_matrix.png").stat().st_size > 0


def test_evaluate_uses_the_recorded_test_set_and_names_missing_classes(cfg, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cfg.data, data)
    summary = run(dataclasses.replace(cfg, data=str(data)), log=quiet)
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
