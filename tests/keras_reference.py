"""Keras reference models for the backbone parity checks, shared by tests/test_backbones.py and
benchmarks/parity.py (which prints the errors the tests bound)."""

from pathlib import Path

import numpy as np


def randomise_statistics(keras, model, rng) -> None:
    """BN moving statistics (and EfficientNet's input Normalization) far from 0 and 1, as trained ones are."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c),
                               rng.uniform(0.3, 3.0, c)])
        elif isinstance(layer, keras.layers.Normalization):
            layer.set_weights([np.array([0.48, 0.45, 0.40]), np.array([0.05, 0.06, 0.07]), np.array(0)])
            layer.finalize_state()  # Keras' Normalization reads its weights into `mean`/`variance` here


def saved_keras_model(keras, name: str, family: str, folder: Path, rng):
    """(model, {format: file}): Keras' `family` with random weights and statistics, saved as Keras 3
    `.weights.h5` and as legacy H5."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    model = getattr(keras.applications, family)(weights=None, include_top=False, input_shape=(None, None, 3))
    randomise_statistics(keras, model, rng)
    files = {"keras3": folder / f"{name}.weights.h5", "legacy": folder / f"{name}.h5"}
    model.save_weights(str(files["keras3"]))
    with h5py.File(files["legacy"], "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return model, files
