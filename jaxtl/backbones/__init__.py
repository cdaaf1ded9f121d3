"""The backbone registry: every family jaxtl can run, by the name `--backbone` takes.

    module, variables = jaxtl.load_backbone("efficientnet_lite0", "imagenet")
    features = module.apply(variables, x)   # x: NHWC float32, the family's own preprocessed input

Each family lives in its own module (`vgg`, `resnet`, `mobilenet`, `efficientnet`) with its Flax module,
its units and stages (`spec.Backbone`), and the layer names its weight files use.
"""

from __future__ import annotations

import functools

from jaxtl.backbones.efficientnet import EFFICIENTNET_B0, EFFICIENTNET_LITE0
from jaxtl.backbones.mobilenet import MOBILENET_V2
from jaxtl.backbones.resnet import RESNET50
from jaxtl.backbones.spec import Backbone, Download
from jaxtl.backbones.vgg import VGG16, VGG19

BACKBONES: dict[str, Backbone] = {b.name: b for b in (VGG16, VGG19, RESNET50, MOBILENET_V2, EFFICIENTNET_B0,
                                                      EFFICIENTNET_LITE0)}
__all__ = ["BACKBONES", "Backbone", "Download", "get", "load_backbone", "param_shapes"]


def get(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: use one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


@functools.cache
def param_shapes(name: str) -> dict:
    """The whole base's params as shapes (nested dicts of tuples), computed without compute."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda: get(name).module().init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    return jax.tree.map(lambda a: tuple(a.shape), shapes["params"])


def load_backbone(name: str, weights: str = "imagenet", seed: int = 0):
    """(Flax module, variables) of backbone `name` with `weights`: `imagenet`, a weight file, or `random`.

    `module.apply(variables, x)` on the family's own preprocessed NHWC input equals Keras'
    `keras.applications.<Family>(include_top=False)(x)` with the same weights (BatchNorm in inference mode),
    and for `efficientnet_lite0` the reference implementation's `extract_features` (NHWC in and out).
    """
    import jax
    import jax.numpy as jnp

    from jaxtl.weights import resolve_weights

    module = get(name).module()
    variables, _ = resolve_weights(weights, backbone=name)
    if variables is None:
        variables = jax.jit(module.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 64, 64, 3)))
    return module, jax.tree.map(jnp.asarray, variables)
