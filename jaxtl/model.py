"""VGG16 conv base, the classifier head, and the split point that serves every training mode.

The base is a flat sequence of 13 convolutions; a 2x2 max-pool follows the last conv of each block.
A split `k` (0..13) is the number of convs in the frozen prefix, so the same module runs the whole
base, the prefix `[0, k)` once for caching, or the trainable suffix `[k, 13)` inside the train step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

CONV_LAYERS: tuple[tuple[str, int], ...] = (
    ("block1_conv1", 64), ("block1_conv2", 64),
    ("block2_conv1", 128), ("block2_conv2", 128),
    ("block3_conv1", 256), ("block3_conv2", 256), ("block3_conv3", 256),
    ("block4_conv1", 512), ("block4_conv2", 512), ("block4_conv3", 512),
    ("block5_conv1", 512), ("block5_conv2", 512), ("block5_conv3", 512),
)
CONV_NAMES: tuple[str, ...] = tuple(name for name, _ in CONV_LAYERS)
N_CONV = len(CONV_LAYERS)
# Convs completed at the end of block b (index b); a pool follows each of these positions.
BLOCK_END = (0, 2, 4, 7, 10, 13)


class VGG16Base(nn.Module):
    """Keras' `VGG16(include_top=False)`: NHWC in, (N, H/32, W/32, 512) out; params keep Keras names.

    Random init is Keras' own (Glorot-uniform kernels, zero biases), so `random` means the same here.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, start: int = 0, stop: int = N_CONV):
        if not 0 <= start <= stop <= N_CONV:
            raise ValueError(f"need 0 <= start <= stop <= {N_CONV}, got start={start}, stop={stop}")
        x = x.astype(self.dtype)
        for i in range(start, stop):
            name, features = CONV_LAYERS[i]
            conv = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=nn.initializers.glorot_uniform(), name=name)
            x = nn.relu(conv(x))
            if i + 1 in BLOCK_END:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x


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

    The head sees the pooled outputs of the blocks in `taps` (the seed: block 5 flattened), concatenated
    in block order. What crosses a split point `k` is `{"h": activation after conv k, "taps": pooled
    outputs of tapped blocks already passed}`; at k = 13 only `taps` is left, the head's whole input.
    """

    num_classes: int
    hidden: int = 256
    dropout: float = 0.0
    pooling: str = "flatten"
    normalize: bool = False
    dtype: Any = jnp.float32
    taps: tuple[int, ...] = (5,)

    def setup(self):
        self.base = VGG16Base(dtype=self.dtype)
        self.head = Head(self.num_classes, self.hidden, self.dropout, self.normalize)

    def __call__(self, x, train: bool = False, start: int = 0):
        """Logits from images (start 0), an activation at `start`, or the inputs dict at `start`."""
        return self.head(self.head_inputs(x, start), train=train)

    def advance(self, inputs, start: int, stop: int) -> dict:
        """Split-point inputs at `start` -> at `stop`, pooling each tapped block on the way."""
        if not isinstance(inputs, dict):
            inputs = {"h": inputs, "taps": jnp.zeros((inputs.shape[0], 0), jnp.float32)}
        x, pooled, pos = inputs.get("h"), [inputs["taps"]], start
        for block, end in enumerate(BLOCK_END[1:], 1):
            if start < end <= stop and block in self.taps:
                x = self.base(x, pos, end)
                pos = end
                pooled.append(pool_features(x.astype(jnp.float32), self.pooling))
        if stop < N_CONV:  # past the last tap nothing is needed at the end of the base
            x = self.base(x, pos, stop)
        return {"h": x if stop < N_CONV else None, "taps": jnp.concatenate(pooled, axis=-1)}

    def prefix(self, x, stop: int) -> dict:
        return self.advance(x, 0, stop)

    def head_inputs(self, x, start: int = 0):
        """The head's (unnormalised) input: what the normalisation statistics are fitted on."""
        return self.advance(x, start, N_CONV)["taps"]
