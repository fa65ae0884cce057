"""Checkpoint files: atomic save, safe load, wrapper-prefix normalisation, key diffs, foreign layouts.

Plain functions over dicts, modules and files; nothing here touches torch.distributed, so the trainer,
the tests and the CLI (`python -m ddp.checkpoint {inspect,export,convert}`) all share one code path.
Every checkpoint is readable with torch.load(weights_only=True): tensors and plain Python types only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pickle
import random
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

try:
    import numpy as np
except ImportError:  # numpy is optional for torch; its rng is then simply not captured
    np = None

FORMAT = "ddp-cifar/1"
WEIGHTS_FORMAT = "ddp-cifar-weights/1"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DataParallel and torch.compile
LATEST_NAME = "latest.pt"
STATE_KEYS = ("model", "state_dict", "model_state_dict", "net", "module")  # where other projects put weights
COMMON_PREFIXES = ("backbone.", "model.", "net.", "encoder.", "base_model.")  # reported by inspect only
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")

# mkstemp creates files with mode 0600; read the umask once so checkpoints get the usual mode instead
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CheckpointError(Exception):
    """Base class; every message is one line meant for the user."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """The file is not a readable checkpoint (empty, truncated, garbage)."""


class UntrustedPickleError(CheckpointError, ValueError):
    """The file holds pickled classes/code that weights_only loading refuses."""


class CheckpointFormatError(CheckpointError, ValueError):
    """The file loads, but its layout or format version is not one we understand."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the model (or optimizer); `.diff` holds the details."""

    def __init__(self, message: str, diff: KeyDiff | None = None):
        super().__init__(message)
        self.diff = diff


class CheckpointWriteError(CheckpointError, OSError):
    """Saving failed; whatever was at the destination before is untouched."""


# ----------------------------------------------------------------------------- keys and prefixes

def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers, nested in any order."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # OptimizedModule, without importing dynamo
            model = model._orig_mod
        else:
            return model


def _strip_key(key: str) -> str:
    while True:
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key


def _rename(state: Mapping[str, Any], rename: Callable[[str], str], why: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = rename(key)
        if new in out:  # silently keeping one of the two would load the wrong weights
            raise CheckpointFormatError(f"keys {origin[new]!r} and {key!r} both become {new!r} {why}")
        out[new], origin[new] = value, key
    return out


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove any leading run of `module.` / `_orig_mod.` from every key (the canonical, unwrapped names)."""
    return _rename(state, _strip_key, "after stripping wrapper prefixes")


def remap_prefixes(state: Mapping[str, Any], rules: list[tuple[str, str]]) -> dict[str, Any]:
    """Replace a leading OLD with NEW on each key; the first matching rule wins."""
    def rename(key: str) -> str:
        for old, new in rules:
            if key.startswith(old):
                return new + key[len(old):]
        return key
    return _rename(state, rename, "after --remap")


def parse_remap(text: str) -> tuple[str, str]:
    """Parse `OLD=NEW` (either side may be empty: `backbone.=` strips, `=backbone.` adds)."""
    old, sep, new = text.partition("=")
    if not sep or not (old or new):
        raise ValueError(f"--remap expects OLD=NEW, e.g. 'backbone.=' to drop a prefix; got {text!r}")
    return old, new


def detect_prefixes(keys: Iterable[str]) -> list[str]:
    """Wrapper prefixes and other common whole-model prefixes (e.g. `backbone.`) present on the keys."""
    found: list[str] = []
    for key in keys:
        while True:
            prefix = next((p for p in WRAPPER_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                break
            found.append(prefix)
            key = key[len(prefix):]
        found += [p for p in COMMON_PREFIXES if key.startswith(p)]
    return list(dict.fromkeys(found))


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "scalar"


@dataclass
class KeyDiff:
    """How a checkpoint's keys differ from a model's state dict."""

    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, ckpt shape, model shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def _sections(self) -> list[tuple[str, list[str]]]:
        mism = [f"{k} {_shape(c)} in checkpoint vs {_shape(m)} in model" for k, c, m in self.shape_mismatch]
        return [("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", mism)]

    def report(self, title: str = "checkpoint vs model", limit: int = 20) -> str:
        """Multi-line human-readable summary, at most `limit` keys per section."""
        if self.ok:
            return f"{title}: all keys and shapes match"
        lines = [f"{title}: {self.one_line(first=0)}"]
        for name, items in self._sections():
            if items:
                lines.append(f"  {name} ({len(items)}):")
                lines += [f"    {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)

    def one_line(self, first: int = 3) -> str:
        """Counts plus the first few keys of each kind, for error messages."""
        parts = []
        for name, items in self._sections():
            if items:
                shown = ", ".join(items[:first]) + (", ..." if len(items) > first else "")
                parts.append(f"{len(items)} {name}" + (f" ({shown})" if first else ""))
        return "; ".join(parts) or "all keys and shapes match"


def diff_state(model_state: Mapping[str, Any], ckpt_state: Mapping[str, Any]) -> KeyDiff:
    """Compare key sets and shapes (checkpoint against model)."""
    mismatch = []
    for key, value in model_state.items():
        if key in ckpt_state:
            ckpt_shape, model_shape = tuple(ckpt_state[key].shape), tuple(value.shape)
            if ckpt_shape != model_shape:
                mismatch.append((key, ckpt_shape, model_shape))
    return KeyDiff(missing=[k for k in model_state if k not in ckpt_state],
                   unexpected=[k for k in ckpt_state if k not in model_state],
                   shape_mismatch=mismatch)


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> KeyDiff:
    """Load `state` into the unwrapped model; strict raises CheckpointMismatchError, else skips what doesn't fit."""
    target = unwrap_model(model)
    state = strip_wrapper_prefixes(state)
    diff = diff_state(target.state_dict(), state)
    if strict and not diff.ok:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(target).__name__}: {diff.one_line()}. Check that --model and "
            "--num-classes match the run that saved it, or use --init-from for a partial load", diff)
    skip = {key for key, _, _ in diff.shape_mismatch}  # load_state_dict(strict=False) still fails on shapes
    try:
        target.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=strict)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"loading into {type(target).__name__} failed: {_first_line(e)}", diff) from e
    return diff


