"""Unpickling files we do not trust: every pickle a checkpoint holds is read here, inertly.

Since torch 2.6 the usual answer to "Unsupported global" is weights_only=False, which runs whatever the
file says. Instead, one pure-Python unpickler reads every pickle (torch zip and legacy files, DCP
metadata and values, TorchScript constants):

- the names it resolves are the few in `rebuild.SAFE_GLOBALS`, functions of ours that check their
  arguments; every other class or function becomes a StandIn that is never imported or called and
  records what the pickle built it from (Lightning hyper-parameters, a user's config class, a whole
  `torch.save(model)`: the weights come back, and nothing from the file runs);
- state may be set only on stand-ins and plain records, never on a class or function;
- what it builds is bounded: hashable nesting while it reads, then (`check_structure`) depth, cycles and
  the size of the object once shared parts are counted each time they appear.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from typing import IO, Any, ClassVar

import numpy as np
import torch

from ddp.checkpoint.rebuild import BUILDABLE, SAFE_GLOBALS, STORAGE_TAGS, Pending, RebuildError
from ddp.checkpoint.standins import MAX_DEPTH, StandIn, StorageTag

MAX_NAMES = 4096  # distinct classes a pickle may name
MAX_STACK = 100_000  # objects waiting on the unpickler's stack: pickle appends and sets items in batches of 1,000
MAX_CALLS = 200_000  # objects a pickle may construct: ~3 per tensor, and real files hold far fewer than 50k
# classes in SAFE_GLOBALS that may be called; the others (torch.Tensor, Parameter, ndarray) are only values
CALLABLE_CLASSES = frozenset(v for v in SAFE_GLOBALS.values() if isinstance(v, type)
                             and v not in (torch.Tensor, torch.nn.Parameter, np.ndarray))


# the getattr calls torch.save(torch.compile(model)) pickles: (class of the object, attribute name)
COMPILED_GETATTRS = frozenset({("torch._TorchCompileInductorWrapper", "get_compiler_config")})


class _CompiledGetattr(StandIn):
    name = "torch._TorchCompileInductorWrapper.get_compiler_config"


def _getattr_stand_in(unpickler: Any) -> type[StandIn]:
    """A stand-in for builtins.getattr, never called, that knows the one use torch.compile pickles.

    torch.save(torch.compile(model)) pickles the Inductor backend's config accessor as
    getattr(<_TorchCompileInductorWrapper>, "get_compiler_config"). Called that way it gives a plain
    stand-in and is counted; any other call or use keeps "builtins.getattr" among the names, refused.
    """

    class Getattr(StandIn):
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if not kwargs and len(args) == 2 and isinstance(args[0], StandIn) \
                    and (args[0].name, args[1]) in COMPILED_GETATTRS:
                unpickler.compiled_getattrs += 1
                return _CompiledGetattr(*args)
            unpickler.other_getattrs += 1
            return super().__new__(cls, *args, **kwargs)

    return Getattr


def _reaches(obj: Any, target: Any) -> bool:
    """Whether `target` is anywhere in `obj` (each container visited once: cycles end)."""
    seen, stack = set(), [obj]
    while stack:
        node = stack.pop()
        if node is target:
            return True
        if isinstance(node, CONTAINERS) and id(node) not in seen:
            seen.add(id(node))
            stack.extend(_children(node))
    return False


class _Memo(dict):
    """The unpickler's memo, noting the keys under which a Pending object is stored."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, list[Any]] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, Pending):
            self.pending.setdefault(id(value), []).append(key)
        super().__setitem__(key, value)


def _opcode(name: str) -> int:
    return getattr(pickle, name)[0]


