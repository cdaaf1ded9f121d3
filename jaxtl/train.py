"""Training: the run config, pure train/eval steps, the loop, and `python -m jaxtl.train`.

Every mode is a split point `k` (see `jaxtl.model`): convs `[0, k)` are frozen, the rest of the base
and the head train. Frozen work is paid once: without input augmentation the frozen prefix runs once
per clip and the step trains the suffix on its cached output; with augmentation the prefix runs
forward-only inside the step. Gradients are taken of the trainable partition only, and
`optax.multi_transform` gives each label (`frozen`, `base`, `head`) its own optimizer, so the
optimizer state and the checkpoints still hold the whole tree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl import images as imagelib
from jaxtl.audio import REPRESENTATIONS, BadAudio, FeatureConfig
from jaxtl.cache import ActivationCache, cached_features, file_key, fingerprint
from jaxtl.checkpoint import CheckpointError, Checkpoints
from jaxtl.data import (
    LAYOUTS,
    SPLITS,
    DataError,
    discover,
    fetch_fsdd,
    split_indices,
    subset,
    synthetic,
)
from jaxtl.images import RaggedFeatures
from jaxtl.model import CONV_NAMES, N_CONV, Classifier
from jaxtl.sharding import (
    ProcessMismatch,
    barrier,
    batch_sharding,
    check_same_everywhere,
    global_batch,
    initialize_distributed,
    is_main_process,
    local_rows,
    make_mesh,
    prefetch,
    replicate,
    to_host,
)
from jaxtl.weights import WeightsError, resolve_weights

MODES = ("frozen", "finetune", "progressive", "scratch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(Exception):
    """A run setting that cannot work; one line naming the flag."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a run; `python -m jaxtl.train` only fills it.

    Field defaults are the seed recipe's (`--recipe seed`); `TrainConfig.from_recipe("jaxtl")` and the
    CLI's default apply the settings that make the transfer work (see RECIPES and the README).
    """

    recipe: str = _f("seed", "the recipe these settings started from (informational)")

    # data
    data: str | None = _f(None, "dataset directory or CSV manifest (default: $JAXTL_DATA, else FSDD "
                                "downloaded, else the built-in synthetic set)")
    layout: str = _f("auto", "dataset layout", choices=LAYOUTS)
    split: str = _f("stratified", "test split: stratified 80/20, by group (speaker), or as the data marks it",
                    choices=SPLITS)
    val_method: str = _f("stratified", "validation split: stratified, or the tail of the training part as "
                                       "Keras' validation_split", choices=("stratified", "tail"))
    test_size: float = _f(0.2, "fraction of clips held out for test")
    test_group: str | None = _f(None, "with --split group: the group (speaker) held out for test")
    val_size: float = _f(0.2, "fraction of the training part used for validation")
    max_clips: int | None = _f(None, "use a stratified subset of this many clips")
    train_clips: int | None = _f(None, "train (fit + validation) on a stratified subset of this many clips of the "
                                       "training split; the test split stays the same")
    split_seed: int | None = _f(None, "seed of the test/validation splits alone (default: --seed)")
    on_bad_file: str = _f("error", "a file that cannot be decoded: stop, or skip and report it",
                          choices=("error", "skip"))
    # features and images
    representation: str = _f("mfcc", "feature image", choices=REPRESENTATIONS)
    sample_rate: int = _f(22050, "resample audio to this rate (Hz)")
    n_mfcc: int = _f(13, "MFCC coefficients")
    n_fft: int = _f(2048, "FFT size")
    win_length: int | None = _f(None, "STFT window (samples; default n_fft)")
    hop_length: int = _f(512, "STFT hop (samples)")
    n_mels: int = _f(128, "mel bands")
    fmax: float | None = _f(None, "highest mel frequency (Hz; default sample_rate / 2)")
    image_size: int = _f(224, "square image side (pixels)")
    fit: str = _f("pad", "time axis: zero-pad/truncate (seed) or stretch each clip to the width",
                  choices=imagelib.FIT_MODES)
    preprocess: str = _f("unit", "network input: [0,1] images (seed) or Keras' caffe preprocessing",
                         choices=imagelib.PREPROCESS_MODES)
    band_norm: bool = _f(False, "subtract each feature band's mean over the clip (per-utterance normalisation)")
    image_dtype: str = _f("float32", "host-side image dtype; uint8 moves 4x fewer bytes to the device",
                          choices=imagelib.STORAGE_DTYPES)
    # model
    weights: str | None = _f(None, "imagenet | a weight file | random (default: imagenet when found, "
                                   "else random init, announced)")
    mode: str = _f("frozen", "what trains", choices=MODES)
    finetune_convs: int = _f(3, "conv layers unfrozen by finetune/progressive (3 = the last block)")
    hidden: int = _f(256, "head hidden units (0: a linear head)")
    dropout: float = _f(0.0, "head dropout rate")
    pooling: str = _f("flatten", "how the head sees each tapped block's output",
                      choices=("flatten", "avg", "avgmax"))
    taps: str = _f("5", "blocks whose pooled outputs feed the head, e.g. 3,4,5 (the seed: 5)")
    normalize: bool = _f(False, "standardise head inputs with statistics of the training split")
    dtype: str = _f("float32", "compute dtype of the convolutions (params stay float32)", choices=tuple(DTYPES))
    # optimisation
    epochs: int = _f(10, "epochs (stage 1 of progressive)")
    finetune_epochs: int = _f(10, "epochs of progressive's stage 2")
    batch_size: int = _f(32, "global batch size")
    lr: float = _f(1e-3, "Adam learning rate of the head")
    base_lr: float = _f(1e-5, "Adam learning rate of unfrozen base layers")
    weight_decay: float = _f(0.0, "decoupled weight decay of the head")
    patience: int = _f(3, "early stopping patience in epochs on validation loss (0: off)")
    plateau_patience: int = _f(2, "epochs without improvement before the learning rate is cut (0: off)")
    plateau_factor: float = _f(0.5, "learning-rate factor on a plateau")
    # augmentation (any of these runs the frozen prefix inside the step)
    noise_std: float = _f(0.0, "Gaussian noise std added to [0,1] images")
    time_shift: int = _f(0, "random circular time shift of up to this many image columns")
    time_mask: int = _f(0, "SpecAugment time mask of up to this many columns")
    freq_mask: int = _f(0, "SpecAugment frequency mask of up to this many rows")
    augment_copies: int = _f(0, "offline: pitch-shifted, time-stretched copies of each training clip (cached)")
    pitch_shift: float = _f(2.0, "largest pitch shift of a copy, in semitones")
    time_stretch: float = _f(0.1, "largest tempo change of a copy (0.1: rates 0.9 to 1.1)")
    # run
    seed: int = _f(42, "seed of splits, init, shuffling and augmentation")
    init_seed: int | None = _f(None, "seed of a random base's init alone (default: --seed)")
    out: str | None = _f(None, "run directory (default: a new runs/RECIPE-YYYYmmdd-HHMMSS)")
    resume: bool = _f(False, "continue the run in --out from its latest checkpoint")
    cache_dir: str | None = _f(".jaxtl_cache", "feature cache directory ('' to disable)")
    cache_prefix: bool = _f(True, "run the frozen prefix once per clip when inputs do not change")
    workers: int | None = _f(None, "feature extraction processes (default: all cores)")
    keep_checkpoints: int = _f(2, "latest checkpoints kept")
    progress: bool = _f(True, "progress bars")
    # several cooperating processes (hosts); default: the usual environment variables, else one process
    coordinator: str | None = _f(None, "multi-process: coordinator address host:port")
    num_processes: int | None = _f(None, "multi-process: number of processes")
    process_id: int | None = _f(None, "multi-process: this process's id")

    def validate(self) -> TrainConfig:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: use one of {choices}")
        checks = [
            (self.image_size >= 32, "--image-size must be at least 32 (five 2x2 pools)"),
            (self.batch_size >= 1, "--batch-size must be positive"),
            (self.epochs >= 0 and self.finetune_epochs >= 0, "--epochs must not be negative"),
            (0 < self.test_size < 1, "--test-size must be between 0 and 1"),
            (0 <= self.val_size < 1, "--val-size must be in [0, 1)"),
            (1 <= self.finetune_convs <= N_CONV, f"--finetune-convs must be in 1..{N_CONV}"),
            (self.lr > 0 and self.base_lr > 0, "learning rates must be positive"),
            (not (self.mode == "scratch" and self.weights not in (None, "random")),
             "--mode scratch trains from random init; drop --weights"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        _ = self.tap_blocks
        return self

    @classmethod
    def from_recipe(cls, recipe: str = "jaxtl", **overrides) -> TrainConfig:
        if recipe not in RECIPES:
            raise ConfigError(f"--recipe {recipe!r}: use one of {tuple(RECIPES)}")
        return cls(**{**RECIPES[recipe], "recipe": recipe, **overrides})

    @property
    def augments(self) -> bool:
        return bool(self.noise_std or self.time_shift or self.time_mask or self.freq_mask)

    def features(self) -> FeatureConfig:
        return FeatureConfig(representation=self.representation, sample_rate=self.sample_rate,
                             n_mfcc=self.n_mfcc, n_fft=self.n_fft, win_length=self.win_length,
                             hop_length=self.hop_length, n_mels=self.n_mels, fmax=self.fmax)

    def model(self, num_classes: int) -> Classifier:
        return Classifier(num_classes, hidden=self.hidden, dropout=self.dropout, pooling=self.pooling,
                          normalize=self.normalize, dtype=DTYPES[self.dtype], taps=self.tap_blocks)

    @property
    def tap_blocks(self) -> tuple[int, ...]:
        try:
            blocks = tuple(sorted({int(b) for b in self.taps.split(",")}))
        except ValueError:
            blocks = ()
        if not blocks or not all(1 <= b <= 5 for b in blocks):
            raise ConfigError(f"--taps {self.taps!r}: give blocks 1..5 separated by commas, e.g. 3,4,5")
        return blocks

    def stages(self) -> list[tuple[int, int, float]]:
        """(split k, epochs, base learning rate) for each training stage."""
        k_tune = N_CONV - self.finetune_convs
        return {"frozen": [(N_CONV, self.epochs, self.base_lr)],
                "finetune": [(k_tune, self.epochs, self.base_lr)],
                "progressive": [(N_CONV, self.epochs, self.base_lr), (k_tune, self.finetune_epochs, self.base_lr)],
                "scratch": [(0, self.epochs, self.lr)]}[self.mode]


# Settings that differ from the seed recipe's, with the evidence in benchmarks/results (README, "Transfer
# quality"): standardised features from blocks 3-5 (avg+max pooled) into a linear head with early stopping,
# and log-mel images of the audio's own band, stretched to the width, with VGG16's own preprocessing.
RECIPES: dict[str, dict] = {
    "seed": {},
    "jaxtl": {
        "representation": "logmel", "sample_rate": 8000, "n_fft": 512, "win_length": 256, "hop_length": 64,
        "n_mels": 128, "fmax": 4000.0, "fit": "stretch", "preprocess": "caffe", "image_dtype": "uint8",
        "taps": "3,4,5", "pooling": "avgmax", "normalize": True, "hidden": 0, "weight_decay": 1e-4,
        "epochs": 100, "patience": 10, "plateau_patience": 4,
    },
}


# ---------------------------------------------------------------------------------------------------
# Pure functions: labels, optimizer, state, steps.


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    norm: Any  # fixed head-input statistics ({} when unused)
    lr_scale: jax.Array  # cut by reduce-on-plateau; multiplies every update


def param_labels(params, k: int):
    """`frozen` for base convs before the split, `base` after it, `head` for the head."""
    frozen = set(CONV_NAMES[:k])
    base = {name: jax.tree.map(lambda _: "frozen" if name in frozen else "base", p)
            for name, p in params["base"].items()}
    return {"base": base, "head": jax.tree.map(lambda _: "head", params["head"])}


def make_optimizer(cfg: TrainConfig, labels, base_lr: float) -> optax.GradientTransformation:
    head = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(cfg.lr)
    return optax.multi_transform({"frozen": optax.set_to_zero(), "base": optax.adam(base_lr), "head": head},
                                 labels)


def partition(tree, labels):
    """(trainable, frozen): two trees of the same structure, None where the other one holds the leaf."""
    trainable = jax.tree.map(lambda x, lab: None if lab == "frozen" else x, tree, labels)
    frozen = jax.tree.map(lambda x, lab: x if lab == "frozen" else None, tree, labels)
    return trainable, frozen


def merge(a, b):
    return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def split_frozen(params, k: int) -> tuple[dict, dict]:
    """(convs [0, k), everything else): the first part is saved once per run, the second every epoch."""
    frozen = set(CONV_NAMES[:k])
    base = params["base"]
    return ({n: p for n, p in base.items() if n in frozen},
            {**params, "base": {n: p for n, p in base.items() if n not in frozen}})


def join_frozen(frozen: dict, rest: dict) -> dict:
    return {**rest, "base": {**frozen, **rest["base"]}}


def save_state(ckpt: Checkpoints, step: int, state: TrainState, meta: dict, best: bool, k_frozen: int) -> None:
    ckpt.save(step, state.replace(params=split_frozen(state.params, k_frozen)[1]), meta, best)


def restore_state(ckpt: Checkpoints, template_for: Callable[[dict], TrainState], k_frozen: int,
                  which: str = "latest") -> tuple[TrainState, dict, int]:
    """(state, meta, step) of the newest readable save in `which`, its frozen convs from the run's `frozen/`.

    `template_for(meta)` gives the state's shapes for the stage that save's meta names."""
    def trained_part(meta):
        template = template_for(meta)
        return template.replace(params=split_frozen(template.params, k_frozen)[1])

    state, meta, step = ckpt.restore(trained_part, which)
    frozen = ckpt.restore_frozen(split_frozen(template_for(meta).params, k_frozen)[0])
    return state.replace(params=join_frozen(frozen, state.params)), meta, step


def state_template(model: Classifier, cfg: TrainConfig, stage: int) -> TrainState:
    """Shapes and dtypes of a stage's train state at the run's own image size, computed without compute."""
    k, _, base_lr = cfg.stages()[stage]

    def build():
        params, norm = init_params(model, cfg, (1, cfg.image_size, cfg.image_size, 3), None)
        return create_train_state(params, norm, make_optimizer(cfg, param_labels(params, k), base_lr))

    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # restored whole into each process
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), jax.eval_shape(build))


def create_train_state(params, norm, tx) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), norm=norm,
                      lr_scale=jnp.ones((), jnp.float32))


def augment(images, rng, cfg: TrainConfig):
    """Noise, random time shift and SpecAugment masks on (N, H, W, 3) [0,1] images, per clip."""
    n, h, w, _ = images.shape
    k_noise, k_shift, k_t, k_tw, k_f, k_fw = jax.random.split(rng, 6)
    if cfg.time_shift:
        shift = jax.random.randint(k_shift, (n,), -cfg.time_shift, cfg.time_shift + 1)
        cols = (jnp.arange(w)[None, :] - shift[:, None]) % w
        images = jnp.take_along_axis(images, cols[:, None, :, None], axis=2)
    for size, axis, k_pos, k_width in ((cfg.time_mask, 2, k_t, k_tw), (cfg.freq_mask, 1, k_f, k_fw)):
        if size:
            extent = images.shape[axis]
            width = jax.random.randint(k_width, (n,), 0, size + 1)
            start = jax.random.randint(k_pos, (n,), 0, extent) - width // 2
            pos = jnp.arange(extent)[None, :]
            masked = (pos >= start[:, None]) & (pos < start[:, None] + width[:, None])
            shape = (n, extent, 1, 1) if axis == 1 else (n, 1, extent, 1)
            images = jnp.where(masked.reshape(shape), 0.0, images)
    if cfg.noise_std:
        images = images + cfg.noise_std * jax.random.normal(k_noise, images.shape)
    return images


def forward(params, norm, x, rng, *, model: Classifier, cfg: TrainConfig, k: int, cached: bool, train: bool):
    """Logits from the step's input: the split-point inputs at k (`cached`), else [0,1] images."""
    variables = {"params": params, "norm": norm}
    if not cached:
        x = imagelib.decode(x)
        if train and cfg.augments:
            x = augment(x, jax.random.fold_in(rng, 1), cfg)
        x = imagelib.preprocess(x, cfg.preprocess)
        if k:
            x = jax.lax.stop_gradient(model.apply(variables, x, k, method=Classifier.prefix))
    return model.apply(variables, x, train=train, start=k, rngs={"dropout": rng} if train else {})


