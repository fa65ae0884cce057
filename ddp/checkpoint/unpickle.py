"""Unpickling files we do not trust: a scoped allowlist for torch.load, and an inert unpickler past it.

Since torch 2.6 the usual answer to "Unsupported global" is weights_only=False, which runs whatever the
file says. Two safer steps instead:

1. `safe_globals()`: harmless classes real checkpoints carry (argparse.Namespace, numpy scalars, dtypes and
   arrays, dates, paths) allowlisted for torch's own weights-only loader, only while our load runs.
2. `inert_load_zip` / `inert_loads`: every other class or function the pickle names becomes a StandIn:
   never imported, never called; it records its name and what the pickle built it from. Tensors are real.
   Lightning hyper-parameters, a user's config class, or a whole `torch.save(model)` of a class that is not
   importable here: the weights come back, and nothing from the file runs.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import datetime
import io
import pathlib
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, ClassVar, Self

import numpy as np
import torch
from torch._weights_only_unpickler import _get_allowed_globals  # what torch itself deems safe to unpickle

from ddp.checkpoint.errors import UntrustedPickleError

# Modules whose functions a checkpoint never needs: a file that names one is an attack, not a checkpoint.
HOSTILE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy", "shutil",
    "socket", "pty", "ctypes", "code", "codeop", "pickle", "_pickle", "marshal", "types", "operator",
    "functools", "webbrowser", "multiprocessing", "signal", "io", "_io", "tempfile", "pdb", "timeit",
    "asyncio", "threading", "_thread", "urllib", "http", "numpy.testing", "torch.hub", "torch.serialization",
})


def _numpy_globals() -> dict[str, Any]:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    found: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x pickle paths
        found[f"{module}.scalar"] = multiarray.scalar
        found[f"{module}._reconstruct"] = multiarray._reconstruct
    for name in dir(np.dtypes):  # Float64DType etc.: what np.dtype objects pickle as in numpy >= 1.25
        if name.endswith("DType"):
            found[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return found


# Real objects, each harmless to construct with any arguments and without side effects.
EXTRA_SAFE_GLOBALS: dict[str, Any] = {
    "argparse.Namespace": argparse.Namespace,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.range": range,
    "collections.defaultdict": collections.defaultdict,
    "datetime.datetime": datetime.datetime,
    "datetime.date": datetime.date,
    "datetime.time": datetime.time,
    "datetime.timedelta": datetime.timedelta,
    "datetime.timezone": datetime.timezone,
    "pathlib.PosixPath": pathlib.PosixPath,
    "pathlib.PurePosixPath": pathlib.PurePosixPath,
    "pathlib.WindowsPath": pathlib.PureWindowsPath,  # a concrete WindowsPath cannot exist on Linux
    "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
    "torch.torch_version.TorchVersion": torch.torch_version.TorchVersion,
    **_numpy_globals(),
}


@contextmanager
def safe_globals() -> Iterator[None]:
    """Allowlist EXTRA_SAFE_GLOBALS for torch.load(weights_only=True) for the duration of one load."""
    with torch.serialization.safe_globals([(obj, name) for name, obj in EXTRA_SAFE_GLOBALS.items()]):
        yield


class StandIn:
    """What the inert unpickler puts where the file names a class or function it will not import."""

    name = "?"  # "module.qualname", set on each per-name subclass

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items, self.listitems = args, kwargs, None, {}, []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the arguments were recorded by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (Lightning's AttributeDict)
        self.items[key] = value

    def append(self, value: Any) -> None:  # list subclasses
        self.listitems.append(value)

    def extend(self, values: Any) -> None:
        self.listitems.extend(values)

    def add(self, value: Any) -> None:  # set subclasses
        self.listitems.append(value)

    def __repr__(self) -> str:
        return f"<stand-in for {self.name}>"


# the getattr calls torch.save(torch.compile(model)) pickles: (class of the object, attribute name)
COMPILED_GETATTRS = frozenset({("torch._TorchCompileInductorWrapper", "get_compiler_config")})


class _CompiledGetattr(StandIn):
    name = "torch._TorchCompileInductorWrapper.get_compiler_config"


class _StorageTag:
    """A storage class as named in a torch pickle: only its dtype is needed, nothing to call."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def hostile(names: list[str]) -> list[str]:
    """The stand-in names that only an attack would put in a checkpoint (os.system, eval, ...)."""
    return [n for n in names if any(n == m or n.startswith(m + ".") for m in HOSTILE_MODULES)]


def _buildable(obj: Any) -> bool:
    # BUILD sets attributes: allowed on instances we understand, never on a class or function (that would
    # change them for the whole process)
    return isinstance(obj, (StandIn, torch.Tensor, collections.OrderedDict, argparse.Namespace, np.ndarray, np.dtype))