class InertUnpickler(pickle._Unpickler):  # the pure-Python unpickler: each opcode can be checked
    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes], persistent_load: Any = None, *, names_only: bool = False):
        super().__init__(file, encoding="latin1")
        self.names_only = names_only  # every name a stand-in but storages: a first pass that only looks
        self.calls = 0
        self.stand_ins: dict[str, type[StandIn]] = {}
        self._persistent_load = persistent_load
        self.compiled_getattrs = self.other_getattrs = 0  # calls of builtins.getattr: see _getattr_stand_in
        self._depth: dict[int, tuple[Any, int]] = {}  # id -> (object, nesting) for tuples and frozensets
        self.memo = _Memo()  # remembers where each Pending is kept, to swap in what it becomes

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names, as protocol 2 writes them (`__builtin__.set`)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in STORAGE_TAGS:  # torch.FloatStorage etc.: only the dtype matters
            return StorageTag(STORAGE_TAGS[full])
        if full in SAFE_GLOBALS and not self.names_only:
            return SAFE_GLOBALS[full]
        if full not in self.stand_ins:
            if len(self.stand_ins) >= MAX_NAMES:
                raise pickle.UnpicklingError(f"the pickle names more than {MAX_NAMES} classes")
            base = _getattr_stand_in(self) if full == "builtins.getattr" else StandIn
            self.stand_ins[full] = type(name[:100], (base,), {"name": full, "__module__": __name__})
        return self.stand_ins[full]

    def load(self) -> Any:
        obj = super().load()
        getattr_ = self.stand_ins.get("builtins.getattr")
        if getattr_ is not None and self.compiled_getattrs and not self.other_getattrs \
                and not _reaches(obj, getattr_):  # only ever called as torch.compile pickles it: not an attack
            del self.stand_ins["builtins.getattr"]
        return obj

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise pickle.UnpicklingError("persistent id in a plain pickle")
        return self._persistent_load(pid)

    # -- calls: only our checked functions, and stand-ins
    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        self.calls += 1
        if self.calls > MAX_CALLS:
            raise pickle.UnpicklingError(f"the pickle makes more than {MAX_CALLS:,} objects; no checkpoint does")
        if isinstance(func, type) and not (issubclass(func, StandIn) or func in CALLABLE_CLASSES):
            raise pickle.UnpicklingError(f"refused to construct {getattr(func, '__name__', '?')}")
        if not callable(func) or not isinstance(args, tuple) or not isinstance(kwargs or {}, dict):
            raise pickle.UnpicklingError(f"refused to call {type(func).__name__}")
        try:
            return func(*args, **(kwargs or {}))
        except RebuildError as e:
            raise pickle.UnpicklingError(str(e)) from None
        except (TypeError, ValueError, OverflowError, RuntimeError) as e:  # wrong arguments for a real constructor
            raise pickle.UnpicklingError(f"bad arguments for {getattr(func, '__name__', '?')}: {e}") from None

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._track(self._call(self.stack[-1], args), args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        self.append(self._track(self._call(self.stack.pop(), args), args))

    def load_newobj_ex(self) -> None:
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.append(self._call(self.stack.pop(), args, kwargs))

    def load_inst(self) -> None:
        cls = self.find_class(self.readline()[:-1].decode("ascii"), self.readline()[:-1].decode("ascii"))
        self.append(self._call(cls, tuple(self.pop_mark())))

    def load_obj(self) -> None:
        args = self.pop_mark()
        self.append(self._call(args.pop(0), tuple(args)))

    # -- state: stand-ins, plain records and numpy objects we finish ourselves
    def load_build(self) -> None:
        state, inst = self.stack.pop(), self.stack[-1]
        if isinstance(inst, Pending):
            try:
                done = inst.finish(state)
            except RebuildError as e:
                raise pickle.UnpicklingError(str(e)) from None
            for key in self.memo.pending.pop(id(inst), []):
                self.memo[key] = done
            self.stack[-1] = done
        elif isinstance(inst, StandIn):
            inst.__setstate__(state)
        elif isinstance(inst, BUILDABLE) and isinstance(state, dict) and all(isinstance(k, str) for k in state):
            if isinstance(inst, dict):  # OrderedDict's state is its instance attributes: none are kept
                return
            inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"refused to set the state of {type(inst).__name__}")

    # -- bounded nesting of what is built from its parts at once (tuples, frozensets, calls): hash() and
    # some deallocators recurse in C without a guard, and a chain a million deep should fail at its 101st link
    def _track(self, obj: Any, parts: Any = None) -> Any:
        """Record how deep `obj` nests: one more than the deepest of its parts (itself, for a tuple)."""
        parts = obj if parts is None else parts
        if isinstance(parts, (tuple, frozenset)):
            depth = 1 + max((self._depth.get(id(x), (None, 0))[1] for x in parts), default=0)
            if depth > MAX_DEPTH:
                raise pickle.UnpicklingError(f"objects nested more than {MAX_DEPTH} deep")
            self._depth[id(obj)] = (obj, depth)
        return obj

    # -- bounded work in progress: open MARKs and objects waiting on the stack (each costs memory before any
    # structure is complete enough to check)
    def _check_room(self) -> None:
        if len(self.metastack) > 2 * MAX_DEPTH or len(self.stack) > MAX_STACK:
            raise pickle.UnpicklingError(f"objects nested more than {MAX_DEPTH} deep, or over {MAX_STACK:,} "
                                         "waiting to be placed")

    def _room_op(name: str) -> Any:
        base = pickle._Unpickler.dispatch[_opcode(name)]

        def load(self: InertUnpickler) -> None:
            self._check_room()
            base(self)
        return load

    # -- filling containers: only the kind each opcode is for (a tensor's __setitem__ would write into its
    # data, an object's append or add would call whatever that method is)
    def _fill_op(name: str, kind: type, where: int) -> Any:
        base = pickle._Unpickler.dispatch[_opcode(name)]

        def load(self: InertUnpickler) -> None:
            target = self.stack[where] if where else self.metastack[-1][-1] if self.metastack else None
            if not isinstance(target, (kind, StandIn)):
                raise pickle.UnpicklingError(f"{name} on a {type(target).__name__}; pickles fill only a {kind.__name__}")
            base(self)
        return load

    def _tuple_op(name: str) -> Any:
        base = pickle._Unpickler.dispatch[_opcode(name)]

        def load(self: InertUnpickler) -> None:
            base(self)
            self._track(self.stack[-1])
        return load

    for _name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"):
        dispatch[_opcode(_name)] = _tuple_op(_name)
    for _name in ("MARK", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "EMPTY_TUPLE"):
        dispatch[_opcode(_name)] = _room_op(_name)
    # (opcode, what it fills, where that is: on the stack under its operands, or 0: just below the MARK)
    for _name, _kind, _where in (("SETITEM", dict, -3), ("APPEND", list, -2), ("SETITEMS", dict, 0),
                                 ("APPENDS", list, 0), ("ADDITEMS", set, 0)):
        dispatch[_opcode(_name)] = _fill_op(_name, _kind, _where)
    dispatch[_opcode("REDUCE")] = load_reduce
    dispatch[_opcode("NEWOBJ")] = load_newobj
    dispatch[_opcode("NEWOBJ_EX")] = load_newobj_ex
    dispatch[_opcode("INST")] = load_inst
    dispatch[_opcode("OBJ")] = load_obj
    dispatch[_opcode("BUILD")] = load_build
    del _name, _kind, _where, _tuple_op, _room_op, _fill_op


