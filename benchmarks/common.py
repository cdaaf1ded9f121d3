"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "device": getattr(dev, "device_kind", dev.platform),
            "platform": dev.platform, "n_devices": len(jax.devices()), "jax": jax.__version__}


def device_tag() -> str:
    m = machine()
    name = m["device"] if m["platform"] != "cpu" else f"cpu{m['cores']}"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def write_results(name: str, payload: dict, table: str, out_dir: str | os.PathLike | None = None) -> Path:
    out = Path(out_dir or os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{device_tag()}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    return stem