# ----------------------------------------------------------------------------- files

def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if isinstance(e, OSError) else f"{type(e).__name__}: {text}".rstrip(": ")
    return text[:limit]


def _write_hint(e: BaseException) -> str:
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC:
        return "free disk space or save to another directory"
    if code in (errno.EPERM, errno.EACCES, errno.EROFS):
        return "check write permissions or save to another directory"
    if isinstance(e, OSError):
        return "check the file system or save to another directory"
    return "the object could not be serialised (only tensors and plain Python types can be saved)"


def _fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; some platforms/file systems cannot fsync a directory, so best effort
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], what: str = "checkpoint") -> None:
    """Write via a temp file in the same directory + os.replace, so readers never see a partial file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not isinstance(e, Exception):  # Ctrl-C etc.: clean up but don't disguise it
            raise
        raise CheckpointWriteError(f"could not write {what} {path}: {_first_line(e)}; {_write_hint(e)} "
                                   "(any previous file there is untouched)") from e
    _fsync_dir(path.parent)


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """torch.save atomically (temp file, fsync, rename, fsync dir); creates the directory if missing."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _refused_global(e: BaseException) -> str | None:
    # weights_only reports the offending class as "GLOBAL module.name"; garbage bytes fail differently
    for err in (e, e.__context__):
        match = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(err or ""))
        if match:
            return match.group(1)
    return None


