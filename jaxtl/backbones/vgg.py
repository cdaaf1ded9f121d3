"""VGG16 and VGG19 (Keras applications): plain 3x3 convs, a 2x2 max-pool closing each of 5 blocks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.backbones.layers import conv
from jaxtl.backbones.spec import Backbone, Download


def _layers(depths: tuple[int, ...]) -> tuple[tuple[str, int], ...]:
    widths = (64, 128, 256, 512, 512)
    return tuple((f"block{b + 1}_conv{i + 1}", widths[b]) for b, n in enumerate(depths) for i in range(n))


VGG16_LAYERS = _layers((2, 2, 3, 3, 3))
VGG19_LAYERS = _layers((2, 2, 4, 4, 4))


class VGG(nn.Module):
    """Keras' `VGG16/VGG19(include_top=False)`: NHWC in, (N, H/32, W/32, 512) out; params keep Keras names.

    Random init is Keras' own (Glorot-uniform kernels, zero biases), so `random` means the same here.
    """

    dtype: Any = jnp.float32
    layers: tuple[tuple[str, int], ...] = VGG16_LAYERS

    @nn.compact
    def __call__(self, x, start: int = 0, stop: int | None = None):
        stop = len(self.layers) if stop is None else stop
        if not 0 <= start <= stop <= len(self.layers):
            raise ValueError(f"need 0 <= start <= stop <= {len(self.layers)}, got start={start}, stop={stop}")
        x = x.astype(self.dtype)
        for i in range(start, stop):
            name, features = self.layers[i]
            x = nn.relu(conv(features, 3, name, bias=True, dtype=self.dtype)(x))
            if i + 1 == len(self.layers) or self.layers[i + 1][0].split("_")[0] != name.split("_")[0]:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x


def _spec(name: str, layers, md5: str, gmac: float) -> Backbone:
    ends, n = [0], 0
    for b in range(1, 6):
        n += sum(1 for layer, _ in layers if layer.startswith(f"block{b}_"))
        ends.append(n)
    filename = f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return Backbone(
        name=name, module=lambda dtype=jnp.float32: VGG(dtype, layers), units=tuple(n for n, _ in layers),
        stage_end=tuple(ends), preprocess="caffe", file_format="keras", gmac_224=gmac,
        layers=lambda: [(layer, (layer,), "conv") for layer, _ in layers],
        imagenet=Download(filename, f"https://storage.googleapis.com/tensorflow/keras-applications/{name}/{filename}",
                          md5))


VGG16 = _spec("vgg16", VGG16_LAYERS, "6d6bbae143d832006294945121d1f1fc", 15.35)
VGG19 = _spec("vgg19", VGG19_LAYERS, "253f8cb515780f3b799900260a226db6", 19.5)
