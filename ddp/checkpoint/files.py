"""Checkpoint files: atomic writes, safe loads with one-line errors, and the layouts other tools write."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pickle
import pickletools
import re
import secrets
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ddp.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointWriteError,
    UntrustedPickleError,
    first_line,
)

FORMAT = "ddp-cifar/1"
WEIGHTS_FORMAT = "ddp-cifar-weights/1"
LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"


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


def _temp_name(path: Path) -> Path:
    # dot: never a checkpoint; the shape is what lock.TEMP_FILE recognises as a killed writer's leftover
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


class _WritebackFile:
    """A file whose every few MB written are handed to the disk at once (the kernel starts writing them back).

    The disk then works while the rest is serialised, and the closing fsync has little left to wait for
    (134 MB here: 38 ms -> 5 ms). On Linux posix_fadvise(DONTNEED) starts that writeback (Python has no
    sync_file_range); it may also drop pages already written, which a just-saved checkpoint can spare.
    """

    EVERY = 16 << 20

    def __init__(self, f: IO[bytes]):
        self._f, self._written, self._started = f, 0, 0

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._written += n
        if self._written - self._started >= self.EVERY and hasattr(os, "posix_fadvise"):
            self._f.flush()
            with contextlib.suppress(OSError):  # only a hint: the fsync below makes it durable either way
                os.posix_fadvise(self._f.fileno(), self._started, self._written - self._started,
                                 os.POSIX_FADV_DONTNEED)
            self._started = self._written
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _same_bytes(tmp: Path, path: Path) -> Path:
    """A temp file for `path` with tmp's bytes: a hard link (nothing written), or a copy where links fail."""
    other = _temp_name(path)
    try:
        os.link(tmp, other)
    except OSError:  # another file system (EXDEV), or one without hard links (EPERM, EOPNOTSUPP, EMLINK)
        with open(tmp, "rb") as src, open(other, "xb") as dst:
            try:
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(other)
                raise
    return other


def _os_error_behind(e: BaseException) -> BaseException:
    """The OSError that caused `e`, if any: torch.save reports a failed write (disk full) as a RuntimeError."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause or e


def _write_all(paths: list[Path], write: Callable[[IO[bytes]], Any], what: str = "checkpoint") -> None:
    """Write the bytes once, fsync, then give them every name in `paths`, each atomically and in order.

    The other names are hard links of the one written file (a copy where the file system refuses). A
    failure leaves every name not yet replaced untouched, and no temp file behind.
    """
    temps: list[Path] = []
    current = paths[0]  # what the error message names
    try:
        for path in paths:
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
        current = paths[0]
        tmp = _temp_name(paths[0])
        with open(tmp, "xb") as f:
            temps.append(tmp)
            write(_WritebackFile(f))
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before any name points at them
        for path in paths[1:]:
            current = path
            temps.append(_same_bytes(tmp, path))
        for tmp_path, path in zip(temps, paths):
            current = path
            os.replace(tmp_path, path)  # atomic on POSIX: the old file or the new one, never a mix
    except BaseException as e:
        for tmp_path in temps:  # those already renamed are gone: nothing to do for them
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
        if not isinstance(e, Exception):  # Ctrl-C etc.: clean up but don't disguise it
            raise
        reason = _os_error_behind(e)
        raise CheckpointWriteError(f"could not write {what} {current}: {first_line(reason)}; {_write_hint(reason)} "
                                   "(any previous file there is untouched)") from e
    for directory in dict.fromkeys(path.parent for path in paths):  # makes the renames durable
        _fsync_dir(directory)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], what: str = "checkpoint") -> None:
    """Write via a temp file in the same directory, fsync, rename: readers never see a partial file."""
    _write_all([Path(path)], write, what)


def save_checkpoint(obj: dict, path: str | os.PathLike, *more_paths: str | os.PathLike) -> None:
    """torch.save atomically to `path`, and the same file under each of `more_paths` (hard links where possible).

    One torch.save straight into the file, however many names: latest.pt, best.pt and the epoch file cost one write.
    """
    _write_all([Path(p) for p in (path, *more_paths)], lambda f: torch.save(obj, f))


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
        mapped = _verify_crc32(f, path)
        try:  # a checked zip is mapped, not read again: its tensors are copy-on-write views of the verified pages
            return torch.load(_same_file(f, path) if mapped else f, map_location=map_location,
                              weights_only=not trust_pickle, mmap=mapped)
        except Exception as e:  # from here on, torch choked on the bytes (a bad zip even shows up as OSError)
            raise _load_error(path, e, trust_pickle) from e


def _same_file(f: IO[bytes], path: Path) -> str | Path:
    """A name for the open file itself (torch.load(mmap=True) wants a name): what was verified is what loads,
    even if a save replaced `path` in between."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else path


def _verify_crc32(f: IO[bytes], path: Path) -> bool:
    """Check every record of a torch zip file against the CRC32 that torch.save stored for it.

    torch.load does not check these, so a flipped bit in the tensor data would load silently. The check
    reads the file through a memory map that torch.load(mmap=True) then shares, so the bytes are read
    once; returns whether it did so. Files that are not zips (the legacy torch format, other pickles)
    are left to torch.load.
    """
    if not zipfile.is_zipfile(f):
        f.seek(0)
        return False
    try:
        with zipfile.ZipFile(f) as archive:
            records = archive.infolist()
            stored = all(r.compress_type == zipfile.ZIP_STORED for r in records)  # torch.save never compresses
            mapped = _map(f) if stored else None
            if mapped is None:  # compressed records, or a file system that cannot map files: read and check
                bad = archive.testzip()
            else:
                with mapped, memoryview(mapped) as data:
                    bad = next((r.filename for r in records if _crc32(data, r) != r.CRC), None)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointCorruptError(f"{path} is a damaged zip ({first_line(e, 120)}); delete it or pick "
                                     "another checkpoint") from e
    if bad is not None:
        raise CheckpointCorruptError(f"{path} is corrupted: record {bad} fails its CRC32 check; delete it or "
                                     "pick another checkpoint")
    f.seek(0)
    return mapped is not None


def _map(f: IO[bytes]) -> mmap.mmap | None:
    try:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    if hasattr(mmap, "MADV_SEQUENTIAL"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)  # read ahead eagerly: the check reads it all, front to back
    return mapped


def _crc32(data: memoryview, record: zipfile.ZipInfo) -> int:
    """CRC32 of a stored record's bytes, found through its local header (whose extra field torch pads)."""
    start = record.header_offset
    if data[start:start + 4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for record {record.filename}")
    name_length, extra_length = struct.unpack_from("<HH", data, start + 26)
    begin = start + 30 + name_length + extra_length  # 30: the fixed part of a local header
    if begin + record.compress_size > len(data):
        raise zipfile.BadZipFile(f"record {record.filename} runs past the end of the file")
    return zlib.crc32(data[begin:begin + record.compress_size])


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