class _InertUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its BUILD can be restricted
    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes], persistent_load: Any = None):
        super().__init__(file, encoding="latin1")
        self.stand_ins: dict[str, type[StandIn]] = {}
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names, as protocol 2 writes them (`__builtin__.set`)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        allowed = _get_allowed_globals().get(full, EXTRA_SAFE_GLOBALS.get(full))
        if "Storage" in name and allowed is not None:  # torch.FloatStorage etc.: only the dtype matters
            return _StorageTag(torch.uint8 if name == "UntypedStorage" else allowed.dtype)
        if allowed is not None:
            return allowed
        if full == "builtins.getattr":  # torch.save(torch.compile(model)) pickles one: see _getattr
            return self._getattr
        return self._stand_in(full)

    def _stand_in(self, full: str) -> type[StandIn]:
        if full not in self.stand_ins:
            self.stand_ins[full] = type(full.rsplit(".", 1)[-1], (StandIn,), {"name": full, "__module__": __name__})
        return self.stand_ins[full]

    def _getattr(self, *args: Any) -> StandIn:
        """getattr, never called: what torch.compile's OptimizedModule pickles passes; any other use is refused.

        torch pickles the Inductor backend's `get_compiler_config` accessor as getattr(wrapper, name). The
        result stands in like a class would; anything else names builtins.getattr, which refuse_hostile refuses.
        """
        if len(args) == 2 and isinstance(args[0], StandIn) and (args[0].name, args[1]) in COMPILED_GETATTRS:
            return _CompiledGetattr(*args)
        return self._stand_in("builtins.getattr")(*args)  # recorded, hence refused

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise pickle.UnpicklingError("persistent id in a plain pickle")
        return self._persistent_load(pid)

    def load_build(self) -> None:
        if not _buildable(self.stack[-2]):
            raise pickle.UnpicklingError(f"refused to set the state of {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def inert_loads(data: bytes) -> tuple[Any, list[str]]:
    """Unpickle a plain pickle (no tensors), standing in for every class outside the allowlist."""
    unpickler = _InertUnpickler(io.BytesIO(data))
    return unpickler.load(), sorted(unpickler.stand_ins)


def inert_load_zip(f: IO[bytes], map_location: Any = "cpu") -> tuple[Any, list[str]]:
    """Read a torch zip file (torch.save since 1.6) inertly: (object, names of the stand-ins)."""
    device = torch.device(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    with zipfile.ZipFile(f) as archive:
        names = archive.namelist()
        root = names[0].split("/")[0]
        byteorder = f"{root}/byteorder"
        if byteorder in names and archive.read(byteorder).decode() != "little":
            raise pickle.UnpicklingError("big-endian torch files are not supported by the inert reader")
        storages: dict[str, torch.UntypedStorage] = {}

        def persistent_load(pid: Any) -> Any:
            kind, tag, key, _location, _numel = pid
            if kind != "storage" or not isinstance(tag, _StorageTag):
                raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
            if key not in storages:
                raw = bytearray(archive.read(f"{root}/data/{key}"))
                storages[key] = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage().to(device=device) \
                    if raw else torch.UntypedStorage(0, device=device)
            return torch.storage.TypedStorage(wrap_storage=storages[key], dtype=tag.dtype, _internal=True)

        unpickler = _InertUnpickler(io.BytesIO(archive.read(f"{root}/data.pkl")), persistent_load)
        return unpickler.load(), sorted(unpickler.stand_ins)


def module_state(obj: StandIn, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The state dict of a pickled nn.Module read inertly (its `_parameters`, `_buffers`, `_modules`)."""
    state = obj.state if isinstance(obj, StandIn) else None
    if not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        return None
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, tensor in [*state["_parameters"].items(), *(state.get("_buffers") or {}).items()]:
        if isinstance(tensor, torch.Tensor) and name not in skip:
            out[prefix + name] = tensor.detach() if isinstance(tensor, torch.nn.Parameter) else tensor
    for name, child in state["_modules"].items():
        out.update(module_state(child, f"{prefix}{name}.") or {})
    return out


def refuse_hostile(names: list[str], what: str) -> None:
    """Raise UntrustedPickleError if the stand-ins name something only an attack needs."""
    bad = hostile(names)
    if bad:
        raise UntrustedPickleError(f"{what}: its pickle calls {', '.join(bad)}, which no checkpoint needs; refused "
                                   "(nothing from the file was run). Do not load this file")


def load_untrusted(f: IO[bytes], map_location: Any, what: str) -> tuple[Any, list[str]]:
    """torch.load of bytes nobody vouched for: (object, stand-in names); hostile pickles are refused.

    torch's weights-only loader with the allowlist first (fast, torch's own code); if the file names other
    classes and is a zip, the inert unpickler.
    """
    start = f.tell()
    try:
        with safe_globals():
            return torch.load(f, map_location=map_location, weights_only=True), []
    except pickle.UnpicklingError:
        f.seek(start)
        if not zipfile.is_zipfile(f):
            raise
        f.seek(start)
        obj, names = inert_load_zip(f, map_location)
    refuse_hostile(names, what)
    return obj, names
