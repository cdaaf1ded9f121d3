"""Split-point inputs: the frozen prefix's outputs per clip, computed once (forward only), cached on disk.

What crosses a split point `k` is `{"h": activation after conv k, "taps": pooled outputs of tapped blocks
already passed}` (see `jaxtl.model.Classifier`); at k = 13 only `taps` is left, the head's whole input.
Computing VGG16's prefix is the most expensive thing a frozen run does, so its outputs are kept per clip
in `.jaxtl_cache/prefix-<key>/` (append-only shards, `jaxtl.cache.ActivationCache`), keyed by the prefix
weights and every setting that shapes them: a rerun (another head, seed, subset or learning rate) pays only
for clips it has not seen, and reads only the rows of its own clips.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.cache import ActivationCache, fingerprint
from jaxtl.images import ImageSpec, RaggedFeatures
from jaxtl.model import CONV_NAMES, Classifier
from jaxtl.pipeline import even_batch_size, map_batches, take
from jaxtl.sharding import is_main_process


def _carried(out: dict) -> dict:
    """Drop what a split point does not carry (no activation `h` at k = 13)."""
    return {name: a for name, a in out.items() if a is not None}


# Clips per device in one prefix-pass batch: a forward pass holds no gradients, so it can take more than a
# train step; an accelerator needs large batches to fill (benchmarks/forward.py), a CPU core does not.
PREFIX_BATCH = {"cpu": 64, "gpu": 256}


def prefix_batch_size(mesh) -> int:
    """The prefix pass's global batch for the mesh's devices (the train batch size does not bound it)."""
    return PREFIX_BATCH.get(mesh.devices.flat[0].platform, PREFIX_BATCH["cpu"]) * mesh.size


def compute_prefix(model: Classifier, params, feats: RaggedFeatures, ids: np.ndarray, k: int, images: ImageSpec,
                   mesh, progress: bool = False) -> dict:
    """Split-point inputs at k for the clips `ids` of `feats`, computed once (forward only, jitted)."""
    from tqdm.auto import tqdm

    prefix = jax.jit(lambda p, x: _carried(model.apply({"params": p}, images.network_input(x), k,
                                                       method=Classifier.prefix)))
    n = len(ids)
    size = even_batch_size(n, prefix_batch_size(mesh), mesh.size)
    with tqdm(total=n, desc="frozen prefix", unit="clip", disable=not progress or not is_main_process(),
              leave=False) as bar:
        return map_batches(lambda x: prefix(params, x), n, size, mesh, lambda rows: images.batch(feats, ids[rows]),
                           bar.update)


def prefix_key(params, k: int, images: ImageSpec, feature_key: str, compute_dtype: str, taps: str,
               pooling: str) -> str:
    """The prefix cache's key: the frozen convs' weights and every setting that changes their outputs."""
    weights = [np.asarray(leaf) for name in CONV_NAMES[:k] if name in params["base"]  # the convs the pass runs
               for leaf in jax.tree.leaves(params["base"][name])]
    return fingerprint(feature_key, images.size, images.fit, images.preprocess, images.storage, compute_dtype, k,
                       taps, pooling, *weights, *_band_norm_key(images.band_norm))


def _band_norm_key(band_norm: str) -> list[str]:
    """What the key holds for a band normalisation (as jaxtl 0.2 wrote `mean`: its caches stay valid)."""
    return [] if band_norm == "none" else ["band_norm"] if band_norm == "mean" else [f"band_norm={band_norm}"]


def cached_prefix(model: Classifier, params, keys: list[str], feats: RaggedFeatures, k: int, images: ImageSpec,
                  mesh, cache_dir: str | None, key: str, progress: bool = False,
                  log: Callable = print) -> dict:
    """`compute_prefix` of every clip (`keys` name their audio), reading and extending the disk cache."""
    every = np.arange(len(keys))
    if not cache_dir:
        return finite(compute_prefix(model, params, feats, every, k, images, mesh, progress), keys)
    store = ActivationCache(cache_dir, key)
    found, out = store.read(keys)  # the rows of these clips only, into one array
    missing = np.flatnonzero(~found)
    if not len(missing):
        log(f"frozen prefix: {len(keys)} clips from {store.path}")
        return finite(out, keys)
    t = time.perf_counter()
    new = finite(compute_prefix(model, params, feats, missing, k, images, mesh, progress), [keys[i] for i in missing])
    secs = time.perf_counter() - t
    log(f"frozen prefix: {len(missing)} clips in {secs:.1f}s ({len(missing) / secs:.1f} clips/s), "
        f"{len(keys) - len(missing)} from {store.path}")
    if out is None:
        out = {name: np.zeros((len(keys),) + a.shape[1:], a.dtype) for name, a in new.items()}
    for name, a in new.items():
        out[name][missing] = a
    if is_main_process():
        store.add([keys[i] for i in missing], new)
    return finite(out, keys)  # the cached rows too: an older version may have stored non-finite ones


def finite(acts: dict, keys: list[str]) -> dict:
    """`acts` if every value is finite; else a one-line error, before anything is cached or trained on
    (XLA:CPU in jax 0.11 gives non-finite bfloat16 VGG16 outputs under jit)."""
    bad = np.zeros(len(keys), bool)
    for a in acts.values():
        bad |= ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    if bad.any():
        raise FloatingPointError(f"the frozen VGG16 pass gave non-finite outputs for {int(bad.sum())} of {len(keys)} "
                                 "clips; nothing was cached or trained on (with --dtype bfloat16 on a CPU this is "
                                 "XLA:CPU's bfloat16 convolution: use --dtype float32)")
    return acts


def advance(model: Classifier, params, acts: dict, k_from: int, k_to: int, batch_size: int) -> dict:
    """Cached split-point inputs at k_from -> at k_to (one cheap suffix pass), in batches."""
    fn = jax.jit(lambda p, x: _carried(model.apply({"params": p}, x, k_from, k_to, method=Classifier.advance)))
    n, step = len(acts["taps"]), batch_size * 4
    parts = [jax.tree.map(np.asarray, fn(params, take(acts, np.arange(i, min(i + step, n)))))
             for i in range(0, n, step)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def fit_normalizer(head_inputs: np.ndarray) -> dict:
    """Per-feature mean and inverse std; the std floor keeps dead features (all zeros) harmless."""
    mean = head_inputs.mean(0)
    std = head_inputs.std(0)
    scale = 1.0 / (std + 1e-2 * std.mean() + 1e-12)
    return {"head": {"mean": jnp.asarray(mean, jnp.float32), "scale": jnp.asarray(scale, jnp.float32)}}


def head_input_statistics(model: Classifier, params, feed, ids: np.ndarray, k: int, cached: bool,
                          images: ImageSpec, batch_size: int, mesh) -> dict:
    """`fit_normalizer` over the head inputs of clips `ids` (the training split), with the params training
    starts from; `feed(ids)` gives the cached activations at k, or images."""
    fn = jax.jit(lambda p, x: {"h": model.apply({"params": p}, x if cached else images.network_input(x),
                                                k if cached else 0, method=Classifier.head_inputs)})
    rows = map_batches(lambda x: fn(params, x), len(ids), batch_size, mesh, lambda r: feed(ids[r]))
    return fit_normalizer(rows["h"])
