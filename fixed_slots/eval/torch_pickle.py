"""Reading `torch.save` files without torch: state_dicts as NumPy arrays.

Both serialization formats: zip (`data.pkl` + `data/<key>` blobs, torch >= 1.6) and legacy
(consecutive pickles followed by the raw storages). The unpickler resolves only the globals a
state_dict needs (tensors, parameters, OrderedDict), never arbitrary code. `read_torch_state_dict`
uses torch itself when it is installed (or when asked to).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Callable, Optional, Sequence

import ml_dtypes
import numpy as np


_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# torch.save's legacy (pre-1.6, non-zip) format starts with this pickled magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer; in the legacy format its bytes arrive after the pickle."""

    def __init__(self, dtype: np.dtype, numel: int, root: Optional["_Storage"] = None,
                 offset: int = 0):
        self.dtype = dtype
        self.numel = numel
        self.root = root
        self.offset = offset
        self.data: Optional[np.ndarray] = None

    def array(self) -> np.ndarray:
        if self.root is not None:
            return self.root.array()[self.offset:self.offset + self.numel]
        if self.data is None:
            raise pickle.UnpicklingError("tensor storage was never read")
        return self.data


class _LazyTensor:
    """A tensor view recorded while unpickling, materialised once all storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: Sequence[int],
                 stride: Sequence[int]):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialize(self) -> np.ndarray:
        flat = self.storage.array()
        if not self.size:
            return flat[self.offset].copy()
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride])
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> _LazyTensor:
    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    # backward_hooks[, metadata]) and the older _rebuild_tensor(storage, offset, size, stride).
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_unused):
    return data


def _rebuild_from_type_v2(func, _new_type, args, _state):
    return func(*args)


class _Placeholder:
    """Stands in for torch classes that are only passed around (e.g. torch.Tensor)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Placeholder,
    ("torch.nn.parameter", "Parameter"): _Placeholder,
    ("torch", "device"): _Placeholder,
}


class _TorchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a state_dict needs (no arbitrary code)."""

    def __init__(self, file: io.IOBase, storage_loader: Callable[..., _Storage]):
        super().__init__(file)
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"unsupported global in torch checkpoint: {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {typename!r}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return self._storage_loader(storage_type.dtype, str(key), int(numel), view_metadata)


def _materialize(obj: Any) -> Any:
    """Replaces every _LazyTensor in nested dicts/lists/tuples by its NumPy array."""
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _read_zip_checkpoint(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a torch zip checkpoint (no unique data.pkl)")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
        storages: dict[str, _Storage] = {}

        def load(dtype: np.dtype, key: str, numel: int, _view: Any) -> _Storage:
            if key not in storages:
                raw = zf.read(f"{prefix}data/{key}")
                dt = dtype.newbyteorder("<" if byteorder == "little" else ">")
                if len(raw) < numel * dtype.itemsize:
                    raise ValueError(f"{path}: storage {key} is truncated")
                arr = np.frombuffer(raw, dtype=dt, count=numel)
                storage = _Storage(dtype, numel)
                storage.data = arr.astype(dtype)
                storages[key] = storage
            return storages[key]

        with zf.open(pkl[0]) as f:
            return _materialize(_TorchUnpickler(io.BytesIO(f.read()), load).load())


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in checkpoint header")


def _read_legacy_checkpoint(path: str) -> Any:
    with open(path, "rb") as f:
        magic = _PlainUnpickler(f).load()
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch checkpoint (bad magic number)")
        _PlainUnpickler(f).load()  # protocol version
        sys_info = _PlainUnpickler(f).load()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        roots: dict[str, _Storage] = {}

        def load(dtype: np.dtype, key: str, numel: int, view: Any) -> _Storage:
            if key not in roots:
                roots[key] = _Storage(dtype, numel)
            if view is None:
                return roots[key]
            _view_key, offset, view_size = view
            return _Storage(dtype, int(view_size), root=roots[key], offset=int(offset))

        result = _TorchUnpickler(f, load).load()
        keys = _PlainUnpickler(f).load()
        for key in keys:
            storage = roots[str(key)]
            numel = int(np.frombuffer(f.read(8), "<i8" if little else ">i8")[0])
            nbytes = numel * storage.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path}: storage {key} is truncated")
            dt = storage.dtype.newbyteorder("<" if little else ">")
            storage.data = np.frombuffer(raw, dtype=dt).astype(storage.dtype)
            storage.numel = numel
    return _materialize(result)


def read_torch_checkpoint(path: str) -> Any:
    """Loads a `torch.save` file (zip or legacy format) with tensors as NumPy arrays, no torch."""
    if zipfile.is_zipfile(path):
        return _read_zip_checkpoint(path)
    return _read_legacy_checkpoint(path)


def _flatten_state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    # Some checkpoints nest the weights (e.g. {"state_dict": {...}}); flatten with dots.
    out = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_state_dict(v, name + "."))
        elif isinstance(v, np.ndarray) or np.isscalar(v):
            out[name] = np.asarray(v)
    return out


def read_torch_state_dict(path: str, use_torch: Optional[bool] = None) -> dict[str, np.ndarray]:
    """A PyTorch state_dict file -> {name: np.ndarray}, via torch if installed (or `use_torch`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no torch checkpoint at {path!r}")
    if use_torch is None:
        try:
            import torch  # noqa: F401  (optional)
            use_torch = True
        except ImportError:
            use_torch = False
    if use_torch:
        import torch
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                for k, v in obj.items()}
    obj = read_torch_checkpoint(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict), got {type(obj).__name__}")
    return _flatten_state_dict(obj)
