"""The classifier: a registered backbone (`jaxtl.backbones`), the head, and the split point that serves
every training mode.

A backbone is a flat sequence of units (VGG16: 13 convs). A split `k` is the number of units in the frozen
prefix, so the same module runs the whole base, the prefix `[0, k)` once for caching, or the trainable
suffix `[k, n)` inside the train step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtl import backbones
from jaxtl.backbones.vgg import VGG as VGG16Base  # noqa: F401  (jaxtl 0.2's name; its default layers are VGG16's)


def pool_features(h, pooling: str):
    """Collapse (N, H, W, C) activations into one vector per clip."""
    if pooling == "flatten":
        return h.reshape(h.shape[0], -1)
    if pooling == "avg":
        return h.mean(axis=(1, 2))
    if pooling == "avgmax":
        return jnp.concatenate([h.mean(axis=(1, 2)), h.max(axis=(1, 2))], axis=-1)
    raise ValueError(f"unknown pooling {pooling!r}: use flatten, avg or avgmax")


class Head(nn.Module):
    """The seed's classifier (Dense(256, relu) -> Dropout -> Dense) on a feature vector, optionally standardised.

    `normalize` applies a fixed affine map kept in the `norm` collection; its statistics are fitted on
    the training split and travel with the checkpoint, so evaluate and predict see what training saw.
    """

    num_classes: int
    hidden: int = 256
    dropout: float = 0.0
    normalize: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.normalize:
            mean = self.variable("norm", "mean", jnp.zeros, (x.shape[-1],), jnp.float32)
            scale = self.variable("norm", "scale", jnp.ones, (x.shape[-1],), jnp.float32)
            x = (x - mean.value) * scale.value
        if self.hidden:
            x = nn.relu(nn.Dense(self.hidden, name="fc")(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="logits")(x)


class Classifier(nn.Module):
    """Base plus head, runnable from and up to any split point (params: `{"base": ..., "head": ...}`).

    The head sees the pooled outputs of the stages in `taps` (the seed: VGG16's block 5 flattened),
    concatenated in stage order. What crosses a split point `k` is `{"h": activation after unit k, "taps":
    pooled outputs of tapped stages already passed}`; past the last unit only `taps` is left, the head's
    whole input.
    """

    num_classes: int
    hidden: int = 256
    dropout: float = 0.0
    pooling: str = "flatten"
    normalize: bool = False
    dtype: Any = jnp.float32
    taps: tuple[int, ...] = (5,)
    backbone: str = "vgg16"

    @property
    def spec(self) -> backbones.Backbone:
        return backbones.get(self.backbone)

    @property
    def n_units(self) -> int:
        return self.spec.n_units

    def setup(self):
        self.base = self.spec.module(dtype=self.dtype)
        self.head = Head(self.num_classes, self.hidden, self.dropout, self.normalize)

    def __call__(self, x, train: bool = False, start: int = 0):
        """Logits from images (start 0), an activation at `start`, or the inputs dict at `start`."""
        return self.head(self.head_inputs(x, start), train=train)

    def advance(self, inputs, start: int, stop: int) -> dict:
        """Split-point inputs at `start` -> at `stop`, pooling each tapped block on the way."""
        if not isinstance(inputs, dict):
            inputs = {"h": inputs, "taps": jnp.zeros((inputs.shape[0], 0), jnp.float32)}
        n = self.n_units
        x, pooled, pos = inputs.get("h"), [inputs["taps"]], start
        for stage, end in enumerate(self.spec.stage_end[1:], 1):
            if start < end <= stop and stage in self.taps:
                x = self.base(x, pos, end)
                pos = end
                pooled.append(pool_features(x.astype(jnp.float32), self.pooling))
        if stop < n:  # past the last tap nothing is needed at the end of the base
            x = self.base(x, pos, stop)
        return {"h": x if stop < n else None, "taps": jnp.concatenate(pooled, axis=-1)}

    def prefix(self, x, stop: int) -> dict:
        return self.advance(x, 0, stop)

    def head_inputs(self, x, start: int = 0):
        """The head's (unnormalised) input: what the normalisation statistics are fitted on."""
        return self.advance(x, start, self.n_units)["taps"]
