"""The only callables a pickle from a stranger may reach, each checking its arguments before it builds anything.

torch's weights-only allowlist is not used as it is: some of its entries allocate what a number in the
file says (`bytearray(n)`), import what the file names (`_codecs.encode`) or build tensors nobody
validated (sparse indices, meta tensors); numpy's own rebuilders trust a dtype's pickled flags and
pointers. Here every name maps to a function of ours: tensors are views of storages already read from the
file and checked against their bounds, numpy arrays are copied out of bytes the file holds, and nothing
is allocated that the file's bytes do not pay for.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import math
import pathlib
import warnings
from typing import Any

import numpy as np
import torch

MAX_NDIM = 64


class RebuildError(ValueError):
    """A pickled object's arguments do not describe a valid object; the message says which and why."""


def ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or len(values) > MAX_NDIM \
            or not all(type(v) is int and v >= 0 for v in values):
        raise RebuildError(f"{what} must be up to {MAX_NDIM} non-negative integers, got {str(values)[:60]}")
    return tuple(values)


def _typed_storage(storage: Any) -> torch.storage.TypedStorage:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise RebuildError(f"a tensor's storage is {type(storage).__name__}, not a storage of the file")
    return storage


def _view(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor over `storage`, refused unless every element it addresses lies inside the storage."""
    storage = _typed_storage(storage)
    dtype = dtype or storage.dtype
    size, stride = ints(size, "a tensor's size"), ints(stride, "a tensor's stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise RebuildError(f"a tensor's offset {offset!r} or stride {stride} does not fit its size {size}")
    element = torch.empty((), dtype=dtype).element_size()
    capacity = storage._untyped_storage.nbytes() // element
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if numel else offset
    # a tensor larger than the bytes behind it (stride 0) would cost memory the file never paid for
    if numel and (last >= capacity or numel > capacity):
        raise RebuildError(f"a tensor of size {list(size)} at offset {offset} needs more than its storage's "
                           f"{capacity} elements")
    tensor = torch.empty((0,), dtype=dtype, device=storage._untyped_storage.device)
    return tensor.set_(storage._untyped_storage, offset, size, stride)


def _no_hooks(hooks: Any) -> None:
    if hooks not in (None, {}) or (hooks is not None and not isinstance(hooks, dict)):
        raise RebuildError("a tensor carries backward hooks; checkpoints never do")


def _flags(tensor: torch.Tensor, requires_grad: Any, metadata: Any = None) -> torch.Tensor:
    if type(requires_grad) is not bool:
        raise RebuildError(f"requires_grad is {type(requires_grad).__name__}, not a bool")
    if metadata:  # torch records only the conj and neg bits here
        if not isinstance(metadata, dict) or set(metadata) - {"conj", "neg"}:
            raise RebuildError(f"unknown tensor metadata {str(metadata)[:60]}")
        if metadata.get("conj"):
            tensor = tensor.conj()
        if metadata.get("neg"):
            tensor = tensor._neg_view()
    if requires_grad and (tensor.is_floating_point() or tensor.is_complex()):
        tensor.requires_grad_(True)
    return tensor


def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _view(storage, offset, size, stride)


def rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                      metadata: Any = None) -> torch.Tensor:
    _no_hooks(hooks)
    return _flags(_view(storage, offset, size, stride), requires_grad, metadata)


def rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                      dtype: Any, metadata: Any = None) -> torch.Tensor:
    _no_hooks(hooks)
    if not isinstance(dtype, torch.dtype):
        raise RebuildError(f"a tensor's dtype is {type(dtype).__name__}")
    return _flags(_view(storage, offset, size, stride, dtype), requires_grad, metadata)


def rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> torch.nn.Parameter:
    _no_hooks(hooks)
    if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool or state not in (None, {}):
        raise RebuildError("a parameter is not a tensor with a requires_grad flag and no extra state")
    return torch.nn.Parameter(data.detach(), requires_grad and (data.is_floating_point() or data.is_complex()))


def rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    """torch pickles tensor subclasses through this; only Tensor and Parameter are rebuilt, by our functions."""
    if func not in (rebuild_tensor_v2, rebuild_tensor_v3, rebuild_parameter, rebuild_tensor) \
            or new_type not in (torch.Tensor, torch.nn.Parameter) or not isinstance(args, tuple) or state not in (None, {}):
        raise RebuildError("a tensor subclass or rebuild function that checkpoints do not use")
    tensor = func(*args)
    return tensor if new_type is torch.Tensor or isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor)


SPARSE_LAYOUTS = {"torch.sparse_coo": torch.sparse_coo, "torch.sparse_csr": torch.sparse_csr,
                  "torch.sparse_csc": torch.sparse_csc, "torch.sparse_bsr": torch.sparse_bsr,
                  "torch.sparse_bsc": torch.sparse_bsc}


def get_layout(name: Any) -> torch.layout:
    if name not in SPARSE_LAYOUTS and name != "torch.strided":
        raise RebuildError(f"unknown tensor layout {str(name)[:40]!r}")
    return SPARSE_LAYOUTS.get(name, torch.strided)


def rebuild_sparse_tensor(layout: Any, data: Any) -> torch.Tensor:
    """Sparse tensors with their invariants checked: every index inside the tensor's size."""
    tensors = 2 if layout is torch.sparse_coo else 3  # (indices, values, ...) or (compressed, plain, values, ...)
    if not isinstance(data, tuple) or not all(isinstance(t, torch.Tensor) for t in data[:tensors]):
        raise RebuildError("a sparse tensor's parts are not tensors")
    try:
        if layout is torch.sparse_coo and len(data) in (3, 4):
            indices, values, size = data[:3]
            return torch.sparse_coo_tensor(indices, values, ints(size, "a sparse size"), check_invariants=True)
        if layout in SPARSE_LAYOUTS.values() and len(data) == 4:
            compressed, plain, values, size = data
            return torch.sparse_compressed_tensor(compressed, plain, values, ints(size, "a sparse size"),
                                                  layout=layout, check_invariants=True)
    except RuntimeError as e:
        raise RebuildError(f"an invalid sparse tensor ({str(e).splitlines()[0][:100]})") from None
    raise RebuildError(f"a sparse tensor of layout {layout}")


def refuse_meta_tensor(*_: Any) -> None:
    raise RebuildError("it holds meta tensors (shapes without data): there are no weights to load in it")


def latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """Protocol 2 pickles bytes as _codecs.encode(str, 'latin1'); any other codec would import its module."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise RebuildError(f"_codecs.encode with codec {str(encoding)[:30]!r}: only latin1 is read")
    return text.encode("latin1")


def copy_bytes(data: Any = b"", *rest: Any) -> bytearray:
    if not isinstance(data, (bytes, bytearray, str)) or len(rest) > 1:  # bytearray(n) would allocate n bytes
        raise RebuildError("bytearray from anything but bytes the file holds")
    return bytearray(data.encode("latin1") if isinstance(data, str) else data)


def _items(kind: type) -> Any:
    def build(items: Any = ()) -> Any:
        if not isinstance(items, (list, tuple, set, frozenset)):  # never a lazy range or generator
            raise RebuildError(f"{kind.__name__} from {type(items).__name__}")
        return kind(items)
    return build


def plain_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (real, imag)):
        raise RebuildError("complex from anything but numbers")
    return complex(real, imag)


def torch_device(spec: Any, index: Any = None) -> torch.device:
    if not isinstance(spec, str) or len(spec) > 32 or (index is not None and type(index) is not int):
        raise RebuildError(f"a device {str(spec)[:32]!r}")
    try:
        return torch.device(spec) if index is None else torch.device(spec, index)
    except RuntimeError:
        raise RebuildError(f"an unknown device {spec[:32]!r}") from None


def torch_size(dims: Any = ()) -> torch.Size:
    return torch.Size(ints(dims, "a torch.Size"))


def defaultdict_as_dict(*_: Any) -> collections.defaultdict:
    return collections.defaultdict(None)  # the factory the file names is never kept, let alone called


# ------------------------------------------------------------------ numpy: numeric arrays and scalars only

NUMPY_CODES = {f"{kind}{size}" for kind, sizes in (("b", (1,)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)),
                                                    ("f", (2, 4, 8)), ("c", (8, 16))) for size in sizes}


class Pending:
    """An object the pickle has asked for but whose state (BUILD) has not come yet; `finish` makes the real one."""

    def __init__(self, finish: Any):
        self.finish = finish


def numpy_dtype(code: Any, align: Any = False, copy: Any = True) -> Pending:
    if not isinstance(code, str) or code not in NUMPY_CODES:
        raise RebuildError(f"numpy dtype {str(code)[:20]!r}: only numeric dtypes are read")

    def finish(state: Any) -> np.dtype:  # (version, byte order, ...): only the byte order is taken
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if order not in ("<", ">", "|", "="):
            raise RebuildError(f"numpy dtype byte order {str(order)[:8]!r}")
        return np.dtype(code).newbyteorder(order) if order in "<>" else np.dtype(code)
    return Pending(finish)


def numpy_reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> Pending:
    if cls is not np.ndarray:
        raise RebuildError("numpy _reconstruct of anything but ndarray")

    def finish(state: Any) -> np.ndarray:  # (version, shape, dtype, is_fortran, raw bytes)
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[2], np.dtype):
            raise RebuildError("a numpy array's state is not (version, shape, dtype, fortran, bytes)")
        _, dims, dtype, fortran, raw = state
        dims = ints(dims, "a numpy shape")
        raw = raw.encode("latin1") if isinstance(raw, str) else raw
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(dims) * dtype.itemsize:
            raise RebuildError(f"a numpy array of shape {list(dims)} whose data is not {dtype.itemsize} bytes an element")
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(dims, order="F" if fortran else "C").copy()
    return Pending(finish)


def numpy_scalar(dtype: Any, raw: Any = b"") -> Any:
    raw = raw.encode("latin1") if isinstance(raw, str) else raw
    if not isinstance(dtype, np.dtype) or not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise RebuildError("a numpy scalar whose bytes do not match its dtype")
    return np.frombuffer(raw, dtype=dtype)[0]


def _storage_tags() -> dict[str, torch.dtype]:
    tags = {}
    with warnings.catch_warnings():  # "TypedStorage is deprecated": only their dtypes are read
        warnings.simplefilter("ignore")
        for name in dir(torch):
            if name.endswith("Storage") and name not in ("UntypedStorage", "TypedStorage"):
                tags[f"torch.{name}"] = getattr(torch, name).dtype
    return {**tags, "torch.UntypedStorage": torch.uint8}


STORAGE_TAGS = _storage_tags()  # "torch.FloatStorage" -> torch.float32: what a pickled storage names

_torch_values = {f"torch.{n}": getattr(torch, n) for n in dir(torch)
                 if isinstance(getattr(torch, n, None), (torch.dtype, torch.qscheme))}

SAFE_GLOBALS: dict[str, Any] = {
    **_torch_values,  # dtypes and quantisation schemes: plain values
    "torch._utils._rebuild_tensor": rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": rebuild_from_type,
    "torch._utils._rebuild_sparse_tensor": rebuild_sparse_tensor,
    "torch._utils._rebuild_meta_tensor_no_storage": refuse_meta_tensor,
    "torch.serialization._get_layout": get_layout,
    "torch.Tensor": torch.Tensor,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "torch.Size": torch_size,
    "torch.device": torch_device,
    "torch.torch_version.TorchVersion": torch.torch_version.TorchVersion,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.defaultdict": defaultdict_as_dict,
    "collections.Counter": _items(collections.Counter),
    "builtins.set": _items(set),
    "builtins.frozenset": _items(frozenset),
    "builtins.bytearray": copy_bytes,
    "builtins.complex": plain_complex,
    "_codecs.encode": latin1_encode,
    "argparse.Namespace": argparse.Namespace,
    "datetime.datetime": datetime.datetime,
    "datetime.date": datetime.date,
    "datetime.time": datetime.time,
    "datetime.timedelta": datetime.timedelta,
    "datetime.timezone": datetime.timezone,
    "pathlib.PosixPath": pathlib.PurePosixPath,  # a path is a name here: nothing on disk is looked at
    "pathlib.PurePosixPath": pathlib.PurePosixPath,
    "pathlib.WindowsPath": pathlib.PureWindowsPath,
    "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
    "numpy.dtype": numpy_dtype,
    "numpy.ndarray": np.ndarray,  # only as _reconstruct's first argument
    "numpy.core.multiarray._reconstruct": numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": numpy_reconstruct,
    "numpy.core.multiarray.scalar": numpy_scalar,
    "numpy._core.multiarray.scalar": numpy_scalar,
}

# Objects whose state (pickle's BUILD) may be set: instance attributes of plain records, never a class
BUILDABLE = (collections.OrderedDict, argparse.Namespace)