def _loss_and_metrics(logits, y, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    metrics = jnp.stack([jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)])
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), metrics


def train_step(state: TrainState, batch, rng, *, model, cfg, tx, labels, k, cached):
    """One update of the trainable partition; frozen leaves pass through untouched (and uncopied)."""
    trainable, frozen = partition(state.params, labels)
    step_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(tr):
        logits = forward(merge(tr, frozen), state.norm, batch["x"], step_rng, model=model, cfg=cfg, k=k,
                         cached=cached, train=True)
        return _loss_and_metrics(logits, batch["y"], batch["mask"])

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = merge(grads, jax.tree.map(jnp.zeros_like, frozen))  # set_to_zero never reads these
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale, partition(updates, labels)[0])
    params = merge(optax.apply_updates(trainable, updates), frozen)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch, *, model, cfg, k, cached):
    logits = forward(state.params, state.norm, batch["x"], None, model=model, cfg=cfg, k=k, cached=cached,
                     train=False)
    return _loss_and_metrics(logits, batch["y"], batch["mask"])[1], logits


# ---------------------------------------------------------------------------------------------------
# Host side: data preparation, batches, the loop.


@dataclass
class Prepared:
    paths: list[str]  # per clip; an augmentation copy repeats its source's path
    keys: list[str]  # per clip: identity of its audio (file, and perturbation for a copy)
    feats: RaggedFeatures
    y: np.ndarray
    classes: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    skipped: list[BadAudio]
    data_source: str
    n_files: int  # clips [0, n_files) are files; augmentation copies follow



