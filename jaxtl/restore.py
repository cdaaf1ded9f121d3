"""A finished (or interrupted) run as a model: what evaluate, predict and notebooks use, never the trainer.

The model is rebuilt from the run's own `config.json` at the run's own image size (a flatten head's
shape depends on it), and the state comes from one checkpoint save with its meta. An ensemble
(`--ensemble N`) is restored as its members, and predicts with the log of their mean probability.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxtl.checkpoint import CheckpointError, Checkpoints
from jaxtl.config import TrainConfig, load_config, saved_config
from jaxtl.feed import map_local, take
from jaxtl.images import RaggedFeatures
from jaxtl.model import Classifier
from jaxtl.prefix import cached_prefix
from jaxtl.sharding import make_mesh
from jaxtl.steps import use_compile_cache

MEMBERS = "members"  # RUN/members/I: the runs an ensemble averages


@dataclass
class RestoredRun:
    cfg: TrainConfig
    model: Classifier | None  # None for an ensemble: its members hold the models
    variables: dict | None  # {'params': ..., 'norm': ...}
    classes: list[str]
    meta: dict
    members: list[RestoredRun] = field(default_factory=list)


def restore_run(run_dir: str | os.PathLike, which: str = "best") -> RestoredRun:
    """The model of a run as saved in its `best` (or `latest`) checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_config(saved_config(run_dir), run_dir / "config.json")
    if cfg.ensemble > 1:
        members = [restore_run(run_dir / MEMBERS / str(i), which) for i in range(cfg.ensemble)]
        if any(m.classes != members[0].classes for m in members):
            raise CheckpointError(f"{run_dir}: the ensemble's members were trained on different classes")
        return RestoredRun(cfg, None, None, members[0].classes, members[0].meta, members)
    use_compile_cache(cfg.cache_dir)
    ckpt = Checkpoints(run_dir / "checkpoints", frozen=cfg.always_frozen())
    try:
        state, meta, _ = ckpt.restore(cfg.state_template, which)
    finally:
        ckpt.close()
    return RestoredRun(cfg, cfg.model(len(meta["classes"])), {"params": state.params, "norm": state.norm},
                       meta["classes"], meta)


def predict_logits(restored: RestoredRun, feats: RaggedFeatures, keys: list[str] | None = None,
                   batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """Logits for every clip of `feats`. With the clips' `keys`, the frozen prefix comes from the run's
    prefix cache where it holds them (the frozen weights in the checkpoint are the ones it was keyed by),
    so evaluating a run's own clips costs no second VGG16 pass."""
    if restored.members:  # the log of the members' mean probability: argmax and softmax give the ensemble's
        probs = [softmax(predict_logits(m, feats, keys, batch_size, progress)) for m in restored.members]
        return np.log(np.maximum(np.mean(probs, axis=0), np.finfo(np.float32).tiny))
    cfg, mesh, model = restored.cfg, make_mesh(), restored.model
    images, split = cfg.image_spec(), cfg.stages()[-1].split
    batch_size = batch_size or cfg.batch_size
    n = len(feats)
    if keys is not None and cfg.cache_dir and split.cached:
        params = restored.variables["params"]
        def features(ids):
            return feats.subset(ids), np.ones(len(ids), bool), []

        acts, _, _ = cached_prefix(model, params, np.arange(n), keys, features, split.k, images, mesh, cfg.cache_dir,
                                   cfg.prefix_cache_key(params, split.k),
                                   progress=progress, log=lambda *_: None)
        fn = jax.jit(lambda v, x: {"logits": model.apply(v, x, start=split.k)})
        rows_of = lambda ids: take(acts, ids)  # noqa: E731
    else:
        fn = jax.jit(lambda v, x: {"logits": model.apply(v, images.network_input(x))})
        rows_of = lambda ids: images.batch(feats, ids)  # noqa: E731
    with tqdm(total=n, desc="predict", unit="clip", disable=not progress, leave=False) as bar:
        return map_local(lambda x: fn(restored.variables, x), np.arange(n), batch_size, mesh, rows_of,
                         bar.update)["logits"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
