"""A competent PyTorch user's frozen job: torchvision's VGG16 features (or, where torchvision does not load,
the same 13 convs and 5 pools in plain torch) run once over the clips (inference mode; bf16 autocast on a
GPU), then the seed's head (Flatten -> Linear(256) -> ReLU -> Linear) fits on the
stored features with Adam 1e-3, batch 32, for a fixed number of epochs.

    python benchmarks/peers/torch_features_once.py --data DIR [--epochs 10]

Reads DIR/x.npy (N, S, S, 3) and DIR/y.npy, splits as keras_features_once.py does (stratified 80/20 test
split, random_state 42; the last 20 % of the training part for validation, as Keras' validation_split),
and prints one JSON line like it. It imports no jaxtl.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def vgg16_features(torch):
    """(torchvision's `vgg16().features`, "torchvision"), else the same layers built here ("plain torch")."""
    try:
        import torchvision

        return torchvision.models.vgg16(weights=None).features, "torchvision"
    except Exception:  # e.g. a torchvision wheel built for another torch: its C ops fail to load
        layers, channels = [], 3
        for block in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
            for width in block:
                layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU(inplace=True)]
                channels = width
            layers.append(torch.nn.MaxPool2d(2, 2))
        return torch.nn.Sequential(*layers), "plain torch (torchvision did not load)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    import torch
    from sklearn.model_selection import train_test_split

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = np.load(os.path.join(args.data, "x.npy")), np.load(os.path.join(args.data, "y.npy"))
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=42)
    base, source = vgg16_features(torch)
    base = base.to(dev).eval().to(memory_format=torch.channels_last)

    def features(images: np.ndarray) -> torch.Tensor:
        out = []
        with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            for i in range(0, len(images), 32):
                batch = torch.from_numpy(images[i:i + 32]).to(dev).permute(0, 3, 1, 2)
                out.append(base(batch.contiguous(memory_format=torch.channels_last)).float().flatten(1))
        return torch.cat(out)

    t = time.perf_counter()
    train_features = features(x_train)
    predict_s = time.perf_counter() - t
    n_val = int(round(len(train_features) * 0.2))
    fit_x, fit_y = train_features[:-n_val], torch.from_numpy(y_train[:-n_val]).long().to(dev)
    head = torch.nn.Sequential(torch.nn.Linear(fit_x.shape[1], 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, int(y.max()) + 1)).to(dev)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(fit_x), generator=g).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(fit_x[idx.to(dev)]), fit_y[idx.to(dev)]).backward()
            opt.step()
        with torch.no_grad():
            head(train_features[-n_val:])  # validation pass, as fit's validation_split does
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        pred = head(features(x_test)).argmax(-1).cpu().numpy()
    test_s = time.perf_counter() - t
    print(json.dumps({"predict_s": predict_s, "fit_s": fit_s, "test_s": test_s, "total_s": predict_s + fit_s + test_s,
                      "test_accuracy": float(np.mean(pred == y_test)), "device": dev, "vgg16": source,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
