"""`jaxtl train|evaluate|predict|weights ...`: one command for the `python -m jaxtl.<module>` forms, same flags."""

from __future__ import annotations

import importlib
import os
import sys

import jaxtl

COMMANDS = {"train": "train a model (see `jaxtl train --help`)",
            "evaluate": "score a run on its test set or a labelled folder, and write its report",
            "predict": "top-k labels of audio files",
            "weights": "fetch, inspect or convert weight files (--backbone)",
            "tune": "measure the XLA:CPU setting that runs the frozen pass fastest here, and use it from then on"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        print(f"jaxtl {jaxtl.__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        usage = "usage: jaxtl {" + ",".join(COMMANDS) + "} ...  |  jaxtl --version\n\n" + "\n".join(
            f"  {name:9s} {what}" for name, what in COMMANDS.items())
        print(usage, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        return importlib.import_module(f"jaxtl.{argv[0]}").main(argv[1:]) or 0
    except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
