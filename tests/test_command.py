"""Every command stopped by a signal: one line on stderr and 128 + the signal, never a traceback."""

import dataclasses
import json
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import wait_until_ready

WAITING = textwrap.dedent("""
    import importlib, json, sys, time
    name, where, given = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    module, attr = where.rsplit(".", 1)
    def wait(*a, **k):  # the command's work, as long as it takes for the signal to come
        print("ready", flush=True)
        time.sleep(60)
    setattr(importlib.import_module(module), attr, wait)
    command = importlib.import_module(f"jaxtl.{name}")
    if name == "train":
        from jaxtl.config import TrainConfig
        command.config_from_args = lambda argv: TrainConfig(**given)
    sys.exit(command.main(given if isinstance(given, list) else []))
""")


@pytest.mark.parametrize("name, where, sig, line", [
    ("predict", "jaxtl.predict.load_run", signal.SIGINT, "interrupted"),
    ("evaluate", "jaxtl.evaluate.evaluate", signal.SIGTERM, "terminated"),
    ("train", "jaxtl.prefix.compute_prefix", signal.SIGINT, "interrupted before training began; the caches keep "
     "what was done; continue with: jaxtl train --out {out} --resume"),
], ids=["predict-SIGINT", "evaluate-SIGTERM", "train-prefix-pass-SIGINT"])
def test_a_signal_ends_a_command_with_one_line_and_its_exit_code(cfg, tmp_path, name, where, sig, line):
    cfg = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache"))  # a cold prefix cache: the pass runs
    given = dataclasses.asdict(cfg) if name == "train" else ["run-dir"] + (["clip.wav"] if name == "predict" else [])
    proc = subprocess.Popen([sys.executable, "-c", WAITING, name, where, json.dumps(given)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until_ready(proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig and err == line.format(out=cfg.out) + "\n", err[-2000:]


def test_jaxtl_warnings_reach_stderr_as_their_own_lines():
    script = textwrap.dedent("""
        import logging, sys
        import orbax.checkpoint  # which gives the root logger its "LEVEL:name:message" handler
        from jaxtl.command import command
        main = command(lambda argv: logging.getLogger("jaxtl.cache").warning("warning: the cache is full") or 0)
        sys.exit(main([]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "warning: the cache is full\n", done.stderr
