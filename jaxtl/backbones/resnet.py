"""ResNet50 (Keras applications, v1): a 7x7 stem, a max-pool, then 16 bottleneck blocks in 4 stacks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.backbones.layers import BatchNorm, ConvBN, conv
from jaxtl.backbones.spec import Backbone, Download

EPS = 1.001e-5  # every BatchNormalization of keras.applications.resnet
STACKS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (filters, blocks, first stride), conv2..conv5
UNITS = ("conv1", "pool1") + tuple(f"conv{s + 2}_block{b + 1}" for s, (_, n, _) in enumerate(STACKS)
                                   for b in range(n))


class Bottleneck(nn.Module):
    """Keras' `resnet.block1`: 1x1 (strided) -> 3x3 -> 1x1 x4, a projection shortcut on each stack's first."""

    filters: int
    stride: int
    project: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f, d = self.filters, self.dtype
        shortcut = x
        if self.project:
            shortcut = BatchNorm(EPS, d, name="0_bn")(conv(4 * f, 1, "0_conv", strides=self.stride, bias=True,
                                                           padding="VALID", dtype=d)(x))
        x = nn.relu(BatchNorm(EPS, d, name="1_bn")(conv(f, 1, "1_conv", strides=self.stride, bias=True,
                                                         padding="VALID", dtype=d)(x)))
        x = nn.relu(BatchNorm(EPS, d, name="2_bn")(conv(f, 3, "2_conv", bias=True, dtype=d)(x)))
        x = BatchNorm(EPS, d, name="3_bn")(conv(4 * f, 1, "3_conv", bias=True, padding="VALID", dtype=d)(x))
        return nn.relu(shortcut + x)


class ResNet50(nn.Module):
    """Keras' `ResNet50(include_top=False)`: caffe-preprocessed NHWC in, (N, H/32, W/32, 2048) out."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, start: int = 0, stop: int | None = None):
        stop = len(UNITS) if stop is None else stop
        x = x.astype(self.dtype)
        for i in range(start, stop):
            name = UNITS[i]
            if name == "conv1":
                x = ConvBN(64, 7, EPS, "relu", strides=2, bias=True, pad=3, dtype=self.dtype, name=name)(x)
            elif name == "pool1":  # zero padding is safe after a ReLU
                x = nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), strides=(2, 2))
            else:
                s, b = int(name[4]) - 2, int(name.split("block")[1]) - 1
                filters, _, stride = STACKS[s]
                x = Bottleneck(filters, stride if b == 0 else 1, b == 0, self.dtype, name=name)(x)
        return x


def _layers():
    out = [("conv1_conv", ("conv1", "conv"), "conv"), ("conv1_bn", ("conv1", "bn"), "bn")]
    for unit in UNITS[2:]:
        parts = ("0", "1", "2", "3") if unit.endswith("block1") else ("1", "2", "3")
        for p in parts:
            out += [(f"{unit}_{p}_conv", (unit, f"{p}_conv"), "conv"), (f"{unit}_{p}_bn", (unit, f"{p}_bn"), "bn")]
    return out


_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
RESNET50 = Backbone(
    name="resnet50", module=ResNet50, units=UNITS, stage_end=(0, 1, 5, 9, 15, 18), preprocess="caffe",
    layers=_layers, file_format="keras", gmac_224=3.87,
    imagenet=Download(_FILE, "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + _FILE,
                      "4d473c1dd8becc155b73f8504c6f6626"))
