"""Device mesh, batch placement, and multi-process setup.

One `data` mesh axis over every device: batches are split along it, params and optimizer state are
replicated. Batches become global arrays through `jax.make_array_from_process_local_data`, so the
same code runs on one device, several, or several processes each feeding its own devices.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a batch -> arrays sharded over the mesh's `data` axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, replicated(mesh))


def prefetch(batches: Iterable, size: int = 2) -> Iterator:
    """Prepare the next batches on a host thread while the device runs the current step."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def produce():
        try:
            for b in batches:
                q.put(b)
            q.put(done)
        except BaseException as e:  # surfaced in the consumer, never swallowed
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process run when flags or the usual environment variables ask for one."""
    if coordinator or num_processes or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
