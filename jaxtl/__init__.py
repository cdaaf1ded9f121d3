"""jaxtl: fast, trustworthy transfer learning for audio classification with a VGG16 base in JAX."""

__all__ = ["Classifier", "Head", "VGG16Base", "load_vgg16_weights"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `python -m jaxtl.<module>` runs each module only once
    if name in ("Classifier", "Head", "VGG16Base"):
        from jaxtl import model

        return getattr(model, name)
    if name == "load_vgg16_weights":
        from jaxtl.weights import load_vgg16_weights

        return load_vgg16_weights
    raise AttributeError(f"module 'jaxtl' has no attribute {name!r}")
