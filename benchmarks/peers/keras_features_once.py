"""A competent Keras user's frozen job: the base runs once over the clips, then the head fits on the stored
features (Keras' own transfer-learning guide: `base.predict`, then `fit` of a small model).

    KERAS_BACKEND=tensorflow python benchmarks/peers/keras_features_once.py --data DIR [--epochs 10]

Reads DIR/x.npy (N, S, S, 3) images and DIR/y.npy, splits as the seed does (stratified 80/20 test split,
random_state 42; `validation_split` 0.2 in `fit`), and prints one JSON line: seconds of the base pass, of
the head's `fit`, of the test pass, and the test accuracy. It imports no jaxtl.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    import keras
    from sklearn.model_selection import train_test_split

    x, y = np.load(os.path.join(args.data, "x.npy")), np.load(os.path.join(args.data, "y.npy"))
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=42)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=x.shape[1:])
    t = time.perf_counter()
    train_features = base.predict(x_train, batch_size=32, verbose=0)
    predict_s = time.perf_counter() - t
    head = keras.Sequential([keras.Input(train_features.shape[1:]), keras.layers.Flatten(),
                             keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t = time.perf_counter()
    head.fit(train_features, y_train, epochs=args.epochs, batch_size=32, validation_split=0.2, verbose=0)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    test_features = base.predict(x_test, batch_size=32, verbose=0)
    accuracy = float(head.evaluate(test_features, y_test, verbose=0)[1])
    test_s = time.perf_counter() - t
    print(json.dumps({"predict_s": predict_s, "fit_s": fit_s, "test_s": test_s,
                      "total_s": predict_s + fit_s + test_s, "test_accuracy": accuracy}))


if __name__ == "__main__":
    main()
