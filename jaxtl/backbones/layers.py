"""Layers the backbone families share: Keras-named convs, inference-mode BatchNorm, TF-style padding.

BatchNorm keeps its moving statistics in `params` (plain pytrees, one tree per model) under Keras' names;
they never get gradients (`stop_gradient`) and their optimizer label is always `frozen`, so a frozen or
fine-tuned block normalises with the file's statistics, as Keras' `trainable=False` BN does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_STATS = ("moving_mean", "moving_variance")
GLOROT = nn.initializers.glorot_uniform()
# EfficientNet's CONV_KERNEL_INITIALIZER in Keras (and the TF reference): He normal on fan-out
HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
    """Keras' BatchNormalization: `gamma * (x - mean) / sqrt(var + eps) + beta`, in inference mode (the moving
    statistics), unless the `bn_stats` collection is mutable (`--bn train`, a unit that trains): then the
    batch's own statistics, and the updated moving ones are put there for the step to keep."""

    epsilon: float
    dtype: Any = jnp.float32
    momentum: float = 0.99  # Keras' default (MobileNetV2: 0.999)

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (c,), jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (c,), jnp.float32)
        mean = jax.lax.stop_gradient(self.param("moving_mean", nn.initializers.zeros, (c,), jnp.float32))
        var = jax.lax.stop_gradient(self.param("moving_variance", nn.initializers.ones, (c,), jnp.float32))
        if self.is_mutable_collection("bn_stats"):
            axes = tuple(range(x.ndim - 1))
            batch_mean, batch_var = x.astype(jnp.float32).mean(axes), x.astype(jnp.float32).var(axes)
            m = self.momentum
            self.put_variable("bn_stats", "moving_mean", m * mean + (1 - m) * jax.lax.stop_gradient(batch_mean))
            self.put_variable("bn_stats", "moving_variance", m * var + (1 - m) * jax.lax.stop_gradient(batch_var))
            mean, var = batch_mean, batch_var
        scale = gamma * jax.lax.rsqrt(var + self.epsilon)
        return x * scale.astype(x.dtype) + (beta - mean * scale).astype(x.dtype)


def depthwise_same(x, kernel, strides: int):
    """A depthwise conv with TF 'SAME' padding as k*k shifted multiply-adds (kernel (k, k, 1, C)): on XLA:CPU
    8-32x faster than its grouped convolution forward, 4-40x backward (benchmarks/depthwise.py)."""
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    oh, ow = -(-h // strides), -(-w // strides)
    ph, pw = max((oh - 1) * strides + kh - h, 0), max((ow - 1) * strides + kw - w, 0)
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = 0
    for i in range(kh):
        for j in range(kw):
            rows, cols = slice(i, i + (oh - 1) * strides + 1, strides), slice(j, j + (ow - 1) * strides + 1, strides)
            out = out + x[:, rows, cols] * kernel[i, j, 0]
    return out


class DepthwiseConv(nn.Module):
    """`nn.Conv(C, groups=C)` with the same param (`kernel`, (k, k, 1, C)) and init; on CPU `depthwise_same`."""

    kernel_size: int
    strides: int = 1
    dtype: Any = jnp.float32
    init: Any = GLOROT

    @nn.compact
    def __call__(self, x):
        k, c = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", self.init, (k, k, 1, c), jnp.float32).astype(self.dtype)
        x = x.astype(self.dtype)
        if jax.default_backend() == "cpu":
            return depthwise_same(x, kernel, self.strides)
        return jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def conv(features: int, kernel: int, name: str, *, strides: int = 1, padding="SAME", bias: bool = False,
         dtype=jnp.float32, init=GLOROT, groups: int = 1) -> nn.Module:
    """A Keras-named 2-D convolution (`groups` = channels: a depthwise one)."""
    if groups > 1 and groups == features and padding == "SAME" and not bias:
        return DepthwiseConv(kernel, strides, dtype, init, name=name)
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, use_bias=bias,
                   feature_group_count=groups, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, name=name)


def relu6(x):
    return jnp.clip(x, 0, 6)


def swish(x):
    return x * jax.nn.sigmoid(x)


ACTIVATIONS = {"relu": nn.relu, "relu6": relu6, "swish": swish}


class ConvBN(nn.Module):
    """A stem or head unit: conv -> BatchNorm -> activation, params `{"conv": ..., "bn": ...}`."""

    features: int
    kernel: int
    epsilon: float
    activation: str
    strides: int = 1
    bias: bool = False
    pad: int = 0  # explicit zero padding, then a 'VALID' conv (ResNet's stem); 0: 'SAME'
    init: Any = GLOROT
    momentum: float = 0.99
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.pad:
            x = jnp.pad(x, ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0)))
        x = conv(self.features, self.kernel, "conv", strides=self.strides, bias=self.bias,
                 padding="VALID" if self.pad else "SAME", dtype=self.dtype, init=self.init)(x)
        return ACTIVATIONS[self.activation](BatchNorm(self.epsilon, self.dtype, self.momentum, name="bn")(x))
