"""What the jitted programs eat: batch plans over each device's share, local passes, device-resident tables.

Every clip has an owner, a mesh position (`Prepared.owner`); a process holds only the inputs of the clips
its devices own. An epoch's order is one permutation from (seed, stage, epoch) that every process computes
alike; each device takes, in that order, its own clips, `per_device` a step. So every epoch covers every
clip once whatever the process count, one process on one device follows exactly the global permutation,
and no row of input ever crosses between hosts: a global batch is assembled from each process's rows
(`jax.make_array_from_process_local_data`). A head-only stage keeps its cached inputs on the devices
(`DeviceTable`): sharded, each device holding its own clips, or replicated, or fed from the host a batch at
a time when they do not fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from jaxtl.images import ImageSpec, RaggedFeatures
from jaxtl.sharding import all_counts, global_batch, local_part, local_positions, prefetch, process_0_decides

INPUT_LAYOUTS = ("auto", "sharded", "replicated", "host")


def even_batch_size(n: int, largest: int, multiple: int) -> int:
    """The batch size that covers n rows in as few batches as `largest` allows with the least padding:
    100 clips at 64 are two batches of 50, not 64 + 36 padded to 64 (a fifth of the work wasted)."""
    n_batches = -(-n // largest)
    rows = -(-n // n_batches)
    return -(-rows // multiple) * multiple


def epoch_plan(clip_ids: np.ndarray, owner: np.ndarray, positions: int, batch_size: int,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(clip ids, mask), each (steps, positions * per_device): step s's global batch, device d's rows at
    [d * per_device, (d + 1) * per_device). Device d takes its own clips in the (shuffled) order, so every
    clip comes once; a device that runs out is padded with masked repeats."""
    per_device = -(-batch_size // positions)
    order = clip_ids[rng.permutation(len(clip_ids))] if rng is not None else clip_ids
    mine = [order[owner[order] == d] for d in range(positions)]
    steps = max(1, -(-max(len(m) for m in mine) // per_device))
    idx = np.zeros((steps, positions, per_device), np.int64)
    mask = np.zeros((steps, positions, per_device), np.float32)
    for d, rows in enumerate(mine):
        last = (len(rows) - 1) // per_device * per_device  # pad with the first row of the last batch
        padded = np.full(steps * per_device, rows[last] if len(rows) else clip_ids[0])
        padded[:len(rows)] = rows
        idx[:, d] = padded.reshape(steps, per_device)
        mask[:, d] = (np.arange(steps * per_device) < len(rows)).reshape(steps, per_device)
    return idx.reshape(steps, -1), mask.reshape(steps, -1)


def iter_local(fn: Callable, ids: np.ndarray, batch_size: int, mesh, rows_of: Callable, fill: int | None = None
               ) -> Iterator[tuple[slice, dict]]:
    """`fn` (jitted; a dict of per-row outputs) over this process's clips `ids`, in global batches that each
    process fills with its own rows, built on a host thread (a short batch repeats its first row; a process
    that has run out repeats its last clip, or `fill` when it has none): yields (the positions into `ids`
    of a batch, its outputs for them)."""
    local = len(local_positions(mesh)) * -(-batch_size // mesh.size)
    steps = -(-int(max(all_counts(len(ids)))) // local)
    fill = ids[-1] if len(ids) else fill

    def host():
        for s in range(steps):
            rows = ids[s * local:(s + 1) * local]
            yield len(rows), rows_of(np.concatenate([rows, np.full(local - len(rows), rows[0] if len(rows) else fill)]))

    for s, (n, x) in enumerate(prefetch(host())):
        outputs = fn(global_batch(mesh, x))
        yield slice(s * local, s * local + n), {name: local_part(a)[:n] for name, a in outputs.items()}


def map_local(fn: Callable, ids: np.ndarray, batch_size: int, mesh, rows_of: Callable, progress=None,
              fill: int | None = None) -> dict:
    """`iter_local`'s outputs gathered: {name: (len(ids), ...) array} of this process's clips."""
    out: dict[str, np.ndarray] = {}
    for rows, result in iter_local(fn, ids, batch_size, mesh, rows_of, fill):
        for name, a in result.items():
            if name not in out:
                out[name] = np.zeros((len(ids),) + a.shape[1:], a.dtype)
            out[name][rows] = a
        if progress is not None:
            progress(rows.stop - rows.start)
    return out


def take(acts: dict, rows: np.ndarray) -> dict:
    return {name: a[rows] for name, a in acts.items()}


class StepFeed:
    """What a stage's programs eat for given clips, from this process's share: the cached split-point
    activations (`{"h", "taps"}`, one row per owned clip) when the stage has them, else images built from
    the owned clips' features."""

    def __init__(self, y: np.ndarray, own: np.ndarray, owner: np.ndarray, images: ImageSpec,
                 acts: dict | None, feats: RaggedFeatures | None = None):
        self.y, self.own, self.owner, self.images, self.acts, self.feats = y, own, owner, images, acts, feats
        self.row = np.full(len(owner), -1, np.int64)
        self.row[own] = np.arange(len(own))
        self.table: DeviceTable | None = None

    def __call__(self, clip_ids: np.ndarray):
        rows = self.row[clip_ids]
        if self.acts is not None:
            return take(self.acts, rows)
        return self.images.batch(self.feats, rows)

    def put_on_devices(self, mesh, layout: str, log: Callable = print) -> None:
        """Keep the cached inputs on the devices as `layout` says (auto: sharded if a device's share fits in
        half its free memory, else fed from the host per batch), and say which."""
        per_row = sum(a[0].nbytes for a in self.acts.values()) + 4 if len(self.own) else 4
        share = int(np.bincount(self.owner[self.owner >= 0], minlength=mesh.size).max())
        free = device_free_bytes(mesh)
        if layout == "auto":  # process 0's reading decides: every process must run the same programs
            layout = "sharded" if process_0_decides(share * per_row <= free // 2) else "host"
        held = share * per_row if layout == "sharded" else len(self.own) * per_row
        log(f"inputs: {layout}" + ("" if layout == "host" else f", {held / 2**20:.1f} MB a device "
                                   f"({free / 2**30:.1f} GB free)"))
        self.table = None if layout == "host" else DeviceTable(self, mesh, layout == "sharded")


@dataclass
class DeviceTable:
    """A feed's cached inputs and labels as device arrays. Sharded: each device holds the rows of the clips
    it owns (padded to the largest share), `slot` is a clip's row there; replicated: every device holds the
    process's rows (all clips, in one process)."""

    arrays: dict
    slot: np.ndarray
    sharded: bool

    def __init__(self, feed: StepFeed, mesh, sharded: bool):
        import jax

        from jaxtl.sharding import batch_sharding, replicate

        self.sharded = sharded
        x = {"x": feed.acts, "y": feed.y[feed.own].astype(np.int32)}
        if not sharded:
            self.slot, self.arrays = feed.row, replicate(mesh, x)
            return
        rows_per = int(np.bincount(feed.owner[feed.owner >= 0], minlength=mesh.size).max())
        self.slot = np.full(len(feed.owner), -1, np.int64)
        rows = {}
        for d in range(mesh.size):
            mine = np.flatnonzero(feed.owner == d)
            self.slot[mine] = np.arange(len(mine))
            if d in local_positions(mesh):  # its rows of this process's table, padded to the largest share
                rows[d] = feed.row[np.concatenate([mine, np.full(rows_per - len(mine), mine[0] if len(mine) else 0)])]
        devices, sharding = list(mesh.devices.flat), batch_sharding(mesh)

        def upload(a):  # one device's rows at a time: no reordered host copy of the whole table
            pieces = [jax.device_put(a[r], devices[d]) for d, r in rows.items()]
            return jax.make_array_from_single_device_arrays((rows_per * mesh.size,) + a.shape[1:], sharding, pieces)

        self.arrays = jax.tree.map(upload, x)


def device_free_bytes(mesh) -> int:
    """Free memory of the mesh's first local device (the host's available memory for CPU devices, shared by
    its local devices)."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    available = 0
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as fh:
            available = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable")), 0)
    return available // max(len(local_positions(mesh)), 1)
