"""MobileNetV2 (Keras applications, alpha 1.0): inverted residual blocks of depthwise 3x3 convs, ReLU6."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.backbones.layers import BatchNorm, ConvBN, conv, relu6
from jaxtl.backbones.spec import Backbone, Download

EPS = 1e-3
MOMENTUM = 0.999  # every BatchNormalization of keras.applications.mobilenet_v2
# (filters, stride, expansion) of block_id 0..16, as keras.applications.mobilenet_v2 lists them
BLOCKS = ((16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (32, 1, 6), (32, 1, 6), (64, 2, 6), (64, 1, 6),
          (64, 1, 6), (64, 1, 6), (96, 1, 6), (96, 1, 6), (96, 1, 6), (160, 2, 6), (160, 1, 6), (160, 1, 6),
          (320, 1, 6))
UNITS = ("Conv1", "expanded_conv") + tuple(f"block_{i}" for i in range(1, 17)) + ("Conv_1",)


class InvertedResidual(nn.Module):
    filters: int
    stride: int
    expansion: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, cin = self.dtype, x.shape[-1]
        h = x
        if self.expansion != 1:
            h = conv(cin * self.expansion, 1, "expand", dtype=d)(h)
            h = relu6(BatchNorm(EPS, d, MOMENTUM, name="expand_BN")(h))
        width = h.shape[-1]
        h = conv(width, 3, "depthwise", strides=self.stride, groups=width, dtype=d)(h)
        h = relu6(BatchNorm(EPS, d, MOMENTUM, name="depthwise_BN")(h))
        h = BatchNorm(EPS, d, MOMENTUM, name="project_BN")(conv(self.filters, 1, "project", dtype=d)(h))
        return x + h if self.stride == 1 and cin == self.filters else h


class MobileNetV2(nn.Module):
    """Keras' `MobileNetV2(include_top=False)`: [-1, 1] NHWC in, (N, H/32, W/32, 1280) out.

    Keras pads a stride-2 depthwise conv by `correct_pad` and runs it 'valid': for a 3x3 kernel that is
    exactly XLA's 'SAME' padding, at even and odd sizes alike.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, start: int = 0, stop: int | None = None):
        stop = len(UNITS) if stop is None else stop
        x = x.astype(self.dtype)
        for i in range(start, stop):
            if i == 0:
                x = ConvBN(32, 3, EPS, "relu6", strides=2, momentum=MOMENTUM, dtype=self.dtype, name=UNITS[i])(x)
            elif i == len(UNITS) - 1:
                x = ConvBN(1280, 1, EPS, "relu6", momentum=MOMENTUM, dtype=self.dtype, name=UNITS[i])(x)
            else:
                x = InvertedResidual(*BLOCKS[i - 1], self.dtype, name=UNITS[i])(x)
        return x


def _layers():
    out = [("Conv1", ("Conv1", "conv"), "conv"), ("bn_Conv1", ("Conv1", "bn"), "bn")]
    for i, unit in enumerate(UNITS[1:-1]):
        prefix = "expanded_conv_" if i == 0 else f"block_{i}_"
        parts = (("depthwise", "dwconv"), ("depthwise_BN", "bn"), ("project", "conv"), ("project_BN", "bn"))
        if i:
            parts = (("expand", "conv"), ("expand_BN", "bn")) + parts
        out += [(prefix + p, (unit, p), kind) for p, kind in parts]
    return out + [("Conv_1", ("Conv_1", "conv"), "conv"), ("Conv_1_bn", ("Conv_1", "bn"), "bn")]


_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
MOBILENET_V2 = Backbone(
    name="mobilenet_v2", module=MobileNetV2, units=UNITS, stage_end=(0, 2, 4, 7, 14, 19), preprocess="tf",
    layers=_layers, file_format="keras", gmac_224=0.30,
    imagenet=Download(_FILE, "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/" + _FILE))
