"""Read a PyTorch state dict (`torch.save`, legacy or zip format) into numpy arrays, without torch.

A `.pth` is a pickle, and a pickle can run code. This reader admits only what torch's `weights_only=True`
admits for a state dict: tensor-rebuild functions, typed storages and `OrderedDict`. Any other global is
refused before it is called, in one line. Chosen over a one-time `torch.load` conversion so that training
on a PyTorch file needs no torch install (a 190 MB to several-GB dependency) and no trust in the file.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

STORAGES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
            "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
            "ByteStorage": "u1", "BoolStorage": "?"}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class TorchFileError(Exception):
    """A file that is not a plain PyTorch state dict, or that asks to run code; one line for the user."""


@dataclass
class _Storage:
    dtype: str
    key: str
    data: np.ndarray | None = None


@dataclass
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def within(self, n: int) -> bool:
        """Every element this size, stride and offset address lies in a storage of `n` elements."""
        if min(self.stride, default=0) < 0 or min(self.size, default=0) < 0 or self.offset < 0:
            return False
        if 0 in self.size:
            return True
        return self.offset + sum((d - 1) * s for d, s in zip(self.size, self.stride)) < n

    def array(self, path: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise TorchFileError(f"{path}: truncated (storage {self.storage.key} has no data)")
        if not self.within(len(data)):
            raise TorchFileError(f"{path}: a tensor reaches outside its storage (size {self.size}, stride "
                                 f"{self.stride}, offset {self.offset}, storage of {len(data)})")
        item = data.itemsize
        out = np.lib.stride_tricks.as_strided(data[self.offset:], self.size, tuple(s * item for s in self.stride))
        out = np.array(out)  # a copy: the file's buffer is not kept
        if self.storage.dtype == "<u2":  # bfloat16: the high half of a float32
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"a tensor is built from a {type(storage).__name__}, not a storage")
    return _Tensor(storage, int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


class _Storage_type:  # what `torch.FloatStorage` and friends unpickle to: a dtype
    def __init__(self, dtype):
        self.dtype = dtype


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): lambda s, o, size, stride: _rebuild_tensor_v2(s, o, size, stride),
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            **{("torch", name): _Storage_type(dtype) for name, dtype in STORAGES.items()}}


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, path, storages: dict):
        super().__init__(f)
        self.path, self.storages = path, storages

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise TorchFileError(f"{self.path}: refused: the pickle asks for {module}.{name}, which a state dict of "
                                 "tensors never needs (a pickle can run code; only tensor data is admitted)")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _Storage_type)):
            raise TorchFileError(f"{self.path}: refused: an unknown persistent object {str(pid)[:60]!r}")
        key = str(pid[2])
        if key not in self.storages:
            self.storages[key] = _Storage(pid[1].dtype, key)
        if len(pid) > 5 and pid[5] is not None:  # a legacy view: (view key, offset, size)
            raise TorchFileError(f"{self.path}: storage views are not supported (re-save with a current torch)")
        return self.storages[key]


def _load(f, path, storages):
    try:
        return _Unpickler(f, path, storages).load()
    except TorchFileError as e:
        raise TorchFileError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    except Exception as e:  # a truncated or foreign file: pickle raises many kinds
        raise TorchFileError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None


def _read_legacy(f, path) -> object:
    storages: dict[str, _Storage] = {}
    if _load(f, path, storages) != LEGACY_MAGIC:
        raise TorchFileError(f"{path}: not a PyTorch file (no torch.save magic number)")
    _load(f, path, storages)  # protocol version
    _load(f, path, storages)  # system info
    result = _load(f, path, storages)
    keys = _load(f, path, storages)
    if not isinstance(keys, list):
        raise TorchFileError(f"{path}: not a PyTorch file (no storage list)")
    for key in keys:
        storage = storages.get(str(key))
        header = f.read(8)
        if storage is None or len(header) != 8:
            raise TorchFileError(f"{path}: truncated or inconsistent (storage {key})")
        dtype = np.dtype(storage.dtype)
        count = int(np.frombuffer(header, "<i8")[0])
        raw = f.read(count * dtype.itemsize) if 0 <= count <= (1 << 40) else b""
        if count < 0 or len(raw) != count * dtype.itemsize:
            raise TorchFileError(f"{path}: truncated (storage {key} ends early)")
        storage.data = np.frombuffer(raw, dtype)
    return result


def _read_zip(path) -> object:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise TorchFileError(f"{path}: a zip archive without data.pkl is not a PyTorch file")
        prefix = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        result = _load(io.BytesIO(z.read(pkl)), path, storages)
        for key, storage in storages.items():
            try:
                storage.data = np.frombuffer(z.read(f"{prefix}data/{key}"), np.dtype(storage.dtype))
            except KeyError:
                raise TorchFileError(f"{path}: storage {key} is missing from the archive") from None
    return result


def read_state_dict(path) -> dict[str, np.ndarray]:
    """`{name: array}` of a `torch.save(state_dict)` file; refuses anything but tensors and dicts."""
    path = str(path)
    if zipfile.is_zipfile(path):
        obj = _read_zip(path)
    else:
        with open(path, "rb") as f:
            obj = _read_legacy(f, path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v.array(path) for k, v in obj.items() if isinstance(v, _Tensor)}
