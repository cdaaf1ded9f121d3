"""Scores and the run report: what a person reads after train or evaluate.

`scores` turns labels and predictions into accuracy, per-class precision/recall/F1 and a confusion matrix
(train's test pass and evaluate share it). `write_report` renders RUN/report.md and RUN/report.html (the
same content, images inline) from the files in the run directory alone (config, split record, summary,
evaluation, curves), so train and evaluate both call it and neither needs the other.
"""

from __future__ import annotations

import base64
import html
import json
import shlex
from pathlib import Path

import numpy as np

from jaxtl.config import TrainConfig
from jaxtl.disk import replaced, write_text

EVALUATION = "evaluation.json"  # the latest `jaxtl evaluate` result in a run directory


def scores(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1 (the classes present), the confusion matrix over every class."""
    from sklearn.metrics import classification_report, confusion_matrix

    present = sorted(set(np.asarray(y).tolist()))
    names = [classes[i] for i in present]
    report = classification_report(y, pred, labels=present, target_names=names, output_dict=True, zero_division=0)
    return {"accuracy": float(np.mean(np.asarray(pred) == np.asarray(y))), "n": int(len(y)),
            "per_class": {c: report[c] for c in names},
            "missing_classes": [c for i, c in enumerate(classes) if i not in present],
            "confusion_matrix": confusion_matrix(y, pred, labels=list(range(len(classes)))).tolist()}


def save_confusion_png(cm, classes: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.5 + 0.55 * len(classes), 1.2 + 0.55 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def differences(config: dict) -> dict:
    """{setting: (this run's value, its recipe's)} for every setting the run changed from its recipe."""
    recipe = TrainConfig.from_recipe(config.get("recipe", "jaxtl")).__dict__
    return {k: (v, recipe.get(k)) for k, v in config.items() if k not in ("recipe", "resume") and v != recipe.get(k)}


def reproduce_command(config: dict) -> str:
    """`jaxtl train` with the recipe and every setting that differs from it."""
    flags = ["jaxtl", "train", "--recipe", config.get("recipe", "jaxtl")]
    for name, (value, _) in differences(config).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, "none" if value is None else str(value)]
    return shlex.join(flags)


def _scores_blocks(title: str, s: dict, classes: list[str], png: str | None) -> list:
    rows = [[c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1-score']:.3f}", str(int(r["support"]))]
            for c, r in s["per_class"].items()]
    blocks = [("h2", title), ("p", f"accuracy **{100 * s['accuracy']:.1f} %** on {s['n']} clips"
                              + (f"; no clip of {', '.join(s['missing_classes'])}" if s["missing_classes"] else "")),
              ("table", ["class", "precision", "recall", "F1", "clips"], rows)]
    return blocks + ([("img", png, f"{title}: confusion matrix")] if png else [])


def blocks_of(run_dir: Path) -> list:
    """The report as blocks (heading, paragraph, list, table, image, code), from the run directory's files."""
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    split = json.loads((run_dir / "split.json").read_text()) if (run_dir / "split.json").is_file() else {}
    sides = {side: 0 for side in ("train", "val", "test", "holdout")}
    for c in split.get("clips", []):
        sides[c["side"]] += 1
    sides = {side: n for side, n in sides.items() if n}
    blocks = [("h1", f"jaxtl run {run_dir.name}"), ("code", reproduce_command(config))]
    used = [f"data: {summary.get('data') or config.get('data')} ({', '.join(f'{n} {s}' for s, n in sides.items())} "
            f"clips; {len(split.get('classes', []))} classes)",
            f"weights: {summary.get('weights', '?')} (digest {summary.get('weights_digest', '?')})",
            f"recipe {config.get('recipe')}, mode {config.get('mode')}, image {config.get('image_size')} px, "
            f"taps {config.get('taps')}",
            f"device: {summary.get('n_devices', '?')} x {summary.get('device', '?')}, "
            f"{summary.get('n_processes', '?')} process(es)"]
    blocks += [("h2", "What was used"), ("list", used)]
    if summary:
        results = [f"test accuracy **{100 * summary['test_accuracy']:.1f} %** on {summary['n_test']} clips "
                   f"({summary.get('test_protocol', '')})"] if summary.get("test_accuracy") is not None else []
        hold = summary.get("holdout")
        if hold:
            results.append(f"held-out speaker {hold['group']}: **{100 * hold['accuracy']:.1f} %** on {hold['n']} "
                           "clips (speaker-independent: never trained, validated or tested on)")
        best = summary.get("best_epoch")
        if summary.get("val_accuracy") is not None and best:
            results.append(f"validation accuracy {100 * summary['val_accuracy']:.1f} % at the kept model (stage "
                           f"{best['stage']} epoch {best['epoch']}, of {summary['epochs_run']} epochs run)")
        elif summary.get("val_accuracy") is not None:
            results.append(f"validation accuracy {100 * summary['val_accuracy']:.1f} % (the members' mean probability)")
        times = summary.get("stage_seconds", {})
        blocks += [("h2", "Results"), ("list", results), ("h2", "Time per stage (seconds)"),
                   ("table", [*times, "total"], [[f"{v:.1f}" for v in times.values()]
                                                 + [f"{summary['wall_seconds']:.1f}"]])]
    if summary.get("members"):
        pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        blocks += [("h2", f"Ensemble of {len(summary['members'])} members (each a run of its own)"),
                   ("table", ["member", "seed", "validation", "test", "held-out speaker", "run"],
                    [[str(i + 1), str(m["seed"]), pct(m["val_accuracy"]), pct(m["test_accuracy"]),
                      pct(m["holdout_accuracy"]), m["out"]] for i, m in enumerate(summary["members"])])]
    if (run_dir / "curves.png").is_file():
        blocks += [("h2", "Training curves"), ("img", "curves.png", "training curves")]
    for side, title in (("test", "Test set"), ("holdout", "Held-out speaker")):
        if summary.get("scores", {}).get(side):
            png = f"confusion_{side}.png" if (run_dir / f"confusion_{side}.png").is_file() else None
            blocks += _scores_blocks(f"{title} (end of training)", summary["scores"][side], split["classes"], png)
    if (run_dir / EVALUATION).is_file():
        ev = json.loads((run_dir / EVALUATION).read_text())
        png = Path(ev["confusion_png"]).name if Path(ev["confusion_png"]).is_file() else None
        blocks += _scores_blocks(f"Evaluate: {ev['what']}", ev, ev["classes"], png)
    blocks += [("h2", f"Settings that differ from the recipe ({config.get('recipe')})"),
               ("table", ["setting", "this run", "recipe"],
                [[k, json.dumps(v), json.dumps(r)] for k, (v, r) in differences(config).items()])]
    return blocks


def to_markdown(blocks: list) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "code":
            out.append(f"```\n{rest[0]}\n```")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            head, rows = rest
            out.append("\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                                 + ["| " + " | ".join(r) + " |" for r in rows]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
    return "\n\n".join(out) + "\n"


def _html_inline(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list, run_dir: Path) -> str:
    out = ["<!doctype html><meta charset='utf-8'><title>jaxtl report</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}pre{background:#f4f4f4;padding:8px;"
           "white-space:pre-wrap}</style>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_html_inline(rest[0])}</p>")
        elif kind == "code":
            out.append(f"<pre>{html.escape(rest[0])}</pre>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            head, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
        elif kind == "img":
            data = base64.b64encode((run_dir / rest[0]).read_bytes()).decode()
            out.append(f"<p><img alt='{html.escape(rest[1])}' src='data:image/png;base64,{data}'></p>")
    return "\n".join(out) + "\n"


def write_report(run_dir) -> Path:
    """RUN/report.md and RUN/report.html from the run directory as it is now; returns the markdown's path."""
    run_dir = Path(run_dir)
    blocks = blocks_of(run_dir)
    write_text(run_dir / "report.md", to_markdown(blocks))
    write_text(run_dir / "report.html", to_html(blocks, run_dir))
    return run_dir / "report.md"
