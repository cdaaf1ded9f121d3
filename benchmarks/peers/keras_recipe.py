"""The seed recipe in Keras (backend from KERAS_BACKEND): VGG16 base -> Flatten -> Dense(256) -> Dense.

    KERAS_BACKEND=tensorflow python benchmarks/peers/keras_recipe.py --mode frozen --batch 32 --size 224

Prints one JSON line: median `train_on_batch` time over --steps steps after warm-up. Modes: `frozen`
(base.trainable = False, as the seed), `finetune` (last block trainable), `full` (everything).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_args import parse_step_args  # noqa: E402


def build(mode: str, size: int, classes: int = 10):
    import keras

    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    if mode == "frozen":
        base.trainable = False
    elif mode == "finetune":
        for layer in base.layers:
            layer.trainable = layer.name.startswith("block5")
    model = keras.Sequential([base, keras.layers.Flatten(), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(classes, activation="softmax")])
    lr = 1e-3 if mode == "frozen" else 1e-5
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    args = parse_step_args()
    import keras

    model = build(args.mode, args.size)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    t = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - t
    model.train_on_batch(x, y)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t)
    print(json.dumps({"peer": f"keras-{keras.backend.backend()}", "mode": args.mode, "first_step_s": first,
                      "step_s": float(np.median(times)), "images_per_s": args.batch / float(np.median(times))}))


if __name__ == "__main__":
    main()
