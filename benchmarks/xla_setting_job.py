"""The default recipe's job on FSDD under each XLA:CPU setting of `jaxtl tune`: does the frozen forward's gain
(`jaxtl tune`) reach the job? Each trial is `python -m jaxtl.train` in a fresh process with the features
cached and the prefix cache cold (its pass is what the setting can change), settings alternated, repeated.

    python benchmarks/xla_setting_job.py [--repeats 2] [--max-clips 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402
from jaxtl.tune import CANDIDATES  # noqa: E402

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"


def trial(setting: str, features: Path, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        for d in (d for d in features.glob("features-*") if d.is_dir()):
            shutil.copytree(d, cache / d.name)
        env = {**os.environ, "XLA_FLAGS": CANDIDATES[setting], "JAXTL_TUNE_FILE": str(Path(tmp) / "none.json")}
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "jaxtl.train", *flags, "--cache-dir", str(cache), "--out", str(out)],
                       env=env, check=True, capture_output=True, text=True)
        summary = json.loads((out / "summary.json").read_text())
    return {"setting": setting, "wall_s": summary["wall_seconds"],
            "features_prefix_s": summary["stage_seconds"]["features+prefix"],
            "epochs_s": summary["stage_seconds"]["epochs"], "val_accuracy": summary["val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-clips", type=int, default=0)
    parser.add_argument("--recipe", default="jaxtl")
    args = parser.parse_args()
    flags = ["--recipe", args.recipe, "--data", str(FSDD), "--weights", "random", "--verbose", "0", "--workers", "2"]
    flags += ["--max-clips", str(args.max_clips)] if args.max_clips else []
    warm = Path(tempfile.mkdtemp(prefix="xla-job-features-"))
    subprocess.run([sys.executable, "-m", "jaxtl.train", *flags, "--cache-dir", str(warm), "--out",
                    str(warm / "run")], check=True, capture_output=True)  # fills the feature cache
    rows = [trial(s, warm, flags) for _ in range(args.repeats) for s in ("xla-default", "ynnpack-off")]
    shutil.rmtree(warm)
    lines = ["| setting | features+prefix pass (s) | epochs (s) | whole run (s) | val acc |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['features_prefix_s']:.1f} | {r['epochs_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['val_accuracy']:.3f} |" for r in rows]
    m = machine()
    table = "\n".join([f"Recipe {args.recipe} on FSDD ({args.max_clips or 2500} clips), features cached, prefix cold, "
                       f"random VGG16 ({m['cpu']}, {m['cores']} cores, jax {m['jax']})", "", *lines]) + "\n"
    print(table)
    name = "xla_setting_job" + ("" if args.recipe == "jaxtl" else f"-{args.recipe}") + \
        (f"-n{args.max_clips}" if args.max_clips else "")
    write_results(name, {"machine": m, "recipe": args.recipe, "rows": rows}, table)


if __name__ == "__main__":
    main()
