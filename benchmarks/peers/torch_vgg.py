"""The seed recipe in PyTorch/torchvision: VGG16 features -> Flatten -> Linear(256) -> Linear, NCHW.

    python benchmarks/peers/torch_vgg.py --mode frozen --batch 32 --size 224

Prints one JSON line like keras_recipe.py. Frozen layers get requires_grad=False, as torch users do.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_args import parse_step_args  # noqa: E402


def main() -> None:
    args = parse_step_args()
    import torch
    import torchvision

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = torchvision.models.vgg16(weights=None).features
    for i, p in enumerate(base.parameters()):
        trainable = args.mode == "full" or (args.mode == "finetune" and i >= 20)  # block5: the last 6 tensors
        p.requires_grad_(trainable)
    side = args.size // 32
    model = torch.nn.Sequential(base, torch.nn.Flatten(), torch.nn.Linear(512 * side * side, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).to(dev)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    print(json.dumps({"peer": "torch", "mode": args.mode, "step_s": med, "images_per_s": args.batch / med}))


if __name__ == "__main__":
    main()
