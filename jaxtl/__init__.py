"""jaxtl: fast, trustworthy transfer learning for audio classification with pretrained conv bases in JAX.

    from jaxtl import TrainConfig, train, load_run, load_backbone
"""

__all__ = ["Classifier", "Head", "Run", "TrainConfig", "VGG16Base", "load_backbone", "load_run", "load_vgg16_weights",
           "train"]
__version__ = "0.2.0"

_HOMES = {"Classifier": "model", "Head": "model", "VGG16Base": "model", "load_vgg16_weights": "weights",
          "TrainConfig": "config", "load_run": "api", "Run": "api", "load_backbone": "backbones"}


def __getattr__(name):  # lazy, so `python -m jaxtl.<module>` runs each module only once and `--version` is instant
    import importlib

    if name == "train":  # the module `jaxtl.train`, callable as its `train` function (see there)
        return importlib.import_module("jaxtl.train")
    if name in _HOMES:
        return getattr(importlib.import_module(f"jaxtl.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'jaxtl' has no attribute {name!r}")
