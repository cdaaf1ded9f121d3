"""Train state, optimizer, and the pure jitted steps (shaped like flax's `examples/imagenet`).

A step's input is what crosses its split point: the frozen prefix's cached outputs at `k`, or [0,1]
images from which the prefix runs forward-only inside the step (under `stop_gradient`). Gradients
are taken of the trainable partition only, so no backward pass runs through frozen convs, and
`optax.multi_transform` gives each label (`frozen`, `base`, `head`) its own optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxtl import images as imagelib
from jaxtl.disk import free_space, reason
from jaxtl.model import Classifier
from jaxtl.split import SplitPoint


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    norm: Any  # fixed head-input statistics ({} when unused)
    lr_scale: jax.Array  # cut by reduce-on-plateau; multiplies every update


@dataclass(frozen=True)
class Optimizer:
    """Adam for the unfrozen base convs and the head (AdamW when the head has weight decay)."""

    lr: float
    base_lr: float
    weight_decay: float = 0.0

    def transform(self, labels: dict) -> optax.GradientTransformation:
        head = optax.adamw(self.lr, weight_decay=self.weight_decay) if self.weight_decay else optax.adam(self.lr)
        return optax.multi_transform({"frozen": optax.set_to_zero(), "base": optax.adam(self.base_lr),
                                      "head": head}, labels)


@dataclass(frozen=True)
class Augment:
    """In-step augmentation of [0,1] images; any of it makes the frozen prefix run inside the step."""

    noise_std: float = 0.0
    time_shift: int = 0
    time_mask: int = 0
    freq_mask: int = 0

    def __bool__(self) -> bool:
        return bool(self.noise_std or self.time_shift or self.time_mask or self.freq_mask)

    def __call__(self, images, rng):
        """Noise, random time shift and SpecAugment masks on (N, H, W, 3) images, per clip."""
        n, h, w, _ = images.shape
        k_noise, k_shift, k_t, k_tw, k_f, k_fw = jax.random.split(rng, 6)
        if self.time_shift:
            shift = jax.random.randint(k_shift, (n,), -self.time_shift, self.time_shift + 1)
            cols = (jnp.arange(w)[None, :] - shift[:, None]) % w
            images = jnp.take_along_axis(images, cols[:, None, :, None], axis=2)
        for size, axis, k_pos, k_width in ((self.time_mask, 2, k_t, k_tw), (self.freq_mask, 1, k_f, k_fw)):
            if size:
                extent = images.shape[axis]
                width = jax.random.randint(k_width, (n,), 0, size + 1)
                start = jax.random.randint(k_pos, (n,), 0, extent) - width // 2
                pos = jnp.arange(extent)[None, :]
                masked = (pos >= start[:, None]) & (pos < start[:, None] + width[:, None])
                shape = (n, extent, 1, 1) if axis == 1 else (n, 1, extent, 1)
                images = jnp.where(masked.reshape(shape), 0.0, images)
        if self.noise_std:
            images = images + self.noise_std * jax.random.normal(k_noise, images.shape)
        return images


def _images(image_size: int):
    return jnp.zeros((1, image_size, image_size, 3), jnp.float32)


# A random VGG16 base is ~1,200 ops of RNG code that run once: XLA:CPU's default backend optimisation takes
# 3.2 s to compile them (a third of a 100-clip frozen job) and 0.1 s to run, level 1 0.8 s and 0.1 s, with
# identical numbers (2-core AMD EPYC).
CPU_INIT_COMPILE = {"xla_backend_optimization_level": 1}


def init_base(model: Classifier, image_size: int, seed: int) -> dict:
    """A random base as `model.init(PRNGKey(seed), images)` makes it (flax derives each param's rng from its
    path), shaped like a weight file's variables."""
    run_base = functools.partial(model.init, method=lambda m, x: m.advance(x, 0, m.n_units))
    key, x = jax.random.PRNGKey(seed), _images(image_size)
    init = jax.jit(run_base).lower(key, x).compile(CPU_INIT_COMPILE if jax.default_backend() == "cpu" else None)
    return {"params": flax.core.unfreeze(init(key, x)["params"]["base"])}


