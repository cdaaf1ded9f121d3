"""Device mesh, batch placement, and multi-process setup.

One `data` mesh axis over every device: batches are split along it, params and optimizer state are
replicated. Batches become global arrays through `jax.make_array_from_process_local_data`, so the
same code runs on one device, several, or several processes each feeding its own devices.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_rows(mesh: Mesh, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """This process's rows of each global-batch array: the rows the batch sharding puts on its devices, in
    the order `jax.make_array_from_process_local_data` takes them (all of them in a one-process run)."""
    n = len(arrays[0])
    held = batch_sharding(mesh).addressable_devices_indices_map((n,)).values()
    spans = sorted({(s[0].start or 0, n if s[0].stop is None else s[0].stop) for s in held})
    rows = np.concatenate([np.arange(start, stop) for start, stop in spans])
    return tuple(a[rows] for a in arrays)


def local_positions(mesh: Mesh) -> list[int]:
    """The mesh positions (along `data`) of this process's devices."""
    return [d for d, device in enumerate(mesh.devices.flat) if device.process_index == jax.process_index()]


def local_part(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (what it fed in)."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    starts, parts = set(), []
    for s in shards:  # a replicated output has one copy per device: keep one per row span
        if (s.index[0].start or 0) not in starts:
            starts.add(s.index[0].start or 0)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)


def all_counts(n: int) -> np.ndarray:
    """Every process's `n` (a count of rows: how many global batches a pass needs)."""
    if jax.process_count() == 1:
        return np.array([n])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.array([n], np.int32))).reshape(-1)


def gather_rows(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every process's `ids`, their `rows`), sorted by id, in every process: for small per-clip results
    (logits, a bad-file flag, pooled head inputs for a closed-form head), never for activations."""
    if jax.process_count() == 1:
        order = np.argsort(ids, kind="stable")
        return ids[order], rows[order]
    from jax.experimental import multihost_utils

    counts = all_counts(len(ids))
    width = int(counts.max())
    pad = lambda a: np.concatenate([a, np.zeros((width - len(a),) + a.shape[1:], a.dtype)])  # noqa: E731
    every_id = np.asarray(multihost_utils.process_allgather(pad(ids.astype(np.int32))))
    every_row = np.asarray(multihost_utils.process_allgather(pad(rows)))
    all_ids = np.concatenate([every_id[p, :c] for p, c in enumerate(counts)])
    all_rows = np.concatenate([every_row[p, :c] for p, c in enumerate(counts)])
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order].astype(np.int64), all_rows[order]


def gather_strings(lines: list[str]) -> list[str]:
    """Every process's `lines` (process 0's first), in every process."""
    if jax.process_count() == 1:
        return list(lines)
    data = np.frombuffer("".join(line + "\0" for line in lines).encode(), np.uint8)  # NUL: in no path
    _, got = gather_rows(np.full(len(data), jax.process_index()), data)
    text = bytes(got.astype(np.uint8)).decode(errors="replace")
    return [line for line in text.split("\0") if line]


def is_main_process() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class ProcessMismatch(Exception):
    """Processes of one run that disagree on something they must share; one line naming them."""


def check_same_everywhere(digest: str, what: str, fix: str) -> None:
    """Stop (one line naming the processes) unless every process holds the same `digest` of `what`."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.array([int(digest[:7], 16) if digest != "random" else -1], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
    if len(set(every.tolist())) > 1:
        groups = {}
        for process, value in enumerate(every.tolist()):
            groups.setdefault(value, []).append(process)
        sides = " vs ".join(map(str, groups.values()))
        raise ProcessMismatch(f"the processes hold different {what} (processes {sides}): {fix}")


def process_0_decides(flag: bool) -> bool:
    """Process 0's `flag`, in every process: a decision that ends in a collective (a checkpoint save) must be
    the same everywhere, and clocks differ between processes."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def process_0s(tree):
    """Process 0's values of a pytree of host arrays, in every process: what each process computed on its own
    (a closed-form head fitted by BLAS, whose last bits can differ between hosts) before it is replicated."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def global_batch(mesh: Mesh, local):
    """This process's rows of a batch (a pytree of arrays) -> arrays sharded over the mesh's `data` axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), local)


def replicate(mesh: Mesh, tree):
    """`tree` on every device of the mesh. In a run of several processes the values go through the host
    (every process holds the same ones): arrays committed to one local device, as a checkpoint restores them,
    cannot be put across hosts."""
    if jax.process_count() > 1:
        tree = jax.tree.map(np.asarray, tree)
    return jax.device_put(tree, replicated(mesh))


def prefetch(batches: Iterable, size: int = 2) -> Iterator:
    """Prepare the next batches on a host thread while the device runs the current step. A consumer that stops
    early (a stop request) stops the thread too."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for b in batches:
                if not put(b):
                    return
            put(done)
        except BaseException as e:  # surfaced in the consumer, never swallowed
            put(e)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process run when flags or the usual environment variables ask for one.

    On CPU the processes talk through gloo; on GPU/TPU through the platform's own collectives.
    """
    if not (coordinator or num_processes or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def _has_accelerator() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                                  "libtpu"))
