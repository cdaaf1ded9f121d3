"""Top-k labels of audio files from a trained run.

    jaxtl predict RUN_DIR FILE... [--top-k 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jaxtl.api import load_run
from jaxtl.audio import BadAudio
from jaxtl.checkpoint import CheckpointError
from jaxtl.command import command
from jaxtl.config import ConfigError
from jaxtl.data import DataError


def predict(run_dir: str, files: list[str], top_k: int = 3, which: str = "best", progress: bool = True) -> list[dict]:
    run = load_run(run_dir, which)
    _, probs = run.predict(files, progress)
    out = []
    for f, p in zip(files, probs):
        top = np.argsort(-p)[:top_k]
        out.append({"file": f, "top": [{"label": run.classes[i], "probability": float(p[i])} for i in top]})
    return out


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxtl predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verbose", type=int, choices=(0, 1), default=1, help="0: no progress bars")
    args = parser.parse_args(argv)
    try:
        result = predict(args.run_dir, args.files, args.top_k, args.checkpoint, args.verbose >= 1)
    except (CheckpointError, BadAudio, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"predictions": result}))
        return 0
    for r in result:
        print(r["file"] + ": " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