def resolve_data(cfg: TrainConfig, log: Callable = print) -> str:
    if cfg.data:
        return cfg.data
    if os.environ.get("JAXTL_DATA"):
        return os.environ["JAXTL_DATA"]
    cache = Path(cfg.cache_dir or ".jaxtl_cache")
    try:
        return str(fetch_fsdd(cache))
    except DataError as e:
        root = synthetic(cache)
        log(f"*** no --data given and FSDD cannot be downloaded ({e}); using the built-in SYNTHETIC dataset "
            f"at {root} (4 classes of generated sounds, 24 clips each) ***")
        return str(root)


def _features(paths, cfg: TrainConfig, perturb=None):
    """Features through the cache; process 0 fills it, the others then read it."""
    if not is_main_process():
        barrier("features")
    out = cached_features(paths, cfg.features(), cfg.cache_dir or None, cfg.workers,
                          cfg.progress and is_main_process(), perturb)
    if is_main_process():
        barrier("features")
    return out


def augmentation_copies(paths: list[str], cfg: TrainConfig) -> list[tuple[int, tuple[float, float]]]:
    """(source clip, (semitones, tempo rate)) of every offline copy; fixed per file, so the caches reuse them."""
    copies = []
    for i, path in enumerate(paths):
        for j in range(cfg.augment_copies):
            rng = np.random.default_rng([j, zlib.crc32(os.path.basename(path).encode())])
            copies.append((i, (float(rng.uniform(-cfg.pitch_shift, cfg.pitch_shift)),
                               float(rng.uniform(1 - cfg.time_stretch, 1 + cfg.time_stretch)))))
    return copies


