"""The Python API for notebooks: load a finished run, predict, evaluate (`train` lives in `jaxtl.train`).

    from jaxtl import TrainConfig, train, load_run
    summary = train(TrainConfig.from_recipe("jaxtl", out="runs/demo"))
    run = load_run("runs/demo")
    labels, probabilities = run.predict(["a.wav", "b.wav"])  # or 1-D arrays at run.sample_rate
    scores = run.evaluate()                                  # the run's recorded test set

`load_run` rebuilds the model from the run directory alone (`jaxtl.restore`); it never imports the trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtl.audio import BadAudio, extract, features_batch, long_enough
from jaxtl.config import TrainConfig
from jaxtl.images import RaggedFeatures
from jaxtl.restore import RestoredRun, predict_logits, restore_run, softmax


@dataclass
class Run:
    """A trained run as a model: `predict` clips, `evaluate` a labelled set."""

    directory: Path
    restored: RestoredRun
    checkpoint: str = "best"

    @property
    def classes(self) -> list[str]:
        return self.restored.classes

    @property
    def config(self) -> TrainConfig:
        return self.restored.cfg

    @property
    def sample_rate(self) -> int:
        return self.restored.cfg.sample_rate

    def predict(self, clips, progress: bool = False) -> tuple[list[str], np.ndarray]:
        """(top-1 label per clip, class probabilities (n, classes)) of audio files (paths) or waveforms
        (1-D float arrays at `sample_rate`); a clip that cannot be used raises `BadAudio` naming it."""
        fc = self.config.features()
        clips = list(clips)
        paths = [str(c) for c in clips if isinstance(c, str | os.PathLike)]
        from_files, errors = extract(paths, fc, self.config.workers, progress) if paths else ([], [])
        if errors:
            raise errors[0]
        from_files = iter(from_files)
        feats = []
        for i, c in enumerate(clips):
            if isinstance(c, str | os.PathLike):
                feats.append(next(from_files))
                continue
            y = np.asarray(c)
            y = (y / np.iinfo(y.dtype).max if np.issubdtype(y.dtype, np.integer) else y).astype(np.float32)
            if y.ndim != 1 or not np.isfinite(y).all():
                raise BadAudio(f"clip {i}", f"need a finite 1-D waveform at {self.sample_rate} Hz, got shape {y.shape}")
            y = y[:int(fc.max_seconds * fc.sample_rate)] if fc.max_seconds else y  # as files are read
            feats.append(features_batch([long_enough(y, fc, f"clip {i}")], fc)[0])
        probs = softmax(predict_logits(self.restored, RaggedFeatures.from_list(feats), progress=progress))
        return [self.classes[i] for i in probs.argmax(-1)], probs

    def evaluate(self, data: str | os.PathLike | None = None, side: str = "test", progress: bool = False) -> dict:
        """Scores on the run's recorded test set (`side="holdout"`: its held-out speaker) or on every clip of
        the labelled folder `data`; also written to the run's evaluation.json and report."""
        from jaxtl.evaluate import evaluate

        return evaluate(str(self.directory), None if data is None else str(data), self.checkpoint, side=side,
                        progress=progress, restored=self.restored)


def load_run(directory: str | os.PathLike, checkpoint: str = "best") -> Run:
    """A run directory's `best` (or `latest`) model."""
    return Run(Path(directory), restore_run(directory, checkpoint), checkpoint)