def load_checkpoint(path: str | os.PathLike, map_location: Any, *, trust_pickle: bool = False) -> Any:
    """torch.load with weights_only=True (unless trust_pickle), turning failures into clear one-line errors.

    Returns what the file holds: normally a dict; with trust_pickle possibly an nn.Module.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; pass a checkpoint file (e.g. {path / LATEST_NAME})")
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointCorruptError(f"{path} is empty (0 bytes), probably an interrupted write; "
                                     "delete it or pick another checkpoint")
    with open(path, "rb") as f:  # real I/O problems (e.g. permission denied) surface here, as themselves
        try:
            return torch.load(f, map_location=map_location, weights_only=not trust_pickle)
        except Exception as e:  # from here on, torch choked on the bytes (a bad zip even shows up as OSError)
            raise _load_error(path, e, trust_pickle) from e


def _load_error(path: Path, e: Exception, trust_pickle: bool) -> CheckpointError:
    """Translate whatever torch.load raised into one of our one-line errors."""
    name = _refused_global(e) if isinstance(e, pickle.UnpicklingError) else None
    if name:
        return UntrustedPickleError(
            f"{path} contains pickled Python objects ({name}), e.g. a whole model saved with torch.save(model), "
            "not just tensors; loading it could run arbitrary code from the file. If you trust it, convert it "
            f"once: python -m ddp.checkpoint convert {path} OUT.pt --trust-pickle (Python: trust_pickle=True)"
        )
    if isinstance(e, RuntimeError) and "torch.cuda.is_available() is False" in str(e):
        return CheckpointError(f"{path} holds CUDA tensors and CUDA is not available here; "
                               "load it with map_location='cpu'")
    if trust_pickle and isinstance(e, (AttributeError, ImportError)):
        return CheckpointFormatError(f"{path}: the pickled objects need code that cannot be imported here "
                                     f"({_first_line(e)}); run this where that code is importable")
    return CheckpointCorruptError(f"{path} is not a readable checkpoint (truncated, corrupted or not a torch "
                                  f"file: {_first_line(e, 120)}); delete it or pick another file")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_model_state(obj: Any) -> tuple[str, Mapping[str, torch.Tensor]]:
    """(layout description, raw model state) for every layout we recognise."""
    if isinstance(obj, nn.Module):
        return "pickled nn.Module", unwrap_model(obj).state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"expected a dict or nn.Module in the file, found {type(obj).__name__}")
    if "format" in obj:
        if obj["format"] in (FORMAT, WEIGHTS_FORMAT):
            return obj["format"], obj["model"]
        raise CheckpointFormatError(f"unknown checkpoint format {obj['format']!r}; this code reads {FORMAT} and "
                                    f"{WEIGHTS_FORMAT} (a newer ddp-cifar may have written it)")
    if _is_state_dict(obj):
        return "bare state dict", obj
    for key in STATE_KEYS:
        value = obj.get(key)
        if isinstance(value, nn.Module):
            return f"pickled nn.Module under {key!r}", unwrap_model(value).state_dict()
        if _is_state_dict(value):
            return f"state dict under {key!r}", value
    keys = ", ".join(repr(k) for k in list(obj)[:20]) + (", ..." if len(obj) > 20 else "")
    raise CheckpointFormatError(f"no model weights found; top-level keys are: {keys or '(none)'}. Expected a state "
                                f"dict of tensors, or one under {', '.join(STATE_KEYS)}")


def extract_model_state(obj: Any) -> dict[str, torch.Tensor]:
    """The model state dict (wrapper prefixes stripped) from any recognised layout."""
    return strip_wrapper_prefixes(_find_model_state(obj)[1])


def load_model_state(path: str | os.PathLike, map_location: Any = "cpu", *,
                     trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Canonical model state dict from any recognised checkpoint file."""
    return extract_model_state(load_checkpoint(path, map_location, trust_pickle=trust_pickle))


def load_into(model: nn.Module, path: str | os.PathLike, strict: bool = True, *,
              map_location: Any = None) -> KeyDiff:
    """Load a checkpoint file's weights into `model` (by default onto the device of its first parameter)."""
    if map_location is None:
        param = next(unwrap_model(model).parameters(), None)
        map_location = param.device if param is not None else "cpu"
    return load_state_into(model, load_model_state(path, map_location), strict=strict)


# ----------------------------------------------------------------------------- training state