CONTAINERS = (dict, list, tuple, set, frozenset, StandIn, *BUILDABLE)


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, StandIn):
        return [obj.args, obj.kwargs, obj.state, obj.items, obj.listitems]
    if isinstance(obj, BUILDABLE):
        return list(vars(obj).values())
    return list(obj)


def check_structure(obj: Any, max_nodes: int) -> None:
    """Refuse cycles, nesting deeper than MAX_DEPTH, and objects that expand past `max_nodes` when
    shared parts are counted once per place they appear (a tree walk of them would never end)."""
    size: dict[int, int] = {}  # id -> expanded size, for every container finished
    on_path: set[int] = set()  # the containers between the root and the one being looked at
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, finished = stack.pop()
        if not isinstance(node, CONTAINERS) or (id(node) in size and not finished):
            continue
        if finished:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size.get(id(c), 1) for c in _children(node))
            if size[id(node)] > max_nodes:
                raise pickle.UnpicklingError(f"the pickled object expands to more than {max_nodes:,} parts")
            continue
        if id(node) in on_path:
            raise pickle.UnpicklingError("the pickled object contains itself (a cycle); checkpoints never do")
        on_path.add(id(node))
        if len(on_path) > MAX_DEPTH:
            raise pickle.UnpicklingError(f"objects nested more than {MAX_DEPTH} deep")
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node))


def inert_loads(data: bytes, persistent_load: Any = None) -> tuple[Any, list[str]]:
    """Unpickle `data`, standing in for every class outside SAFE_GLOBALS: (object, stand-in names)."""
    unpickler = InertUnpickler(io.BytesIO(data), persistent_load)
    try:
        obj = unpickler.load()
    except RecursionError:
        raise pickle.UnpicklingError(f"objects nested more than {MAX_DEPTH} deep") from None
    check_structure(obj, max_nodes=1000 + 20 * len(data))
    return obj, sorted(unpickler.stand_ins)
