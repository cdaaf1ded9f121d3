"""The split point: one value that says what a training stage freezes, and answers every question about it.

`k` counts the backbone's units (VGG16: 13 convs; ResNet50: stem, pool and 16 blocks; see
`jaxtl.backbones`): units `[0, k)` are the frozen prefix, units `[k, n)` and the head train. frozen
k = n, fine-tuning VGG16's last block k = 10, scratch k = 0. `cached` says the step eats the prefix's
stored outputs at `k` (computed once per clip) rather than images.

Params are split into two plain dicts, never copied: the frozen units, and everything that trains.
The optimizer labels come from the same rule, so every param is covered by exactly one label; a
BatchNorm's moving statistics are always `frozen` (they are never trained by gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

STATISTICS = ("moving_mean", "moving_variance", "mean", "variance")  # BatchNorm's and EfficientNet's input norm


@dataclass(frozen=True)
class SplitPoint:
    k: int
    units: tuple[str, ...]
    cached: bool = False

    def __post_init__(self):
        if not 0 <= self.k <= len(self.units):
            raise ValueError(f"split point k must be in 0..{len(self.units)}, got {self.k}")

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return self.units[:self.k]

    @property
    def head_only(self) -> bool:
        """Nothing of the base trains: the step is the head alone."""
        return self.k == len(self.units)

    def labels(self, params: dict) -> dict:
        """`frozen` for base units before the split and for statistics, `base` for the rest of the base, `head`
        for the head (optax labels)."""
        frozen = set(self.frozen_names)

        def label(unit):
            return lambda path, _: ("frozen" if unit in frozen or path[-1].key in STATISTICS else "base")

        base = {name: jax.tree_util.tree_map_with_path(label(name), p) for name, p in params["base"].items()}
        return {"base": base, "head": jax.tree.map(lambda _: "head", params["head"])}

    def partition(self, params: dict) -> tuple[dict, dict]:
        """(frozen units by name, the trainable rest shaped like params): gradients are taken of the second."""
        frozen = set(self.frozen_names)
        base = params["base"]
        return ({n: p for n, p in base.items() if n in frozen},
                {**params, "base": {n: p for n, p in base.items() if n not in frozen}})

    @staticmethod
    def join(frozen: dict, trainable: dict) -> dict:
        return {**trainable, "base": {**frozen, **trainable["base"]}}
