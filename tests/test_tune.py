import json
import os
import subprocess
import sys

import pytest

from jaxtl import tune


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """This machine's record in a tune file of the test's own, choosing YNNPACK off; JAX not yet started."""
    from jax._src import xla_bridge

    monkeypatch.setenv("JAXTL_TUNE_FILE", str(tmp_path / "xla-tune.json"))
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    (tmp_path / "xla-tune.json").write_text(json.dumps({tune.machine_key(): {"choice": "ynnpack-off",
                                                                             "speedup": 1.5}}))


def test_the_measured_choice_is_set_before_jax_starts_and_a_users_flags_win_saying_so(measured, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    said = []
    tune.apply(said.append)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=" and said == []
    assert tune.in_effect() == "ynnpack-off (jaxtl tune: 1.50x the XLA default here)"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    tune.apply(said.append)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert said == ["XLA_FLAGS is set ('--xla_force_host_platform_device_count=2'): used instead of jaxtl tune's "
                    "choice (ynnpack-off)"]


def test_without_a_measurement_for_this_machine_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_TUNE_FILE", str(tmp_path / "xla-tune.json"))
    (tmp_path / "xla-tune.json").write_text(json.dumps({"another CPU | 2 cores | jax 0.1": {"choice": "ynnpack-off",
                                                                                           "speedup": 2.0}}))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    tune.apply()
    assert "XLA_FLAGS" not in os.environ and tune.in_effect().startswith("xla-default (no jaxtl tune")


@pytest.mark.slow  # three processes, each compiling the pass twice: ~20 s
def test_jaxtl_tune_times_every_setting_keeps_the_fastest_and_the_next_command_runs_with_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAXTL_TUNE_FILE": str(tmp_path / "t.json")}
    done = subprocess.run([sys.executable, "-m", "jaxtl.tune", "--image-size", "32", "--seconds",
                           "0.2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads((tmp_path / "t.json").read_text()).values()
    rates = record["rates"]
    assert set(rates) == set(tune.CANDIDATES) and all(r > 0 for r in rates.values())
    assert record["choice"] == max(rates, key=rates.get)
    assert record["speedup"] == pytest.approx(rates[record["choice"]] / rates["xla-default"])
    script = ("import os, sys; from jaxtl.command import command; "
              "sys.exit(command(lambda argv: print(os.environ.get('XLA_FLAGS')) or 0)([]))")
    seen = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert seen.stdout.strip() == tune.CANDIDATES[record["choice"]], seen.stderr[-2000:]
