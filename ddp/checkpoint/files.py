"""Checkpoint files: atomic writes, safe loads with one-line errors, and the layouts other tools write."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import pickletools
import re
import secrets
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from ddp.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointWriteError,
    UntrustedPickleError,
    first_line,
)
from ddp.checkpoint.keys import KeyDiff, load_state_into, strip_wrapper_prefixes, unwrap_model

FORMAT = "ddp-cifar/1"
WEIGHTS_FORMAT = "ddp-cifar-weights/1"
LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"
STATE_KEYS = ("model", "state_dict", "model_state_dict", "net", "module")  # where other projects put weights


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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], what: str = "checkpoint") -> None:
    """Write via a temp file in the same directory, fsync, rename: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # dot: never a checkpoint
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)  # atomic on POSIX: the old file or the new one, never a mix
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, Exception):  # Ctrl-C etc.: clean up but don't disguise it
            raise
        raise CheckpointWriteError(f"could not write {what} {path}: {first_line(e)}; {_write_hint(e)} "
                                   "(any previous file there is untouched)") from e
    _fsync_dir(path.parent)


def save_checkpoint(obj: dict, path: str | os.PathLike, *more_paths: str | os.PathLike) -> None:
    """torch.save atomically to `path` (and the same bytes to each of `more_paths`), one file at a time.

    Serialising once into memory makes latest.pt, best.pt and the epoch file cost one torch.save.
    """
    if not more_paths:
        atomic_write(path, lambda f: torch.save(obj, f))
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    for p in (path, *more_paths):
        atomic_write(p, lambda f: f.write(buffer.getbuffer()))


def _refused_global(e: BaseException) -> str | None:
    # weights_only reports the offending class as "GLOBAL module.name"; garbage bytes fail differently
    for err in (e, e.__context__):
        match = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(err or ""))
        if match:
            return match.group(1)
    return None


def _foreign_globals(path: Path) -> list[str]:
    """What a pickle would import beyond torch's own rebuild functions, read with pickletools: nothing runs.

    Needed where torch's weights-only unpickler stops before naming the class (e.g. protocol 4 pickles).
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # module and name were pushed as strings
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 -- not a pickle we can walk: nothing more to say about it
        return []
    return [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]


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
        _verify_crc32(f, path)
        try:
            return torch.load(f, map_location=map_location, weights_only=not trust_pickle)
        except Exception as e:  # from here on, torch choked on the bytes (a bad zip even shows up as OSError)
            raise _load_error(path, e, trust_pickle) from e


def _verify_crc32(f: IO[bytes], path: Path) -> None:
    """Check every record of a torch zip file against the CRC32 that torch.save stored for it.

    torch.load does not check these, so a flipped bit in the tensor data would load silently.
    Files that are not zips (the legacy torch format, other pickles) are left to torch.load.
    """
    if not zipfile.is_zipfile(f):
        f.seek(0)
        return
    try:
        with zipfile.ZipFile(f) as archive:
            bad = archive.testzip()  # reads every record, compares its CRC32
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointCorruptError(f"{path} is a damaged zip ({first_line(e, 120)}); delete it or pick "
                                     "another checkpoint") from e
    if bad is not None:
        raise CheckpointCorruptError(f"{path} is corrupted: record {bad} fails its CRC32 check; delete it or "
                                     "pick another checkpoint")
    f.seek(0)


def _load_error(path: Path, e: Exception, trust_pickle: bool) -> CheckpointError:
    """Translate whatever torch.load raised into one of our one-line errors."""
    name = None
    if isinstance(e, pickle.UnpicklingError):
        name = _refused_global(e) or next(iter(_foreign_globals(path)), None)
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
                                     f"({first_line(e)}); run this where that code is importable")
    return CheckpointCorruptError(f"{path} is not a readable checkpoint (truncated, corrupted or not a torch "
                                  f"file: {first_line(e, 120)}); delete it or pick another file")


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def find_model_state(obj: Any) -> tuple[str, Mapping[str, torch.Tensor]]:
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
    if is_state_dict(obj):
        return "bare state dict", obj
    for key in STATE_KEYS:
        value = obj.get(key)
        if isinstance(value, nn.Module):
            return f"pickled nn.Module under {key!r}", unwrap_model(value).state_dict()
        if is_state_dict(value):
            return f"state dict under {key!r}", value
    keys = ", ".join(repr(k) for k in list(obj)[:20]) + (", ..." if len(obj) > 20 else "")
    raise CheckpointFormatError(f"no model weights found; top-level keys are: {keys or '(none)'}. Expected a state "
                                f"dict of tensors, or one under {', '.join(STATE_KEYS)}")


def extract_model_state(obj: Any) -> dict[str, torch.Tensor]:
    """The model state dict (wrapper prefixes stripped) from any recognised layout."""
    return strip_wrapper_prefixes(find_model_state(obj)[1])


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


def load_weights(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(canonical model state, what it says about the model) from any checkpoint, export or state dict.

    The second item holds `model_name` and `num_classes` where the file records them (our checkpoints
    and exports, .safetensors exports); it is empty for foreign layouts.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        device = str(map_location) if map_location is not None else "cpu"
        with safe_open(str(path), framework="pt", device=device) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a Mapping
            meta = dict(f.metadata() or {})
        info = {"model_name": meta.get("model_name")} if meta.get("model_name") else {}
        if "num_classes" in meta:
            info["num_classes"] = json.loads(meta["num_classes"])
        return strip_wrapper_prefixes(state), info
    obj = load_checkpoint(path, map_location)
    state = extract_model_state(obj)
    if isinstance(obj, Mapping) and obj.get("format") == WEIGHTS_FORMAT:
        return state, {"model_name": obj["model_name"], "num_classes": obj["num_classes"]}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        config = obj.get("config") or {}
        return state, {"model_name": config.get("model"), "num_classes": config.get("num_classes", 10)}
    return state, {}