def prepare(cfg: TrainConfig, log: Callable = print) -> Prepared:
    """Files -> features -> labels -> splits (+ augmentation copies of training clips), with bad files
    handled as `--on-bad-file` says."""
    source = resolve_data(cfg, log)
    ds = discover(source, cfg.layout)
    classes = list(ds.encoder().classes_)
    y_all = np.searchsorted(classes, ds.labels)
    keep = subset(y_all, cfg.max_clips, cfg.seed, classes)
    paths = [ds.paths[i] for i in keep]
    bad = list(ds.bad)
    if bad and cfg.on_bad_file == "error":
        raise DataError(f"{bad[0]} (use --on-bad-file skip to go on without it)")
    feats, errors, (hits, misses) = _features(paths, cfg)
    log(f"features: {len(paths)} clips ({hits} from cache, {misses} computed) from {source} [{ds.layout}]")
    if errors and cfg.on_bad_file == "error":
        raise DataError(f"{errors[0]} (use --on-bad-file skip to go on without it)")
    ok = [i for i, f in enumerate(feats) if f is not None]
    paths, feats = [paths[i] for i in ok], [feats[i] for i in ok]
    y = y_all[keep][ok]
    groups = [ds.groups[keep[i]] for i in ok]
    given = [ds.splits[keep[i]] for i in ok]
    train, val, test = split_indices(y, groups, given, cfg.split, cfg.test_size, cfg.val_size, cfg.seed, classes,
                                     cfg.val_method, cfg.test_group, cfg.train_clips, cfg.split_seed)
    keys = [file_key(p) for p in paths]
    n_files = len(paths)
    if cfg.augment_copies:
        copies = augmentation_copies([paths[i] for i in train], cfg)
        sources = [int(train[i]) for i, _ in copies]
        extra, extra_errors, (hits, misses) = _features([paths[i] for i in sources], cfg, [p for _, p in copies])
        log(f"augmentation: {len(copies)} pitch/tempo copies of training clips ({hits} from cache)")
        if extra_errors:
            raise DataError(f"augmentation failed: {extra_errors[0]}")
        train = np.concatenate([train, len(paths) + np.arange(len(copies))])
        keys += [file_key(paths[i], p) for i, (_, p) in zip(sources, copies)]
        paths, feats, y = paths + [paths[i] for i in sources], feats + extra, np.concatenate([y, y[sources]])
    return Prepared(paths, keys, RaggedFeatures.from_list(feats), y, classes, train, val, test, bad + errors, source,
                    n_files)


SPLIT_RECORD = "split.json"


