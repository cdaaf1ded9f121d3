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
from jaxtl.feed import even_batch_size, iter_local, map_local, take
from jaxtl.images import ImageSpec, RaggedFeatures
from jaxtl.model import Classifier
from jaxtl.sharding import ProcessMismatch, all_counts, gather_rows, is_main_process, local_positions


def _carried(out: dict) -> dict:
    """Drop what a split point does not carry (no activation `h` at k = 13)."""
    return {name: a for name, a in out.items() if a is not None}


# Clips per device in one prefix-pass batch: a forward pass holds no gradients, so it can take more than a
# train step; an accelerator needs large batches to fill (benchmarks/forward.py), a CPU core does not.
PREFIX_BATCH = {"cpu": 64, "gpu": 256}


def prefix_batch_size(mesh) -> int:
    """The prefix pass's global batch for the mesh's devices (the train batch size does not bound it)."""
    return PREFIX_BATCH.get(mesh.devices.flat[0].platform, PREFIX_BATCH["cpu"]) * mesh.size


def compute_prefix(model: Classifier, params, features: Callable, ids: np.ndarray, k: int, images: ImageSpec,
                   mesh, chunk: int = 0, progress: bool = False, done: Callable | None = None):
    """Split-point inputs at k for this process's clips `ids`, computed once (forward only, jitted), streamed:
    `features(chunk of ids)` gives (RaggedFeatures, good mask, errors) a chunk at a time (all at once when
    `chunk` is 0) and the VGG16 pass starts on the first chunk, so memory holds about one chunk of features
    (the host thread may start on the next).
    `done(positions, their rows, which are good)` is called as each chunk is finished (to cache it: an
    interrupted pass keeps what it did). Returns ({name: (len(ids), ...)}, a bad clip's row the prefix of a
    blank placeholder; which are good; errors)."""
    from tqdm.auto import tqdm

    prefix = jax.jit(lambda p, x: _carried(model.apply({"params": p}, images.network_input(x), k,
                                                       method=Classifier.prefix)))
    share = mesh.size // len(local_positions(mesh))  # global rows per row a process feeds
    largest = min(prefix_batch_size(mesh), chunk * share) if chunk else prefix_batch_size(mesh)
    size = even_batch_size(max(int(all_counts(len(ids)).max()) * share, 1), largest, mesh.size)
    local = size // share
    chunk = -(-chunk // local) * local if chunk else max(len(ids), 1)
    good, errors, loaded = np.zeros(len(ids), bool), [], {}
    empty = RaggedFeatures.from_list([np.zeros((1, 1, 1), np.float32)])  # a process without clips feeds padding

    def rows_of(rows):  # positions into `ids`; a chunk's features are loaded when its first batch is built
        start = int(rows[0]) // chunk * chunk
        if loaded.get("start") != start:
            feats, ok, bad = features(ids[start:start + chunk]) if len(ids) else (empty, [], [])
            good[start:start + len(ok)] = ok
            errors.extend(bad)
            loaded.update(start=start, feats=feats)
        return images.batch(loaded["feats"], np.minimum(rows - start, len(loaded["feats"]) - 1))

    out: dict[str, np.ndarray] = {}
    with tqdm(total=len(ids), desc="features + frozen prefix", unit="clip",
              disable=not progress or not is_main_process()) as bar:
        last = max(len(ids) - 1, 0)  # a process that has run out repeats its last clip (of the chunk it holds)
        for rows, result in iter_local(lambda x: prefix(params, x), np.arange(len(ids)), size, mesh, rows_of, last):
            for name, a in result.items():
                out.setdefault(name, np.zeros((len(ids),) + a.shape[1:], a.dtype))[rows] = a
            bar.update(rows.stop - rows.start)
            if done is not None and rows.stop > rows.start and (rows.stop % chunk == 0 or rows.stop == len(ids)):
                pos = np.arange((rows.stop - 1) // chunk * chunk, rows.stop)
                done(pos, take(out, pos), good[pos])
    return out, good, errors


def prefix_key(params, units: tuple[str, ...], k: int, images: ImageSpec, feature_key: str, compute_dtype: str,
               taps: str, pooling: str) -> str:
    """The prefix cache's key: the backbone, its frozen units' weights and every setting that changes their
    outputs (VGG16's key is jaxtl 0.3's, so its caches stay valid)."""
    weights = [np.asarray(leaf) for name in units[:k] if name in params["base"]  # the units the pass runs
               for leaf in jax.tree.leaves(params["base"][name])]
    family = [] if units[0] == "block1_conv1" and len(units) == 13 else [f"units={','.join(units)}"]
    return fingerprint(feature_key, images.size, images.fit, images.preprocess, images.storage, compute_dtype, k,
                       taps, pooling, *weights, *_band_norm_key(images.band_norm), *family)


def _band_norm_key(band_norm: str) -> list[str]:
    """What the key holds for a band normalisation (as jaxtl 0.2 wrote `mean`: its caches stay valid)."""
    return [] if band_norm == "none" else ["band_norm"] if band_norm == "mean" else [f"band_norm={band_norm}"]


def cached_prefix(model: Classifier, params, clip_ids: np.ndarray, keys: list[str | None], features: Callable,
                  k: int, images: ImageSpec, mesh, cache_dir: str | None, key: str, chunk: int = 0,
                  progress: bool = False, log: Callable = print) -> tuple[dict, np.ndarray, list]:
    """`compute_prefix` of this process's clips `clip_ids` (`keys` name their audio; None: unreadable): the
    rows the disk cache holds are read, the others computed and appended a chunk at a time by the process
    that owns them. Returns (rows, which are good, errors of the bad ones)."""
    store = ActivationCache(cache_dir, key) if cache_dir else None
    found, out = store.read(keys) if store else (np.zeros(len(keys), bool), None)
    missing = np.flatnonzero(~found)
    if not int(all_counts(len(missing)).max()):
        log(f"frozen prefix: {len(keys)} clips from {store.path}")  # rows read are verified (jaxtl.cache)
        return out or {}, found, []

    def done(pos, acts, ok):  # a finished chunk: checked, then cached
        if store is not None and ok.any():
            names = [keys[missing[i]] for i in pos[ok]]
            store.add(names, finite(take(acts, np.flatnonzero(ok)), names))

    t, failure = time.perf_counter(), None
    try:
        computed, good, errors = compute_prefix(model, params, features, clip_ids[missing], k, images, mesh, chunk,
                                                progress, done)
    except Exception as e:  # noqa: BLE001 (re-raised below, once every process knows: none waits for it alone)
        failure = e
    if int(all_counts(int(failure is not None)).max()):
        raise failure or ProcessMismatch("another process stopped in the frozen prefix pass (its output says why)")
    secs = time.perf_counter() - t
    log(f"frozen prefix: {len(missing)} clips in {secs:.1f}s ({len(missing) / max(secs, 1e-9):.1f} clips/s), "
        f"{len(keys) - len(missing)} from {store.path if store else 'no cache'}")
    if out is None or len(missing) == len(keys):
        out = computed  # a fresh cache: the computed rows are the whole table (one copy)
    else:
        for name, a in computed.items():
            out[name][missing] = a
    found[missing] = good
    return finite(out, keys), found, errors


def finite(acts: dict, keys: list) -> dict:
    """`acts` if every value is finite; else a one-line error, before anything is cached or trained on
    (XLA:CPU in jax 0.11 gives non-finite bfloat16 VGG16 outputs under jit). Checked a block of rows at a
    time: no temporary the size of the table. Rows read from the cache were checked as they were read, and a
    damaged shard's rows computed again, so what fails here is the pass."""
    bad = 0
    for a in acts.values():
        for start in range(0, len(a), 4096):
            block = a[start:start + 4096]
            bad += int((~np.isfinite(block.reshape(len(block), -1)).all(axis=1)).sum())
    if bad:
        raise FloatingPointError(f"the frozen pass gave non-finite outputs for {bad} of {len(keys)} "
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
    """Per-feature mean and inverse std over every process's rows (each passes its own: their counts, means
    and squared deviations are pooled, not the rows); the std floor keeps dead features (all zeros) harmless."""
    n = len(head_inputs)
    mean = head_inputs.mean(0) if n else np.zeros(head_inputs.shape[1:], np.float32)
    m2 = ((head_inputs - mean) ** 2).sum(0)
    _, every = gather_rows(np.array([jax.process_index()]), np.concatenate([[n], mean, m2])[None].astype(np.float32))
    if len(every) > 1:  # Chan et al.'s pooled mean and variance
        counts, means, m2s = every[:, :1], every[:, 1:1 + mean.size], every[:, 1 + mean.size:]
        mean = (counts * means).sum(0) / counts.sum()
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        n = counts.sum()
    std = np.sqrt(m2 / max(n, 1))
    scale = 1.0 / (std + 1e-2 * std.mean() + 1e-12)
    return {"head": {"mean": jnp.asarray(mean, jnp.float32), "scale": jnp.asarray(scale, jnp.float32)}}


def head_input_statistics(model: Classifier, params, feed, ids: np.ndarray, k: int, cached: bool,
                          images: ImageSpec, batch_size: int, mesh) -> dict:
    """`fit_normalizer` over the head inputs of this process's clips `ids` (its training clips), with the
    params training starts from; `feed(ids)` gives the cached activations at k, or images."""
    fn = jax.jit(lambda p, x: {"h": model.apply({"params": p}, x if cached else images.network_input(x),
                                                k if cached else 0, method=Classifier.head_inputs)})
    rows = map_local(lambda x: fn(params, x), ids, batch_size, mesh, feed, fill=feed.own[0] if len(feed.own) else 0)
    return fit_normalizer(rows["h"])