def _plain(x: Any, where: str = "config") -> Any:
    """Convert to what weights_only loading accepts: tuples->lists, paths->str, numpy scalars/arrays->Python."""
    if x is None or isinstance(x, torch.Tensor) or type(x) in (bool, int, float, str):
        return x
    for base in (int, float, str):  # subclasses (np.float64, TorchVersion) would pickle as foreign globals
        if isinstance(x, base):
            return base(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, Mapping):
        return {k if isinstance(k, (str, int)) else str(k): _plain(v, f"{where}.{k}") for k, v in x.items()}
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return _plain(x.tolist(), where)
    raise TypeError(f"{where}: {type(x).__name__} cannot go into a checkpoint; use str/int/float/bool/None/list/dict")


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def capture_rng() -> dict:
    """Python, numpy, torch CPU and (if available) every CUDA device's RNG state, as plain types/tensors."""
    numpy_state = None
    if np is not None:
        s = np.random.get_state(legacy=False)
        numpy_state = {"bit_generator": s["bit_generator"], "pos": int(s["state"]["pos"]),
                       "key": torch.from_numpy(s["state"]["key"].astype(np.int64)),  # uint32 -> int64, lossless
                       "has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}
    return {"python": _plain(random.getstate()),  # (version, tuple of 625 ints, gauss) -> lists
            "numpy": numpy_state,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: Mapping[str, Any] | None) -> None:
    """Inverse of capture_rng; missing parts (e.g. converted checkpoints) and absent CUDA devices are skipped."""
    if not state:
        return
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None and np is not None:
        s = state["numpy"]
        np.random.set_state({"bit_generator": s["bit_generator"], "has_gauss": s["has_gauss"], "gauss": s["gauss"],
                             "state": {"key": s["key"].cpu().numpy().astype(np.uint32), "pos": s["pos"]}})
    # map_location may have moved these tensors to a GPU, but the generators only take CPU byte tensors
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():  # restore what overlaps if the GPU count changed
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def make_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any, *,
                    progress: Mapping[str, int], metrics: Mapping[str, Any], config: Mapping[str, Any] | Any,
                    world_size: int, device_type: str) -> dict:
    """Everything needed to resume, in our format. `config` may be a dict or an argparse.Namespace.

    Tensors are views of the live weights/optimizer state (no copy): save right away, or deepcopy to keep.
    """
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    return {
        "format": FORMAT,
        # unwrapped, so keys carry no module./_orig_mod. and the weights load into a bare model
        "model": {k: v.detach() for k, v in unwrap_model(model).state_dict().items()},
        # optimizer state is keyed by parameter index (the order of model.parameters()), not by name, so it is
        # the same with or without DDP/compile wrappers
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": {k: int(v) for k, v in {"epoch": 0, "step": 0, "batch_in_epoch": 0, **progress}.items()},
        "metrics": {k: _opt_float(v) for k, v in {"best_acc": 0.0, "acc": None, "loss": None, **metrics}.items()},
        "config": _plain(dict(config)),
        "env": {"world_size": int(world_size), "device": str(device_type), "torch": str(torch.__version__)},
        "rng": capture_rng(),
    }


def restore_checkpoint(ckpt: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None, scaler: Any = None) -> None:
    """Load model (strict), then optimizer/scheduler/scaler state; RNG is left to the caller (restore_rng)."""
    fmt = ckpt.get("format") if isinstance(ckpt, Mapping) else None
    if fmt != FORMAT:
        raise CheckpointFormatError(f"cannot resume from a checkpoint of format {fmt!r} (need {FORMAT!r}); for "
                                    "weights from elsewhere use --init-from, or `python -m ddp.checkpoint convert`")
    load_state_into(model, ckpt["model"], strict=True)
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            warnings.warn("checkpoint has no optimizer state; the optimizer starts fresh", stacklevel=2)
        else:
            try:  # load_state_dict casts/moves the state to each parameter's device and dtype
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointMismatchError(f"optimizer state does not fit: {_first_line(e)}; was the checkpoint "
                                              "saved with a different optimizer or model?") from e
    if scheduler is not None:
        if ckpt.get("scheduler") is None:
            warnings.warn("checkpoint has no scheduler state; the LR schedule restarts", stacklevel=2)
        else:
            scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):  # {} means saved without AMP: keep the fresh scaler
        scaler.load_state_dict(ckpt["scaler"])


# ----------------------------------------------------------------------------- checkpoint directories

def epoch_checkpoint_name(epoch: int) -> str:
    """File name for the checkpoint written after `epoch` epochs, e.g. epoch_0003.pt."""
    return f"epoch_{epoch:04d}.pt"


def _epoch_files(directory: str | os.PathLike) -> list[Path]:
    """Epoch checkpoints, oldest first (by number, not mtime; temp files start with '.' and never match)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_epoch_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` epoch checkpoints (keep <= 0 keeps all); returns what was removed."""
    if keep <= 0:
        return []
    doomed = _epoch_files(directory)[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def newest_valid_checkpoint(directory: str | os.PathLike, map_location: Any) -> tuple[Path, dict] | None:
    """(path, checkpoint) for latest.pt, else the newest loadable epoch file; corrupt files are skipped with a warning."""
    for path in [Path(directory) / LATEST_NAME, *reversed(_epoch_files(directory))]:
        if not path.is_file():
            continue
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointCorruptError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    return None