def split_record(prep: Prepared) -> dict:
    """Every file's path, label and side (train, val, test), with its size and mtime to notice a file changed
    since: `evaluate RUN` uses exactly this test set, whatever the data folder holds later."""
    side = {int(i): name for name, ids in (("train", prep.train), ("val", prep.val), ("test", prep.test))
            for i in ids if i < prep.n_files}
    clips = []
    for i, name in sorted(side.items()):
        st = os.stat(prep.paths[i])
        clips.append({"path": os.path.abspath(prep.paths[i]), "label": prep.classes[prep.y[i]], "side": name,
                      "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"data": prep.data_source, "classes": prep.classes, "clips": clips}


def read_split_record(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path.parent}: no {SPLIT_RECORD} (a run of an older jaxtl): evaluate it with --data DIR")
    return json.loads(path.read_text())


def check_same_split(record: dict, path: Path) -> None:
    """A resumed run must train on the clips it started with."""
    recorded = {(c["path"], c["side"]) for c in read_split_record(path)["clips"]}
    now = {(c["path"], c["side"]) for c in record["clips"]}
    if now != recorded:
        changed = sorted(now ^ recorded)[0][0]
        raise DataError(f"--resume: the data changed since the run started ({changed} is not where {path} "
                        "puts it); resume with the data as it was, or start a new run")


def image_batch(feats: RaggedFeatures, idx: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    width = cfg.image_size if cfg.fit == "pad" else None
    batch, lengths = feats.padded(idx, width)
    return imagelib.to_images(batch, lengths, cfg.image_size, cfg.fit, cfg.image_dtype, cfg.band_norm)


def batches(n: int, batch_size: int, multiple: int, rng: np.random.Generator | None):
    """Index batches covering 0..n-1 once; the last is padded to full size and masked."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    size = -(-batch_size // multiple) * multiple
    for start in range(0, n, size):
        idx = order[start:start + size]
        mask = np.zeros(size, np.float32)
        mask[:len(idx)] = 1.0
        yield np.concatenate([idx, np.full(size - len(idx), idx[0])]), mask


def even_batch_size(n: int, largest: int, multiple: int) -> int:
    """The batch size that covers n rows in as few batches as `largest` allows with the least padding:
    100 clips at 64 are two batches of 50, not 64 + 36 padded to 64 (a fifth of the work wasted)."""
    n_batches = -(-n // largest)
    rows = -(-n // n_batches)
    return -(-rows // multiple) * multiple


def take(acts: dict, ids: np.ndarray) -> dict:
    return {name: a[ids] for name, a in acts.items()}


class Inputs:
    """What a step eats for a set of clips: cached split-point inputs (`{"h", "taps"}`), or images."""

    def __init__(self, prep: Prepared, cfg: TrainConfig, acts: dict | None):
        self.prep, self.cfg, self.acts = prep, cfg, acts
        self._device = None

    def on_device(self, mesh) -> dict:
        """The cached inputs and labels of every clip, replicated on the devices (moved once)."""
        if self._device is None:
            self._device = replicate(mesh, {"x": self.acts, "y": self.prep.y.astype(np.int32)})
        return self._device

    def __call__(self, clip_ids: np.ndarray):
        if self.acts is not None:
            return take(self.acts, clip_ids)
        return image_batch(self.prep.feats, clip_ids, self.cfg)


def fit_normalizer(head_inputs: np.ndarray) -> dict:
    """Per-feature mean and inverse std; the std floor keeps dead features (all zeros) harmless."""
    mean = head_inputs.mean(0)
    std = head_inputs.std(0)
    scale = 1.0 / (std + 1e-2 * std.mean() + 1e-12)
    return {"head": {"mean": jnp.asarray(mean, jnp.float32), "scale": jnp.asarray(scale, jnp.float32)}}


def _host_inputs(out: dict):
    """Drop what a split point does not carry (no activation at k = 13)."""
    return {name: a for name, a in out.items() if a is not None}


def compute_prefix(model, params, prep: Prepared, cfg: TrainConfig, k: int, mesh, desc: str,
                   ids: np.ndarray | None = None) -> dict:
    """Split-point inputs at k for the clips `ids` (default: all), computed once (forward only, jitted)."""
    from tqdm.auto import tqdm

    @jax.jit
    def run(params, x):
        x = imagelib.preprocess(imagelib.decode(x), cfg.preprocess)
        return _host_inputs(model.apply({"params": params}, x, k, method=Classifier.prefix))

    ids = np.arange(len(prep.y)) if ids is None else ids
    n = len(ids)
    out: dict[str, np.ndarray] = {}
    size = even_batch_size(n, cfg.batch_size * 2, mesh.size)
    batch_iter = ((idx, mask, image_batch(prep.feats, ids[local_rows(idx)[0]], cfg)) for idx, mask in
                  batches(n, size, mesh.size, None))
    with tqdm(total=n, desc=desc, unit="clip", disable=not cfg.progress or not is_main_process(), leave=False) as bar:
        for idx, mask, x in prefetch(batch_iter):  # each process computes its rows; all receive every row
            acts = jax.tree.map(to_host, run(params, global_batch(mesh, {"x": x})["x"]))
            real = mask > 0
            for name, a in acts.items():
                out.setdefault(name, np.zeros((n,) + a.shape[1:], a.dtype))[idx[real]] = a[real]
            bar.update(int(real.sum()))
    return out


def prefix_activations(model, params, prep: Prepared, cfg: TrainConfig, k: int, mesh, log: Callable) -> dict:
    """`compute_prefix`, kept on disk per clip and keyed by the prefix weights and settings, so a rerun
    computes only clips it has not seen."""
    if not cfg.cache_dir:
        return compute_prefix(model, params, prep, cfg, k, mesh, "frozen prefix")
    weights = [np.asarray(leaf) for name in CONV_NAMES[:k] for leaf in jax.tree.leaves(params["base"][name])]
    key = fingerprint(cfg.features().key(), cfg.image_size, cfg.fit, cfg.preprocess, cfg.image_dtype, cfg.dtype, k,
                      cfg.taps, cfg.pooling, *weights, *(["band_norm"] if cfg.band_norm else []))
    store = ActivationCache(cfg.cache_dir, key)
    stored_keys, stored = store.load()
    where = {c: i for i, c in enumerate(stored_keys)}
    have = np.array([i for i, c in enumerate(prep.keys) if c in where], np.int64)
    missing = np.array([i for i, c in enumerate(prep.keys) if c not in where], np.int64)
    if not len(missing):
        log(f"frozen prefix: {len(prep.keys)} clips from {store.path}")
        return {name: a[[where[prep.keys[i]] for i in have]] for name, a in stored.items()}
    t = time.perf_counter()
    new = compute_prefix(model, params, prep, cfg, k, mesh, "frozen prefix", missing)
    secs = time.perf_counter() - t
    log(f"frozen prefix: {len(missing)} clips in {secs:.1f}s ({len(missing) / secs:.1f} clips/s), "
        f"{len(have)} from {store.path}")
    out = {}
    for name, a in new.items():
        out[name] = np.zeros((len(prep.keys),) + a.shape[1:], a.dtype)
        out[name][missing] = a
        if len(have):
            out[name][have] = stored[name][[where[prep.keys[i]] for i in have]]
    if is_main_process():
        store.add([prep.keys[i] for i in missing], new)
    return out


def _scan_epoch(step, state, data, idx, mask, *, sharding, train: bool):
    """Every batch of an epoch as one device program, gathering batches from inputs kept on the device."""

    def body(state, batch_rows):
        i, m = batch_rows
        batch = {"x": jax.tree.map(lambda a: a[i], data["x"]), "y": data["y"][i], "mask": m}
        batch = jax.lax.with_sharding_constraint(batch, sharding)
        if train:
            return step(state, batch)
        return state, step(state, batch)[0]

    return jax.lax.scan(body, state, (idx, mask))


class Steps:
    """The jitted programs of one training stage.

    Host-fed inputs (images) go through one jitted step per batch, prepared on a host thread. When the
    step is the head alone on cached inputs, those live on the device and a whole epoch is one
    `lax.scan`: no host round trip per step, which otherwise costs more than the step itself. A step
    that holds convolutions stays one program per batch: XLA:CPU runs convolutions inside a loop body
    about 90x slower (block 5 fine-tuning, 112x112, 2 steps of 32: 65 s scanned, 0.72 s as two calls).
    """

    def __init__(self, model, cfg: TrainConfig, tx, labels, k: int, cached: bool, rng, mesh):
        self.scanned = cached and k == N_CONV
        train = functools.partial(train_step, rng=rng, model=model, cfg=cfg, tx=tx, labels=labels, k=k,
                                  cached=cached)
        evaluate = functools.partial(eval_step, model=model, cfg=cfg, k=k, cached=cached)
        self.train, self.eval = jax.jit(train), jax.jit(evaluate)
        sharding = batch_sharding(mesh)
        self.train_scan = jax.jit(functools.partial(_scan_epoch, train, sharding=sharding, train=True))
        self.eval_scan = jax.jit(functools.partial(_scan_epoch, evaluate, sharding=sharding, train=False))


def _diverged(step: int, desc: str) -> FloatingPointError:
    return FloatingPointError(f"training diverged: non-finite loss at step {step} ({desc}); stopped before "
                              "saving it, the last good checkpoint stays in place")


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compile_time():
    """Seconds JAX spends tracing and compiling inside the block (a one-element list, filled as it goes), so
    reported speeds can leave compilation out and report it on its own."""
    total = [0.0]

    def listener(event: str, seconds: float, **_):
        if event in COMPILE_EVENTS:
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def run_epoch(steps: Steps, state, inputs: Inputs, clip_ids, cfg, mesh, rng, desc, train: bool):
    """One pass over clip_ids; returns state and (mean loss, accuracy, clips, seconds, compile seconds), the
    seconds without the compile."""
    with compile_time() as compiled:
        t0 = time.perf_counter()
        state, totals = _epoch(steps, state, inputs, clip_ids, cfg, mesh, rng, desc, train)
        wall = time.perf_counter() - t0
    t = totals
    return state, (float(t[0] / max(t[2], 1)), float(t[1] / max(t[2], 1)), int(t[2]), wall - compiled[0],
                   compiled[0])


def _epoch(steps: Steps, state, inputs: Inputs, clip_ids, cfg, mesh, rng, desc, train: bool):
    order_rng = np.random.default_rng(rng) if train else None
    plan = list(batches(len(clip_ids), cfg.batch_size, mesh.size, order_rng))
    if steps.scanned:
        idx = np.stack([clip_ids[i] for i, _ in plan]).astype(np.int32)
        mask = np.stack([m for _, m in plan])
        first = int(state.step)
        scan = steps.train_scan if train else steps.eval_scan
        state, per_step = scan(state, inputs.on_device(mesh), idx, mask)
        per_step = np.asarray(per_step)
        bad = np.flatnonzero(~np.isfinite(per_step[:, 0]))
        if train and len(bad):
            raise _diverged(first + int(bad[0]) + 1, desc)
        totals = per_step.sum(0)
    else:
        state, totals = _host_fed_epoch(steps, state, inputs, clip_ids, plan, cfg, mesh, desc, train)
    return state, totals


def _host_fed_epoch(steps: Steps, state, inputs: Inputs, clip_ids, plan, cfg, mesh, desc, train: bool):
    from tqdm.auto import tqdm

    host = ((idx, mask, inputs(clip_ids[local_rows(idx)[0]])) for idx, mask in plan)
    totals, first_bad = jnp.zeros(3), jnp.asarray(-1)
    show = cfg.progress and is_main_process()
    with tqdm(total=len(plan), desc=desc, unit="batch", disable=not show, leave=False) as bar:
        for i, (idx, mask, x) in enumerate(prefetch(host)):
            idx, mask = local_rows(idx, mask)
            y = inputs.prep.y[clip_ids[idx]].astype(np.int32)
            batch = global_batch(mesh, {"x": x, "y": y, "mask": mask})
            if train:
                state, metrics = steps.train(state, batch)
                bad = ~jnp.isfinite(metrics[0]) & (first_bad < 0)
                first_bad = jnp.where(bad, state.step, first_bad)  # stays on device: no sync per step
            else:
                metrics, _ = steps.eval(state, batch)
            totals = totals + metrics
            bar.update(1)
            if show and (i % 10 == 0 or i == len(plan) - 1):
                t = np.asarray(totals)
                bar.set_postfix(loss=f"{t[0] / max(t[2], 1):.4f}", acc=f"{t[1] / max(t[2], 1):.3f}")
    if int(first_bad) >= 0:
        raise _diverged(int(first_bad), desc)
    return state, np.asarray(totals)


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", axes[0]), ("acc", axes[1])):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        if any(h.get(f"val_{key}") is not None for h in history):
            ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def init_params(model: Classifier, cfg: TrainConfig, sample_shape, base_variables):
    """Params with the base from `base_variables`, else random (from `--init-seed` when given)."""
    init = jax.jit(model.init)
    x = jnp.zeros(sample_shape, jnp.float32)
    variables = init(jax.random.PRNGKey(cfg.seed), x)
    params = flax.core.unfreeze(variables["params"])
    if base_variables is not None:
        params["base"] = jax.tree.map(jnp.asarray, base_variables["params"])
    elif cfg.init_seed is not None:
        params["base"] = flax.core.unfreeze(init(jax.random.PRNGKey(cfg.init_seed), x)["params"]["base"])
    return params, dict(variables.get("norm", {}))


def resolve_run_weights(cfg: TrainConfig, log: Callable) -> tuple[dict | None, str, str]:
    """(base variables or None for random init, where they came from, their digest), the same in every process:
    process 0 resolves first (and downloads, if it must), the others then find its file, and a run whose
    processes ended up with different weights stops."""
    if not is_main_process():
        barrier("weights")
    base_vars, source = _resolve_weights(cfg, log)
    if is_main_process():
        barrier("weights")
    digest = "random" if base_vars is None else fingerprint(*(np.asarray(a) for a in jax.tree.leaves(base_vars)))
    check_same_everywhere(digest, "weights", "give every process the same --weights FILE")
    return base_vars, source, digest


def _resolve_weights(cfg: TrainConfig, log: Callable) -> tuple[dict | None, str]:
    if cfg.mode == "scratch":
        return None, "random init (scratch)"
    if cfg.weights is not None:
        return resolve_weights(cfg.weights)
    try:
        return resolve_weights("imagenet")
    except WeightsError as e:
        log(f"*** ImageNet weights unavailable ({e}); training on a RANDOMLY INITIALISED VGG16 base. "
            "Pass --weights FILE to use a weight file. ***")
        return None, "random init (ImageNet weights unavailable)"


@dataclass
class Plateau:
    """Early stopping and reduce-on-plateau counters, both on the monitored (validation) loss."""

    best: float = float("inf")
    bad: int = 0
    plateau_bad: int = 0

    def update(self, loss: float, cfg: TrainConfig) -> tuple[bool, bool]:
        """(improved, cut the learning rate) after an epoch with this loss."""
        if loss < self.best - 1e-7:
            self.best, self.bad, self.plateau_bad = loss, 0, 0
            return True, False
        self.bad += 1
        self.plateau_bad += 1
        cut = bool(cfg.plateau_patience) and self.plateau_bad >= cfg.plateau_patience
        if cut:
            self.plateau_bad = 0
        return False, cut

    def stop(self, cfg: TrainConfig) -> bool:
        return bool(cfg.patience) and self.bad >= cfg.patience


def saved_config(out: str | os.PathLike) -> dict:
    path = Path(out) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{out} holds no run (no config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None


def load_config(settings: dict, where) -> TrainConfig:
    """A saved config as a TrainConfig; settings this version does not know are a one-line error."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{where}: written by another jaxtl version (settings {', '.join(unknown)} are unknown "
                          "here); use that version, or start a new run")
    return TrainConfig(**settings)


def _open_run(cfg: TrainConfig) -> TrainConfig:
    """Validate, refuse to overwrite a run, and record the config in the run directory."""
    cfg.validate()
    if cfg.out is None:
        if jax.process_count() > 1:
            raise ConfigError("several processes need one run directory: give --out")
        cfg = dataclasses.replace(cfg, out=f"runs/{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(cfg.out)
    if (out / "checkpoints").exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    if cfg.resume:
        saved_config(out)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return cfg


def run(cfg: TrainConfig, log: Callable = print, on_epoch_end: Callable | None = None) -> dict:
    """Train as `cfg` says; returns the summary (also written to OUT/summary.json)."""
    log = log if is_main_process() else (lambda *_: None)
    cfg = _open_run(cfg)
    out, main_process = Path(cfg.out), is_main_process()
    t_start = time.perf_counter()
    prep = prepare(cfg, log)
    record = split_record(prep)
    if cfg.resume and (out / SPLIT_RECORD).is_file():
        check_same_split(record, out / SPLIT_RECORD)
    if main_process:
        _write_json(out / SPLIT_RECORD, record)
    if prep.skipped and main_process:
        (out / "skipped.tsv").write_text("".join(f"{e.path}\t{e.reason}\n" for e in prep.skipped))
    base_vars, weights_source, weights_digest = resolve_run_weights(cfg, log)
    log(f"weights: {weights_source} (digest {weights_digest})")
    mesh = make_mesh()
    model = cfg.model(len(prep.classes))
    params, norm = init_params(model, cfg, (1, cfg.image_size, cfg.image_size, 3), base_vars)
    stages = cfg.stages()
    k_min = min(k for k, _, _ in stages)
    cached = cfg.cache_prefix and not cfg.augments and k_min > 0
    acts_min = prefix_activations(model, params, prep, cfg, k_min, mesh, log) if cached else None
    log(f"data: {len(prep.train)} train / {len(prep.val)} val / {len(prep.test)} test clips, "
        f"{len(prep.classes)} classes; mode {cfg.mode}; prefix {'cached' if cached else 'in the step'}; "
        f"{mesh.size} device(s), {jax.process_count()} process(es)")

    def inputs_at(k: int) -> Inputs:  # a later split's input is one cheap suffix pass over the cached one
        acts = acts_min if not cached or k == k_min else _advance(model, params, acts_min, k_min, k, cfg)
        return Inputs(prep, cfg, acts)

    ckpt = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    ckpt.save_frozen(jax.tree.map(np.asarray, split_frozen(params, k_min)[0]))
    meta_base = {"classes": prep.classes, "config": dataclasses.asdict(cfg), "weights": weights_source,
                 "weights_digest": weights_digest}
    template_for = lambda meta: state_template(model, cfg, meta["stage"])  # noqa: E731
    start_stage, start_epoch, plateau, resumed_state = 0, 0, Plateau(), None
    if cfg.resume and ckpt.steps():  # state, epoch, stage and counters all from one save
        resumed_state, meta, step = restore_state(ckpt, template_for, k_min)
        start_stage, start_epoch, plateau = meta["stage"], meta["epoch"] + 1, Plateau(**meta["counters"])
        log(f"resumed {out} after stage {start_stage + 1} epoch {start_epoch} (step {step})")
    elif cfg.resume:
        log(f"--resume: {out} had saved no checkpoint yet; starting over")
    resumed = resumed_state is not None
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if resumed and (out / "metrics.jsonl").exists() else []
    history = [h for h in history if (h["stage"], h["epoch"]) < (start_stage, start_epoch)]
    rng = jax.random.PRNGKey(cfg.seed)
    state, steps_done = None, 0
    for stage, (k, epochs, base_lr) in enumerate(stages):
        if stage < start_stage:
            continue
        inputs = inputs_at(k)
        labels = param_labels(params, k)
        tx = make_optimizer(cfg, labels, base_lr)
        if cfg.normalize and stage == 0 and not resumed:
            norm = _fit_norm(model, params, inputs, prep, cfg, k, cached, mesh)
        state = create_train_state(params, norm, tx).replace(step=jnp.asarray(steps_done, jnp.int32))
        best_params = None
        if resumed and stage == start_stage:
            state = resumed_state
            if ckpt.steps("best"):
                best_state, best_meta, _ = restore_state(ckpt, template_for, k_min, "best")
                best_params = best_state.params if best_meta["stage"] == stage else None
        state = replicate(mesh, state)
        best_params = best_params if best_params is not None else state.params
        steps = Steps(model, cfg, tx, labels, k, cached, rng, mesh)
        first = start_epoch if (resumed and stage == start_stage) else 0
        for epoch in range(first, epochs if not plateau.stop(cfg) else first):
            state, (tr_loss, tr_acc, n, secs, compile_secs) = run_epoch(
                steps, state, inputs, prep.train, cfg, mesh, [cfg.seed, stage, epoch],
                f"stage {stage + 1} epoch {epoch + 1}/{epochs}", train=True)
            val_loss = val_acc = None
            if len(prep.val):
                _, (val_loss, val_acc, _, _, _) = run_epoch(steps, state, inputs, prep.val, cfg, mesh, None,
                                                         "validation", train=False)
            improved, cut = plateau.update(val_loss if val_loss is not None else tr_loss, cfg)
            if improved:
                best_params = state.params
            if cut:
                state = state.replace(lr_scale=state.lr_scale * cfg.plateau_factor)
            row = {"stage": stage, "epoch": epoch, "step": int(state.step), "train_loss": tr_loss,
                   "train_acc": tr_acc, "val_loss": val_loss, "val_acc": val_acc,
                   "lr": cfg.lr * float(state.lr_scale), "seconds": secs, "compile_seconds": compile_secs,
                   "images_per_s": n / secs}
            history.append(row)
            if main_process:
                _write_jsonl(out / "metrics.jsonl", history)
            log(f"stage {stage + 1} epoch {epoch + 1}/{epochs}: loss {tr_loss:.4f} acc {tr_acc:.3f}"
                + (f" | val loss {val_loss:.4f} acc {val_acc:.3f}" if val_loss is not None else "")
                + f" | {secs:.2f}s, {n / secs:.0f} clips/s"
                + (f" (+{compile_secs:.1f}s compile)" if compile_secs > 0.05 else ""))
            meta = {**meta_base, "stage": stage, "epoch": epoch, "counters": dataclasses.asdict(plateau)}
            save_state(ckpt, int(state.step), state, meta, improved, k_min)
            if on_epoch_end:
                on_epoch_end(stage, epoch)
            if plateau.stop(cfg):
                log(f"early stopping: no validation improvement for {cfg.patience} epochs")
                break
        state = state.replace(params=best_params)
        params, norm, steps_done, plateau = state.params, state.norm, int(state.step), Plateau()
    ckpt.close()

    test_loss = test_acc = None
    if state is not None and len(prep.test):
        k = stages[-1][0]
        test_steps = Steps(model, cfg, None, None, k, cached, rng, mesh)
        _, (test_loss, test_acc, _, _, _) = run_epoch(test_steps, state, inputs_at(k), prep.test, cfg, mesh, None,
                                                   "test", train=False)
    summary = {
        "test_accuracy": test_acc, "test_loss": test_loss, "n_test": len(prep.test), "n_train": len(prep.train),
        "n_val": len(prep.val), "classes": prep.classes, "weights": weights_source, "weights_digest": weights_digest,
        "data": prep.data_source,
        "mode": cfg.mode, "epochs_run": len(history), "wall_seconds": time.perf_counter() - t_start,
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])) if history else None,
        "train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else None,
        "compile_seconds": float(sum(h.get("compile_seconds", 0.0) for h in history)),
        "skipped_files": [str(e) for e in prep.skipped], "device": str(jax.devices()[0].platform),
        "n_devices": len(jax.devices()), "n_processes": jax.process_count(),
    }
    if main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if history:
            _plot_curves(history, out / "curves.png")
    if prep.skipped:
        log(f"skipped {len(prep.skipped)} file(s) (listed in {out / 'skipped.tsv'}):")
        for e in prep.skipped:
            log(f"  {e}")
    log(f"test accuracy {test_acc if test_acc is None else f'{test_acc:.4f}'} on {len(prep.test)} clips; "
        f"{summary['wall_seconds']:.1f}s wall; run in {out}")
    return summary


