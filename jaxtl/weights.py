"""Keras VGG16 weight files -> Flax variables, and where a run's weights come from.

Reads the legacy Keras HDF5 layout (ImageNet `..._notop.h5`, whole saved models), the Keras 3
`.weights.h5` layout, and jaxtl's own `.npz` (written by `convert`). Layers are matched by their
Keras layer name, never by position: Keras 3 group paths sort `conv2d_10` before `conv2d_2`.

    python -m jaxtl.weights inspect FILE
    python -m jaxtl.weights fetch [--dir weights]
    python -m jaxtl.weights convert FILE OUT.npz
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxtl.model import CONV_LAYERS, CONV_NAMES

IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"
# Files `imagenet` accepts, fastest to load first; the full file also holds the notop conv stack.
IMAGENET_CANDIDATES = ("vgg16_imagenet.npz", IMAGENET_FILE, "vgg16_weights_tf_dim_ordering_tf_kernels.h5")


class WeightsError(Exception):
    """A weight file that cannot serve as VGG16's conv base; the message is one line for the user."""


@dataclass
class WeightFile:
    path: str
    format: str
    layers: dict[str, list[np.ndarray]]  # every layer that holds arrays, by Keras layer name
    ignored: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # layer name -> group path, where it differs


def _expected_shapes() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    shapes, cin = {}, 3
    for name, cout in CONV_LAYERS:
        shapes[name] = ((3, 3, cin, cout), (cout,))
        cin = cout
    return shapes


def _attr_strings(attrs, name: str) -> list[str] | None:
    """Keras splits long attributes into `name0`, `name1`, ...; join them back."""
    if name in attrs:
        chunks = [attrs[name]]
    elif f"{name}0" in attrs:
        chunks, i = [], 0
        while f"{name}{i}" in attrs:
            chunks.append(attrs[f"{name}{i}"])
            i += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for chunk in chunks for v in chunk]


def _read_legacy(root, names: list[str]) -> dict[str, list[np.ndarray]]:
    layers = {}
    for layer in names:
        if layer not in root:
            continue
        group = root[layer]
        weight_names = _attr_strings(group.attrs, "weight_names") or []
        arrays = [np.asarray(group[w]) for w in weight_names]
        if arrays:
            layers[layer] = arrays
    return layers


def _read_keras3(f, where: dict[str, str]) -> dict[str, list[np.ndarray]]:
    layers: dict[str, list[np.ndarray]] = {}

    def visit(path, obj):
        if path.split("/")[-1] != "vars" or not hasattr(obj, "keys") or "name" not in obj.attrs:
            return
        keys = sorted((k for k in obj.keys() if k.isdigit()), key=int)
        if keys:
            name = obj.attrs["name"]
            name = name.decode("utf8") if isinstance(name, bytes) else str(name)
            layers[name] = [np.asarray(obj[k]) for k in keys]
            where[name] = path[:-len("/vars")] or "/"

    f.visititems(visit)
    return layers