def init_params(model: Classifier, image_size: int, seed: int, base_variables=None, init_seed: int | None = None):
    """(params, norm): the base from `base_variables`, else random (from `init_seed` when given), and a random
    head, each as `model.init` makes it, without generating a random base that a weight file replaces. Params
    hold the convs the model runs: a head that reads blocks 3-4 has no block-5 params, whatever the file holds."""
    x = _images(image_size)
    width = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, method=Classifier.head_inputs)[0])
    run_head = functools.partial(model.init, method=lambda m, h: m.head(h))
    head = jax.jit(run_head)(jax.random.PRNGKey(seed), jnp.zeros(width.shape, jnp.float32))
    if base_variables is None:
        base_variables = init_base(model, image_size, seed if init_seed is None else init_seed)
    runs = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]["base"]
    params = {"base": {name: jax.tree.map(jnp.asarray, base_variables["params"][name]) for name in runs},
              "head": flax.core.unfreeze(head["params"]["head"])}
    return params, dict(flax.core.unfreeze(head.get("norm", {})))


def create_train_state(params, norm, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), norm=norm,
                      lr_scale=jnp.ones((), jnp.float32))


def abstract_state(model: Classifier, image_size: int, split: SplitPoint, optimizer: Optimizer) -> TrainState:
    """Shapes and dtypes of a stage's train state at the run's own image size, without computing anything
    (what a checkpoint is restored into), placed whole on this process's first device."""

    def build():
        variables = model.init(jax.random.PRNGKey(0), _images(image_size))
        params, norm = flax.core.unfreeze(variables["params"]), dict(variables.get("norm", {}))
        return create_train_state(params, norm, optimizer.transform(split.labels(params)))

    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), jax.eval_shape(build))


def mix_rows(x, lam, perm):
    """Mixup of a batch's inputs (any pytree of row-major arrays): `lam * x + (1 - lam) * x[perm]`."""
    return jax.tree.map(lambda a: (lam * a.astype(jnp.float32) + (1 - lam) * a[perm].astype(jnp.float32)
                                   ).astype(a.dtype), x)


def mixup_plan(rng, n: int, alpha: float):
    """(weight ~ Beta(alpha, alpha), partner permutation) of one batch's mixup."""
    k_lam, k_perm = jax.random.split(rng)
    return jax.random.beta(k_lam, alpha, alpha), jax.random.permutation(k_perm, n)


def forward(params, norm, x, rng, *, model: Classifier, split: SplitPoint, augment: Augment, preprocess: str,
            train: bool, mix=None, bn_train: bool = False):
    """(logits, updated BatchNorm statistics or {}) from the step's input: the split-point inputs at k
    (`split.cached`), else [0,1] images; `mix` (weight, permutation) mixes the inputs, after any in-step
    augmentation. `bn_train`: BatchNorm of the units that train normalises by batch statistics (`--bn train`)."""
    variables = {"params": params, "norm": norm}
    if split.cached and mix is not None:
        x = mix_rows(x, *mix)
    if not split.cached:
        x = imagelib.decode(x)
        if train and augment:
            x = augment(x, jax.random.fold_in(rng, 1))
        if mix is not None:
            x = mix_rows(x, *mix)
        x = imagelib.preprocess(x, preprocess)
        if split.k:
            x = jax.lax.stop_gradient(model.apply(variables, x, split.k, method=Classifier.prefix))
    rngs = {"dropout": rng} if train else {}
    if train and bn_train:
        logits, stats = model.apply(variables, x, train=train, start=split.k, rngs=rngs, mutable=["bn_stats"])
        return logits, stats.get("bn_stats", {})
    return model.apply(variables, x, train=train, start=split.k, rngs=rngs), {}


def with_statistics(params, stats):
    """Params with the moving statistics a `--bn train` step computed put in place of the old ones."""
    from flax import traverse_util

    if not stats:
        return params
    flat = traverse_util.flatten_dict(params)
    flat.update(traverse_util.flatten_dict(stats))
    return traverse_util.unflatten_dict(flat)


def loss_and_metrics(logits, y, mask):
    """(mean loss over real rows, [loss sum, correct count, row count]): padded rows have mask 0."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    metrics = jnp.stack([jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)])
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), metrics


def mixed_loss(logits, y, mask, mix=None):
    """`loss_and_metrics`, the loss of a mixup batch being `lam * CE(y) + (1 - lam) * CE(y[perm])`."""
    loss, metrics = loss_and_metrics(logits, y, mask)
    if mix is not None:
        lam, perm = mix
        loss = lam * loss + (1 - lam) * loss_and_metrics(logits, y[perm], mask)[0]
    return loss, metrics


def train_step(state: TrainState, batch, rng, *, model, split: SplitPoint, augment: Augment, preprocess: str, tx,
               mixup: float = 0.0, bn_train: bool = False):
    """One update of the trainable partition; frozen convs pass through untouched (and uncopied). With
    `mixup` the loss is the mixed pair's (`lam * CE(y) + (1 - lam) * CE(y[perm])`); metrics stay on `y`."""
    frozen, trainable = split.partition(state.params)
    step_rng = jax.random.fold_in(rng, state.step)
    mix = mixup_plan(jax.random.fold_in(step_rng, 2), batch["y"].shape[0], mixup) if mixup else None

    def loss_fn(tr):
        logits, stats = forward(split.join(frozen, tr), state.norm, batch["x"], step_rng, model=model, split=split,
                                augment=augment, preprocess=preprocess, train=True, mix=mix, bn_train=bn_train)
        loss, metrics = mixed_loss(logits, batch["y"], batch["mask"], mix)
        return loss, (metrics, stats)

    (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = split.join(jax.tree.map(jnp.zeros_like, frozen), grads)  # set_to_zero never reads these
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale, split.partition(updates)[1])
    params = with_statistics(split.join(frozen, optax.apply_updates(trainable, updates)), stats)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch, *, model, split: SplitPoint, preprocess: str):
    logits, _ = forward(state.params, state.norm, batch["x"], None, model=model, split=split, augment=Augment(),
                        preprocess=preprocess, train=False)
    return loss_and_metrics(logits, batch["y"], batch["mask"])[1], logits


