"""What stands in for the classes and functions a pickle names, and what is read from the stand-ins.

A stand-in is never imported or called: it records the name and what the pickle built it from. Names
that only an attack would put in a checkpoint (`os.system`, `eval`, ...) make the file refused; a whole
pickled nn.Module gives its state dict from its stand-ins' `_parameters`, `_buffers` and `_modules`.
"""

from __future__ import annotations

from typing import Any, Self

import torch

from ddp.checkpoint.errors import UntrustedPickleError

# Modules whose functions a checkpoint never needs: a file that names one is an attack, not a checkpoint.
HOSTILE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy", "shutil",
    "socket", "pty", "ctypes", "code", "codeop", "pickle", "_pickle", "marshal", "types", "operator",
    "functools", "webbrowser", "multiprocessing", "signal", "io", "_io", "tempfile", "pdb", "timeit",
    "asyncio", "threading", "_thread", "urllib", "http", "numpy.testing", "torch.hub", "torch.serialization",
    "_codecs", "codecs", "copyreg", "posixpath", "glob", "zipimport", "sysconfig",
})
MAX_DEPTH = 100  # containers inside containers; real checkpoints stay under 10


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


class StorageTag:
    """A storage class as named in a torch pickle: only its dtype is needed, nothing to call."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def hostile(names: list[str]) -> list[str]:
    """The stand-in names that only an attack would put in a checkpoint (os.system, eval, ...)."""
    return [n for n in names if any(n == m or n.startswith(m + ".") for m in HOSTILE_MODULES)]


def module_state(obj: Any, prefix: str = "", seen: frozenset[int] = frozenset()) -> dict[str, torch.Tensor] | None:
    """The state dict of a pickled nn.Module read inertly (its `_parameters`, `_buffers`, `_modules`)."""
    state = obj.state if isinstance(obj, StandIn) else None
    if not isinstance(state, dict) or not isinstance(state.get("_parameters"), dict) \
            or not isinstance(state.get("_modules"), dict) or id(obj) in seen or len(seen) > MAX_DEPTH:
        return None
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, (set, frozenset)) else set()
    buffers = state.get("_buffers") if isinstance(state.get("_buffers"), dict) else {}
    for name, tensor in [*state["_parameters"].items(), *buffers.items()]:
        if isinstance(name, str) and isinstance(tensor, torch.Tensor) and name not in skip:
            out[prefix + name] = tensor.detach() if isinstance(tensor, torch.nn.Parameter) else tensor
    for name, child in state["_modules"].items():
        if isinstance(name, str):
            out.update(module_state(child, f"{prefix}{name}.", seen | {id(obj)}) or {})
    return out


def refuse_hostile(names: list[str], what: str) -> None:
    """Raise UntrustedPickleError if the stand-ins name something only an attack needs."""
    bad = hostile(names)
    if bad:
        raise UntrustedPickleError(f"{what}: its pickle calls {', '.join(bad)}, which no checkpoint needs; refused "
                                   "(nothing from the file was run). Do not load this file")
