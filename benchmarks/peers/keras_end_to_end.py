"""The Keras half of benchmarks/end_to_end.py: the seed recipe's training on given images.

    KERAS_BACKEND=tensorflow python benchmarks/peers/keras_end_to_end.py --data DIR --mode frozen

Reads DIR/x.npy (N, 224, 224, 3) and DIR/y.npy, splits as the seed does (stratified 80/20 test split
with random_state 42 via numpy only, validation_split 0.2), and prints one JSON line with the time of
`model.fit` (per epoch too) and of an equivalent `train_on_batch` loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keras_recipe import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", default="frozen", choices=("frozen", "finetune"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--fit-only", action="store_true", help="time `fit` and the test pass only (no loop)")
    args = ap.parse_args()
    import keras
    from sklearn.model_selection import train_test_split

    x, y = np.load(os.path.join(args.data, "x.npy")), np.load(os.path.join(args.data, "y.npy"))
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=42)

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    times: list[float] = []
    model = build(args.mode, x.shape[1])
    t = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=32, validation_split=0.2, verbose=0,
              callbacks=[EpochTimes()])
    fit_s = time.perf_counter() - t
    if args.fit_only:
        t = time.perf_counter()
        accuracy = float(model.evaluate(x_test, y_test, batch_size=32, verbose=0)[1])
        print(json.dumps({"fit_s": fit_s, "fit_epoch_s": times, "test_s": time.perf_counter() - t,
                          "test_accuracy": accuracy, "backend": keras.backend.backend()}))
        return

    model = build(args.mode, x.shape[1])
    n_val = int(round(len(x_train) * 0.2))
    fit_x, fit_y, val_x = x_train[:-n_val], y_train[:-n_val], x_train[-n_val:]
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(args.epochs):
        order = rng.permutation(len(fit_x))
        for i in range(0, len(order), 32):
            model.train_on_batch(fit_x[order[i:i + 32]], fit_y[order[i:i + 32]])
        model.predict_on_batch(val_x)
    loop_s = time.perf_counter() - t
    print(json.dumps({"fit_s": fit_s, "fit_epoch_s": times, "loop_s": loop_s, "backend": keras.backend.backend()}))


if __name__ == "__main__":
    main()
