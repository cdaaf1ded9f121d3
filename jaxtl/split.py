"""The split point: one value that says what a training stage freezes, and answers every question about it.

`k` counts VGG16's 13 convs (not its 5 blocks): convs `[0, k)` are the frozen prefix, convs `[k, 13)`
and the head train. frozen k = 13, fine-tuning the last block k = 10, scratch k = 0. `cached` says the
step eats the prefix's stored outputs at `k` (computed once per clip) rather than images.

Params are split into two plain dicts, never copied: the frozen convs, and everything that trains.
The optimizer labels come from the same rule, so every param is covered by exactly one label.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from jaxtl.model import CONV_NAMES, N_CONV


@dataclass(frozen=True)
class SplitPoint:
    k: int
    cached: bool = False

    def __post_init__(self):
        if not 0 <= self.k <= N_CONV:
            raise ValueError(f"split point k must be in 0..{N_CONV}, got {self.k}")

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return CONV_NAMES[:self.k]

    @property
    def head_only(self) -> bool:
        """Nothing of the base trains: the step is the head alone."""
        return self.k == N_CONV

    def labels(self, params: dict) -> dict:
        """`frozen` for base convs before the split, `base` after it, `head` for the head (optax labels)."""
        frozen = set(self.frozen_names)
        base = {name: jax.tree.map(lambda _, n=name: "frozen" if n in frozen else "base", p)
                for name, p in params["base"].items()}
        return {"base": base, "head": jax.tree.map(lambda _: "head", params["head"])}

    def partition(self, params: dict) -> tuple[dict, dict]:
        """(frozen convs by name, the trainable rest shaped like params): gradients are taken of the second."""
        frozen = set(self.frozen_names)
        base = params["base"]
        return ({n: p for n, p in base.items() if n in frozen},
                {**params, "base": {n: p for n, p in base.items() if n not in frozen}})

    @staticmethod
    def join(frozen: dict, trainable: dict) -> dict:
        return {**trainable, "base": {**frozen, **trainable["base"]}}
