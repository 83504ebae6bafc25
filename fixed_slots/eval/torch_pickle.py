"""Reading `torch.save` files without torch: state_dicts as NumPy arrays.

Both serialization formats: zip (`data.pkl` + `data/<key>` blobs, torch >= 1.6) and legacy
(consecutive pickles followed by the raw storages). The unpickler resolves only the globals a
state_dict needs (tensors, parameters, OrderedDict), never arbitrary code. Every tensor is a view
(offset, sizes, strides) of a storage: each is checked against the storage's bytes as actually
read (non-negative integer offset, sizes and strides, the last element inside the storage, at most
`MAX_VIEW_ELEMENTS` elements) before NumPy builds it, so a crafted file can neither read outside
its buffers nor allocate without bound (`TorchCheckpointError` names the tensor and the storage).
`read_torch_state_dict` uses torch itself when it is installed (or when asked to).
"""
from __future__ import annotations

import collections
import io
import math
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


# The most elements one tensor may hold (2**31 float32 values are 8 GiB; the largest tensor of
# the FID Inception weights has 2 million): a view with stride 0 could otherwise ask for any size.
MAX_VIEW_ELEMENTS = 2**31


class TorchCheckpointError(pickle.UnpicklingError, ValueError):
    """A torch checkpoint that is malformed, or whose tensor views leave their storage."""


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TorchCheckpointError(f"{what} is {value!r}, not an integer")
    return int(value)


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer; in the legacy format its bytes arrive after the pickle."""

    def __init__(self, dtype: np.dtype, numel: int, root: Optional["_Storage"] = None,
                 offset: int = 0):
        self.dtype = dtype
        self.numel = _integer(numel, "a storage's size")
        self.root = root
        self.offset = _integer(offset, "a storage view's offset")
        if self.numel < 0 or self.offset < 0:
            raise TorchCheckpointError(f"a storage of {self.numel} elements at offset "
                                       f"{self.offset}: both must be >= 0")
        self.data: Optional[np.ndarray] = None

    def array(self) -> np.ndarray:
        if self.root is not None:
            whole = self.root.array()
            if self.offset + self.numel > whole.size:
                raise TorchCheckpointError(
                    f"a storage view of elements [{self.offset}, {self.offset + self.numel}) "
                    f"lies outside its storage of {whole.size} elements")
            return whole[self.offset:self.offset + self.numel]
        if self.data is None:
            raise TorchCheckpointError("tensor storage was never read")
        return self.data


class _LazyTensor:
    """A tensor view recorded while unpickling, materialised once all storages are read.

    Its offset, sizes and strides are checked (integers, none negative, at most
    MAX_VIEW_ELEMENTS elements, the last element inside the storage's actual length) before
    `as_strided`, which trusts them and would read whatever memory they point at.
    """

    def __init__(self, storage: _Storage, offset: Any, size: Any, stride: Any):
        # Checked when materialised, where the error can name the tensor.
        self.storage, self._view = storage, (offset, size, stride)

    def _check(self) -> None:
        storage, (offset, size, stride) = self.storage, self._view
        if not isinstance(storage, _Storage):
            raise TorchCheckpointError(f"its storage is a {type(storage).__name__}, not a torch "
                                       f"storage")
        if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
            raise TorchCheckpointError(f"its sizes {size!r} and strides {stride!r} must be "
                                       f"tuples")
        self.offset = _integer(offset, "its storage offset")
        self.size = tuple(_integer(s, "a size") for s in size)
        self.stride = tuple(_integer(s, "a stride") for s in stride)
        if len(self.size) != len(self.stride):
            raise TorchCheckpointError(f"it has {len(self.size)} sizes {self.size} but "
                                       f"{len(self.stride)} strides {self.stride}")
        if self.offset < 0 or min(self.size + self.stride, default=0) < 0:
            raise TorchCheckpointError(
                f"its view has offset {self.offset}, sizes {self.size} and strides "
                f"{self.stride}: negative values are refused")
        if math.prod(self.size) > MAX_VIEW_ELEMENTS:
            raise TorchCheckpointError(f"its sizes {self.size} hold more than "
                                       f"{MAX_VIEW_ELEMENTS} elements")

    def materialize(self) -> np.ndarray:
        self._check()
        flat = self.storage.array()
        if math.prod(self.size) == 0:
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= flat.size:
            raise TorchCheckpointError(
                f"its view with offset {self.offset}, sizes {self.size} and strides "
                f"{self.stride} reaches element {last} of a storage of {flat.size} elements")
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
        raise TorchCheckpointError(f"unsupported global in torch checkpoint: {module}.{name} "
                                   f"(only tensors and dicts are read, never code)")

    def persistent_load(self, pid: Any) -> _Storage:
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage":
            raise TorchCheckpointError(f"unsupported persistent id {typename!r}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise TorchCheckpointError(f"unsupported storage type {storage_type!r}")
        return self._storage_loader(storage_type.dtype, str(key),
                                    _integer(numel, "a storage's size"), view_metadata)


def _materialize(obj: Any, name: str = "") -> Any:
    """Replaces every _LazyTensor in nested dicts/lists/tuples by its NumPy array."""
    if isinstance(obj, _LazyTensor):
        try:
            return obj.materialize()
        except TorchCheckpointError as e:
            raise TorchCheckpointError(f"tensor {name or '(top level)'}: {e}") from None
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v, f"{name}.{k}" if name else str(k))
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, f"{name}[{i}]") for i, v in enumerate(obj))
    return obj


def _read_zip_checkpoint(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise TorchCheckpointError("not a torch zip checkpoint (no unique data.pkl)")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
        storages: dict[str, _Storage] = {}

        def load(dtype: np.dtype, key: str, numel: int, _view: Any) -> _Storage:
            if key not in storages:
                storage = _Storage(dtype, numel)
                raw = zf.read(f"{prefix}data/{key}")
                dt = dtype.newbyteorder("<" if byteorder == "little" else ">")
                if len(raw) < numel * dtype.itemsize:
                    raise TorchCheckpointError(f"storage {key} is truncated")
                storage.data = np.frombuffer(raw, dtype=dt, count=numel).astype(dtype)
                storages[key] = storage
            return storages[key]

        with zf.open(pkl[0]) as f:
            return _materialize(_TorchUnpickler(io.BytesIO(f.read()), load).load())


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise TorchCheckpointError(f"unexpected global {module}.{name} in checkpoint header")


def _read_legacy_checkpoint(path: str) -> Any:
    with open(path, "rb") as f:
        magic = _PlainUnpickler(f).load()
        if magic != _LEGACY_MAGIC:
            raise TorchCheckpointError("not a torch checkpoint (bad magic number)")
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
            return _Storage(dtype, view_size, root=roots[key], offset=offset)

        result = _TorchUnpickler(f, load).load()
        keys = _PlainUnpickler(f).load()
        for key in keys:
            if str(key) not in roots:
                raise TorchCheckpointError(f"storage {key} follows the pickle but no tensor "
                                           f"uses it")
            storage = roots[str(key)]
            numel = int(np.frombuffer(f.read(8), "<i8" if little else ">i8")[0])
            nbytes = numel * storage.dtype.itemsize
            raw = f.read(nbytes)
            if numel < 0 or len(raw) != nbytes:
                raise TorchCheckpointError(f"storage {key} is truncated")
            dt = storage.dtype.newbyteorder("<" if little else ">")
            storage.data = np.frombuffer(raw, dtype=dt).astype(storage.dtype)
            storage.numel = numel
    return _materialize(result)


def read_torch_checkpoint(path: str) -> Any:
    """Loads a `torch.save` file (zip or legacy format) with tensors as NumPy arrays, no torch.

    Raises TorchCheckpointError (a ValueError) naming the file for anything malformed.
    """
    try:
        if zipfile.is_zipfile(path):
            return _read_zip_checkpoint(path)
        return _read_legacy_checkpoint(path)
    except TorchCheckpointError as e:
        raise TorchCheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, EOFError,
            OverflowError, zipfile.BadZipFile) as e:  # what a malformed pickle or zip raises
        raise TorchCheckpointError(f"{path}: not a readable torch checkpoint "
                                   f"({type(e).__name__}: {e})") from None


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
        try:  # weights_only: torch's own refusal of code, and its storage bounds checks
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # whatever torch raises for a file it cannot read
            text = " ".join(str(e).split())[:300]
            raise TorchCheckpointError(f"{path}: torch cannot read it ({type(e).__name__}: "
                                       f"{text})") from None
        if not isinstance(obj, dict):
            raise TorchCheckpointError(f"{path}: expected a state_dict (a dict), got "
                                       f"{type(obj).__name__}")
        big = [k for k, v in obj.items() if v.numel() > MAX_VIEW_ELEMENTS]
        if big:  # an expanded (stride 0) view costs torch nothing, its copy would
            raise TorchCheckpointError(f"{path}: tensor {big[0]} holds more than "
                                       f"{MAX_VIEW_ELEMENTS} elements")
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                for k, v in obj.items()}
    obj = read_torch_checkpoint(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict), got {type(obj).__name__}")
    return _flatten_state_dict(obj)