def _advance(model, params, acts: dict, k_from: int, k_to: int, cfg: TrainConfig) -> dict:
    """Cached split-point inputs at k_from -> at k_to, in batches."""
    fn = jax.jit(lambda p, x: _host_inputs(model.apply({"params": p}, x, k_from, k_to, method=Classifier.advance)))
    n, step = len(acts["taps"]), cfg.batch_size * 4
    parts = [jax.tree.map(np.asarray, fn(params, take(acts, np.arange(i, min(i + step, n)))))
             for i in range(0, n, step)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _fit_norm(model, params, inputs: Inputs, prep: Prepared, cfg, k, cached, mesh) -> dict:
    """Head-input statistics over the training split, with the params training starts from."""
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x if cached else imagelib.preprocess(
        imagelib.decode(x), cfg.preprocess), k if cached else 0, method=Classifier.head_inputs))
    rows = []
    for idx, mask in batches(len(prep.train), cfg.batch_size, mesh.size, None):
        feats = np.asarray(fn(params, inputs(prep.train[idx])))
        rows.append(feats[mask > 0])
    return fit_normalizer(np.concatenate(rows))


# ---------------------------------------------------------------------------------------------------
# Restoring a run for evaluation and prediction.


@dataclass
class RestoredRun:
    cfg: TrainConfig
    model: Classifier
    variables: dict  # {'params': ..., 'norm': ...}
    classes: list[str]
    meta: dict


