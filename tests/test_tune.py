import json
import os
import subprocess
import sys

import pytest

from jaxtl import tune


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A tune file of the test's own, no XLA_FLAGS, JAX not yet started (as a command finds them)."""
    from jax._src import xla_bridge

    monkeypatch.setenv("JAXTL_TUNE_FILE", str(tmp_path / "xla-tune.json"))
    monkeypatch.setenv("XLA_FLAGS", "")  # recorded, so that teardown puts the session's value back
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(tune, "_APPLIED", tune._APPLIED)
    return tmp_path / "xla-tune.json"


def record(file, **fields):
    file.write_text(json.dumps({tune.machine_key(): {"choice": "ynnpack-off", "speedup": 1.5, **fields}}))


def test_the_measured_choice_is_added_before_jax_starts_and_a_users_own_ynnpack_flag_wins_saying_so(fresh,
                                                                                                 monkeypatch):
    record(fresh)
    said = []
    assert tune.apply(said.append) == "ynnpack-off (jaxtl tune: 1.50x the XLA default here)" == tune.in_effect()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=" and said == []
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # other flags: kept, choice added
    tune.apply(said.append)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                               "--xla_cpu_experimental_ynn_fusion_type="] and said == []
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-individual_dot")
    assert tune.apply(said.append).endswith("(the user's)")
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    assert said == ["XLA_FLAGS sets YNNPACK itself ('--xla_cpu_experimental_ynn_fusion_type=-individual_dot'): "
                    "used instead of jaxtl tune's choice (ynnpack-off)"]


@pytest.mark.parametrize("written", ["another machine", "damaged"])
def test_without_a_usable_measurement_for_this_machine_nothing_changes(fresh, written):
    if written == "damaged":
        record(fresh, choice="a setting of a later jaxtl")
    else:
        fresh.write_text(json.dumps({"another CPU | 2 cores | jax 0.1": {"choice": "ynnpack-off", "speedup": 2.0}}))
    assert tune.apply() == "xla-default" and "XLA_FLAGS" not in os.environ
    fresh.write_text("[]")  # JSON, not a record
    assert tune.apply() == "xla-default" and "XLA_FLAGS" not in os.environ


@pytest.mark.slow  # three processes, each compiling the pass twice: ~20 s
def test_jaxtl_tune_times_every_setting_keeps_the_fastest_and_the_next_command_runs_with_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAXTL_TUNE_FILE": str(tmp_path / "t.json")}
    done = subprocess.run([sys.executable, "-m", "jaxtl.tune", "--image-size", "32", "--seconds",
                           "0.2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (measurement,) = json.loads((tmp_path / "t.json").read_text()).values()
    rates = measurement["rates"]  # a jax that does not know a setting's flag: None for it
    assert set(rates) == set(tune.CANDIDATES) and rates["xla-default"] > 0
    best = max((k for k in rates if rates[k]), key=rates.get)
    assert measurement["choice"] == (best if rates[best] >= tune.MARGIN * rates["xla-default"] else "xla-default")
    assert measurement["speedup"] == pytest.approx(rates[measurement["choice"]] / rates["xla-default"])
    script = ("import os, sys; from jaxtl.command import command; "
              "sys.exit(command(lambda argv: print(os.environ.get('XLA_FLAGS')) or 0)([]))")
    seen = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert seen.stdout.strip() == tune.CANDIDATES[measurement["choice"]], seen.stderr[-2000:]