def scan_epoch(step, state, data, idx, mask, *, mesh, sharded: bool, train: bool):
    """Every batch of an epoch as one device program, each device gathering its rows of a batch from the
    inputs it holds: its own share (`sharded`: `idx` are rows of that share) or every row (replicated)."""
    from jax.sharding import PartitionSpec as P

    gather = jax.shard_map(lambda table, i: jax.tree.map(lambda a: a[i], table), mesh=mesh,
                           in_specs=(P("data") if sharded else P(), P("data")), out_specs=P("data"))

    def body(state, batch_rows):
        i, m = batch_rows
        rows = gather(data, i)
        batch = {"x": rows["x"], "y": rows["y"], "mask": m}
        if train:
            return step(state, batch)
        return state, step(state, batch)[0]

    return jax.lax.scan(body, state, (idx, mask))


class EvalPrograms:
    """The jitted evaluation programs at one split point: per batch, and (head alone on cached inputs) a
    whole pass as one `lax.scan`."""

    def __init__(self, model: Classifier, split: SplitPoint, preprocess: str, mesh, sharded: bool = True):
        # A step that holds convolutions stays one program per batch: XLA:CPU runs convolutions inside a
        # loop body about 90x slower (block 5 fine-tuning, 112x112, 2 steps of 32: 65 s scanned, 0.72 s
        # as two calls). Head-only steps are scanned: no host round trip per step, which costs more
        # than the step itself.
        self.scanned = split.cached and split.head_only
        evaluate = functools.partial(eval_step, model=model, split=split, preprocess=preprocess)
        self.eval = jax.jit(evaluate)
        self.eval_scan = jax.jit(functools.partial(scan_epoch, evaluate, mesh=mesh, sharded=sharded, train=False))


class TrainPrograms(EvalPrograms):
    """A training stage's jitted programs: its evaluation programs plus the train step (and scanned epoch)."""

    def __init__(self, model: Classifier, split: SplitPoint, preprocess: str, mesh, augment: Augment, tx, rng,
                 mixup: float = 0.0, sharded: bool = True, bn_train: bool = False):
        super().__init__(model, split, preprocess, mesh, sharded)
        train = functools.partial(train_step, rng=rng, model=model, split=split, augment=augment,
                                  preprocess=preprocess, tx=tx, mixup=mixup, bn_train=bn_train)
        self.train = jax.jit(train)
        self.train_scan = jax.jit(functools.partial(scan_epoch, train, mesh=mesh, sharded=sharded, train=True))


def use_compile_cache(cache_dir: str | None) -> None:
    """JAX's persistent compilation cache under `cache_dir/xla`: a rerun with the same shapes loads its
    programs instead of compiling them (the test suite ran in 264 s instead of 390 s with it). A cache the
    user configured already (JAX_COMPILATION_CACHE_DIR) is left as it is; '' or None turns it off."""
    if not cache_dir or jax.config.jax_compilation_cache_dir:
        return
    directory = (Path(cache_dir) / "xla").absolute()
    try:  # a full or read-only cache: one warning here, not one of JAX's for every program compiled
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
    except OSError as e:
        logging.getLogger("jaxtl").warning(f"warning: {directory}: cannot write the compilation cache: {reason(e)} "
                                           f"({free_space(directory)} free there); compiling without it")
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # CPU step programs compile in ~1 s


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compile_time():
    """Seconds JAX spends tracing and compiling inside the block (a one-element list, filled as it goes), so
    reported speeds leave compilation out and report it on its own."""
    total = [0.0]

    def listener(event: str, seconds: float, **_):
        if event in COMPILE_EVENTS:
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