def restore_run(run_dir: str | os.PathLike, which: str = "best") -> RestoredRun:
    """The model of a finished or interrupted run, as saved in its `best` (or `latest`) checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_config(saved_config(run_dir), run_dir / "config.json")
    ckpt = Checkpoints(run_dir / "checkpoints")
    try:
        state, meta, _ = restore_state(ckpt, lambda m: state_template(cfg.model(len(m["classes"])), cfg, m["stage"]),
                                       min(k for k, _, _ in cfg.stages()), which)
    finally:
        ckpt.close()
    model = cfg.model(len(meta["classes"]))
    return RestoredRun(cfg, model, {"params": state.params, "norm": state.norm}, meta["classes"], meta)


def predict_logits(run: RestoredRun, feats: RaggedFeatures, batch_size: int | None = None,
                   keys: list[str] | None = None) -> np.ndarray:
    """Logits for every clip of `feats`. With the clips' `keys`, the frozen prefix comes from the run's
    prefix cache where it holds them (the frozen weights in the checkpoint are the ones it was keyed by),
    so evaluating a run's own clips costs no second VGG16 pass."""
    cfg, mesh = run.cfg, make_mesh()
    k = cfg.stages()[-1][0]
    out = np.zeros((len(feats), len(run.classes)), np.float32)
    if keys is not None and cfg.cache_dir and cfg.cache_prefix and k > 0:
        prep = Prepared([""] * len(keys), keys, feats, np.zeros(len(keys), np.int64), run.classes,
                        *(np.arange(0),) * 3, [], "", len(keys))
        acts = prefix_activations(run.model, run.variables["params"], prep, cfg, k, mesh, lambda *_: None)
        fn = jax.jit(lambda v, x: run.model.apply(v, x, start=k))
        source = lambda idx: take(acts, idx)  # noqa: E731
    else:
        fn = jax.jit(lambda v, x: run.model.apply(v, imagelib.preprocess(imagelib.decode(x), cfg.preprocess)))
        source = lambda idx: image_batch(feats, idx, cfg)  # noqa: E731
    for idx, mask in batches(len(feats), batch_size or cfg.batch_size, mesh.size, None):
        logits = np.asarray(fn(run.variables, global_batch(mesh, {"x": source(idx)})["x"]))
        out[idx[mask > 0]] = logits[mask > 0]
    return out