def read_weight_file(path: str | os.PathLike) -> WeightFile:
    """Every weighted layer of a Keras H5 (legacy or Keras 3) or jaxtl `.npz` file, by layer name."""
    path = str(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such weight file")
    if path.endswith(".npz"):
        try:
            with np.load(path) as z:
                layers: dict[str, list[np.ndarray]] = {}
                for key in sorted(z.files):
                    layer, _, kind = key.partition("/")
                    layers.setdefault(layer, [None, None])[0 if kind == "kernel" else 1] = z[key]
        except (OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable .npz weight file ({e})") from None
        return WeightFile(path, "jaxtl-npz", layers)
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        names = _attr_strings(root.attrs, "layer_names")
        if names is not None:
            return WeightFile(path, "keras-legacy-h5", _read_legacy(root, names))
        where: dict[str, str] = {}
        layers = _read_keras3(f, where)
        if not layers:
            raise WeightsError(f"{path}: HDF5 file holds no Keras layer weights "
                               "(neither a legacy `layer_names` attribute nor Keras 3 `vars` groups)")
        return WeightFile(path, "keras3-weights-h5", layers, where=where)


def to_variables(wf: WeightFile) -> dict:
    """The `{'params': ...}` tree of `VGG16Base`; other layers land in `wf.ignored`."""
    expected = _expected_shapes()
    missing = [n for n in CONV_NAMES if n not in wf.layers]
    if missing:
        raise WeightsError(f"{wf.path}: layer {missing[0]} is missing ({len(missing)} of 13 VGG16 conv "
                           f"layers absent; found {sorted(wf.layers) or 'none'})")
    params = {}
    for name in CONV_NAMES:
        arrays = wf.layers[name]
        kernels = [a for a in arrays if a is not None and a.ndim == 4]
        biases = [a for a in arrays if a is not None and a.ndim == 1]
        want_k, want_b = expected[name]
        got = [tuple(a.shape) for a in arrays if a is not None]
        if len(arrays) != 2 or len(kernels) != 1 or len(biases) != 1:
            raise WeightsError(f"{wf.path}: layer {name} holds arrays of shapes {got}, "
                               f"expected kernel {want_k} and bias {want_b}")
        if kernels[0].shape != want_k or biases[0].shape != want_b:
            raise WeightsError(f"{wf.path}: layer {name} has kernel {kernels[0].shape} and bias "
                               f"{biases[0].shape}, expected kernel {want_k} and bias {want_b}")
        params[name] = {"kernel": kernels[0].astype(np.float32), "bias": biases[0].astype(np.float32)}
    wf.ignored = {n: [tuple(a.shape) for a in arrs if a is not None]
                  for n, arrs in wf.layers.items() if n not in expected}
    return {"params": params}


def load_vgg16_weights(path: str | os.PathLike) -> dict:
    """Variables for `VGG16Base().apply(...)` from a Keras VGG16 weight file."""
    return to_variables(read_weight_file(path))


def save_npz(variables: dict, out: str | os.PathLike) -> None:
    """Write converted variables atomically; `.npz` loads an order of magnitude faster than H5 parsing."""
    arrays = {f"{layer}/{k}": v for layer, p in variables["params"].items() for k, v in p.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, out)


def fetch(directory: str | os.PathLike = "weights", url: str = IMAGENET_URL, md5: str = IMAGENET_MD5,
          filename: str = IMAGENET_FILE, timeout: float = 30.0) -> Path:
    """Download the ImageNet notop file, check Keras' published MD5, and rename into place atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / filename
    digest = hashlib.md5()
    tmp = tempfile.NamedTemporaryFile(dir=directory, suffix=".part", delete=False)
    try:
        with tmp, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                tmp.write(chunk)
        if digest.hexdigest() != md5:
            raise WeightsError(f"{url}: MD5 {digest.hexdigest()} does not match the published {md5}; "
                               "the download is corrupt or not the Keras file")
        os.replace(tmp.name, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(f"cannot download {url} ({reason}); download it on a machine with internet "
                           f"and place it at {dest}, or set JAXTL_WEIGHTS to its path") from None
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return dest


def imagenet_search_paths(weights_dir: str | os.PathLike = "weights") -> list[Path]:
    dirs = [Path(weights_dir)]
    env = os.environ.get("JAXTL_WEIGHTS")
    if env:
        if Path(env).is_file():
            return [Path(env)]
        dirs.append(Path(env))
    dirs.append(Path.home() / ".keras" / "models")
    return [d / name for d in dirs for name in IMAGENET_CANDIDATES]


def resolve_weights(spec: str, weights_dir: str | os.PathLike = "weights",
                    allow_fetch: bool = True) -> tuple[dict | None, str]:
    """`imagenet` | a file path | `random` -> (variables or None for random init, where they came from)."""
    if spec == "random":
        return None, "random init"
    if spec == "imagenet":
        for candidate in imagenet_search_paths(weights_dir):
            if candidate.is_file():
                return load_vgg16_weights(candidate), f"imagenet ({candidate})"
        if not allow_fetch:
            raise WeightsError(f"ImageNet VGG16 weights not found in {weights_dir}/, $JAXTL_WEIGHTS or "
                               f"~/.keras/models/; run `python -m jaxtl.weights fetch`")
        path = fetch(weights_dir)
        return load_vgg16_weights(path), f"imagenet ({path}, downloaded)"
    return load_vgg16_weights(spec), str(spec)


def _inspect(path: str) -> str:
    wf = read_weight_file(path)
    to_variables(wf)
    lines = [f"{wf.path}: {wf.format}", f"VGG16 conv layers ({len(CONV_NAMES)}):"]
    lines += [f"  {n:14s} kernel {tuple(wf.layers[n][0].shape)} bias {tuple(wf.layers[n][1].shape)}"
              for n in CONV_NAMES]
    lines.append(f"ignored layers ({len(wf.ignored)}):")
    lines += [f"  {n:14s} {shapes}" + (f"  (at {wf.where[n]})" if n in wf.where else "")
              for n, shapes in sorted(wf.ignored.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxtl weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list the conv layers found and the layers ignored")
    p.add_argument("file")
    p = sub.add_parser("fetch", help="download the ImageNet notop file and verify its MD5")
    p.add_argument("--dir", default="weights")
    p.add_argument("--url", default=IMAGENET_URL)
    p = sub.add_parser("convert", help="convert a weight file into jaxtl's fast-loading .npz")
    p.add_argument("file")
    p.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(_inspect(args.file))
        elif args.command == "fetch":
            print(f"saved {fetch(args.dir, url=args.url)}")
        else:
            save_npz(load_vgg16_weights(args.file), args.out)
            print(f"wrote {args.out}")
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