# ---------------------------------------------------------------------------------------------------
# CLI


def _parse_type(annotation: str, value: str):
    if value.lower() in ("none", "") and "None" in annotation:
        return None
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str}[base](value)


def build_parser() -> argparse.ArgumentParser:
    """Flags for every TrainConfig field; only the flags given override the chosen recipe."""
    parser = argparse.ArgumentParser(prog="python -m jaxtl.train", description=(TrainConfig.__doc__ or "").strip())
    parser.add_argument("--recipe", default="jaxtl", choices=tuple(RECIPES),
                        help="starting settings: jaxtl (what learns, see README) or seed (the Keras recipe exactly); "
                             "every other flag overrides them (default: jaxtl)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":
            continue
        flag = "--" + f.name.replace("_", "-")
        defaults = f"default: {f.default}"
        if f.name in RECIPES["jaxtl"]:
            defaults = f"default: {RECIPES['jaxtl'][f.name]}; seed recipe: {f.default}"
        kw = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} ({defaults})"}
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=functools.partial(_parse_type, f.type), metavar=f.name.upper(),
                                choices=f.metadata.get("choices"), **kw)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The recipe with the given flags on top; with --resume, the run's saved config with them on top."""
    args = vars(build_parser().parse_args(argv))
    recipe = args.pop("recipe")
    if args.get("resume"):
        if not args.get("out"):
            raise ConfigError("--resume needs --out: the run directory to continue")
        return load_config({**saved_config(args["out"]), **args}, Path(args["out"]) / "config.json")
    return TrainConfig.from_recipe(recipe, **args)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
        run(cfg)
    except (ConfigError, DataError, WeightsError, CheckpointError, FloatingPointError, ProcessMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
