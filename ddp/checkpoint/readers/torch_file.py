"""torch.save files, read without torch.load: the zip format (since torch 1.6) and the legacy pickle stream.

    zip     PK records: ARCHIVE/data.pkl (the pickle), ARCHIVE/data/<key> (one per storage), byteorder, ...
    legacy  pickles in a row: magic number, protocol, system info, the object, its storage keys; then
            each storage as an 8-byte element count and its raw bytes

Both are read in the order of ../shared/DESIGN.md: bounds from the file's size, every record checked
(stored, not encrypted, inside the file, not overlapping another, its CRC32), then storages built only
from bytes the file holds, and the pickle through the inert unpickler. No file size, count or offset
written in the file makes us allocate more than the file itself. Any file no other reader claims
comes here last, so its verdict on that file is the one the user sees.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import torch

from ddp.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    UntrustedPickleError,
    first_line,
)
from ddp.checkpoint.readers.loaded import Loaded, open_regular
from ddp.checkpoint.rebuild import RebuildError, torch_device
from ddp.checkpoint.standins import StorageTag, refuse_hostile
from ddp.checkpoint.unpickle import InertUnpickler, check_structure

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_DAMAGED = "delete it or pick another checkpoint"


def claims(path: Path, head: bytes) -> bool:
    return True  # the fallback: asked last


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    if trust_pickle:
        return _trusted(path, map_location)
    with open_regular(path) as f:
        obj, names, container = read_torch(f, map_location, str(path))
    refuse_hostile(names, str(path))
    return Loaded(obj, container, names)


def load_checkpoint(path: str | os.PathLike, map_location: Any, *, trust_pickle: bool = False) -> Any:
    """What a torch file holds (normally a dict; with trust_pickle possibly an nn.Module), or a one-line error.

    For files meant to be ours (resume): a file whose pickle names other classes is refused, not stood in for.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointFormatError(f"{path} is a directory; pass a checkpoint file (e.g. {path / 'latest.pt'})")
    loaded = read(path, map_location, trust_pickle=trust_pickle)
    if loaded.stand_ins:
        raise UntrustedPickleError(
            f"{path} contains pickled Python objects ({loaded.stand_ins[0]}), e.g. a whole model saved with "
            "torch.save(model), not just tensors; loading it could run arbitrary code from the file. If you trust "
            f"it, convert it once: python -m ddp.checkpoint convert {path} OUT.pt --trust-pickle (Python: "
            "trust_pickle=True)")
    return loaded.obj


def read_torch(f: IO[bytes], map_location: Any, where: str) -> tuple[Any, list[str], str]:
    """(object, stand-in names, "torch zip" | "torch legacy") from an open torch file or bytes."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(512)
    f.seek(0)
    if size == 0:
        raise CheckpointCorruptError(f"{where} is empty (0 bytes), probably an interrupted write; {_DAMAGED}")
    try:
        if head.startswith(ZIP_MAGIC):
            return (*_read_zip(f, size, map_location, where), "torch zip")
        if head[257:262] == b"ustar":
            raise CheckpointFormatError(f"{where} is a tar archive (torch.save before 0.4 wrote those); load it once "
                                        "with an old torch you trust and save it again")
        if not head.startswith(b"\x80"):
            # unknown bytes: a damaged file (the trainer then falls back to an older one) or no checkpoint at all
            raise CheckpointCorruptError(f"{where} is in no checkpoint format this reader knows (it starts with "
                                         f"{head[:8]!r}): damaged, or not a checkpoint; pass a torch, safetensors or "
                                         "DCP checkpoint")
        return (*_read_legacy(f, size, map_location, where), "torch legacy")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError, zipfile.BadZipFile, struct.error, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        detail = first_line(e, 150)  # "UnpicklingError: ..." reads better as "its pickle: ..."
        detail = "its pickle" + detail[len(type(e).__name__):] if isinstance(e, pickle.UnpicklingError) else detail
        raise CheckpointCorruptError(f"{where} is not a readable checkpoint (truncated, corrupted or crafted: "
                                     f"{detail}); {_DAMAGED}") from None


def _device(location: Any, map_location: Any) -> torch.device:
    """Where a storage goes: map_location, else where it was saved, if that device exists here."""
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        return torch.device(map_location)
    try:
        device = torch_device(location)
    except RebuildError as e:
        raise pickle.UnpicklingError(str(e)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("it holds CUDA tensors and CUDA is not available here; load it with map_location='cpu'")
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def _storage(data: bytearray, tag: Any, numel: Any, device: torch.device) -> torch.storage.TypedStorage:
    if not isinstance(tag, StorageTag) or type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError("a storage reference that torch never writes")
    element = torch.empty((), dtype=tag.dtype).element_size()
    if numel * element > len(data):
        raise pickle.UnpicklingError(f"a storage of {numel} elements has only {len(data)} bytes")
    untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
    return torch.storage.TypedStorage(wrap_storage=untyped.to(device=device), dtype=tag.dtype, _internal=True)


# ----------------------------------------------------------------------------------------------- zip


def _records(f: IO[bytes], size: int, where: str) -> tuple[str, dict[str, bytearray]]:
    """Every record's bytes, checked: stored, unencrypted, named under one root, inside the file, disjoint, CRC."""
    with zipfile.ZipFile(f) as archive:
        infos = archive.infolist()
    if not infos or len(infos) > size // 30:  # a local header alone is 30 bytes
        raise CheckpointCorruptError(f"{where} is a zip with {len(infos)} records for {size} bytes; {_DAMAGED}")
    root = infos[0].filename.split("/")[0]
    spans, records = [], {}
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if parts[0] != root or len(parts) < 2 or any(p in ("", ".", "..") for p in parts) or "\\" in name \
                or "\x00" in name or name in records:
            raise CheckpointFormatError(f"{where}: zip record name {name[:60]!r} is not one torch.save writes")
        if info.flag_bits & 0x1:
            raise CheckpointFormatError(f"{where} has encrypted records; torch.save never encrypts: not a torch file")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointFormatError(f"{where} has compressed records; torch.save never compresses: not a "
                                        "torch file as torch writes it (unzip and re-zip with no compression?)")
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) < 30 or header[:4] != ZIP_MAGIC:
            raise zipfile.BadZipFile(f"no local header for record {name[:60]}")
        name_length, extra_length = struct.unpack_from("<HH", header, 26)
        begin = info.header_offset + 30 + name_length + extra_length
        if begin + info.file_size > size:
            raise zipfile.BadZipFile(f"record {name[:60]} runs past the end of the file")
        spans.append((info.header_offset, begin + info.file_size, name))
        data = bytearray(info.file_size)
        f.seek(begin)
        if f.readinto(data) != len(data):
            raise zipfile.BadZipFile(f"record {name[:60]} is truncated")
        if zlib.crc32(data) != info.CRC:
            raise CheckpointCorruptError(f"{where} is corrupted: record {name[:60]} fails its CRC32 check; {_DAMAGED}")
        records[name] = data
    spans.sort()
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:  # records sharing bytes: the way zip bombs multiply a file
            raise CheckpointFormatError(f"{where}: zip records {name[:40]} and {other[:40]} overlap; not a torch file")
    return root, records


def _read_zip(f: IO[bytes], size: int, map_location: Any, where: str) -> tuple[Any, list[str]]:
    root, records = _records(f, size, where)
    if records.get(f"{root}/byteorder", bytearray(b"little")) != b"little":
        raise CheckpointFormatError(f"{where} was saved on a big-endian machine; this reader reads little-endian files")
    if f"{root}/data.pkl" not in records:
        raise CheckpointFormatError(f"{where} is a zip without data.pkl: not a torch.save file")
    storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[2], str):
            raise pickle.UnpicklingError("a persistent id that torch.save never writes")
        _, tag, key, location, numel = pid
        name = f"{root}/data/{key}"
        if name not in records:
            raise pickle.UnpicklingError(f"a storage {key[:40]!r} that the archive does not hold")
        if key not in storages:
            storages[key] = _storage(records[name], tag, numel, _device(location, map_location))
        elif storages[key].dtype != tag.dtype:  # one storage seen as two dtypes: torch writes views, not that
            raise pickle.UnpicklingError(f"storage {key[:40]!r} is named with two dtypes")
        return storages[key]

    return _unpickle(records[f"{root}/data.pkl"], persistent_load)


def _unpickle(data: bytes | IO[bytes], persistent_load: Any) -> tuple[Any, list[str]]:
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    start = stream.tell()
    unpickler = InertUnpickler(stream, persistent_load)
    obj = unpickler.load()
    check_structure(obj, max_nodes=100_000 + 20 * (stream.tell() - start))
    return obj, sorted(unpickler.stand_ins)


# -------------------------------------------------------------------------------------------- legacy


def _read_legacy(f: IO[bytes], size: int, map_location: Any, where: str) -> tuple[Any, list[str]]:
    """Two passes over the object's pickle: the first (every name a stand-in) only learns which storages it
    uses, so that their bytes, after the pickles, are read and checked before the second builds anything."""
    first = InertUnpickler(f)
    if first.load() != LEGACY_MAGIC:
        refuse_hostile(sorted(first.stand_ins), where)  # a plain pickle that calls os.system is named an attack
        raise CheckpointFormatError(f"{where} is a Python pickle, not a torch.save file; this reader loads torch, "
                                    "safetensors and DCP checkpoints")
    if InertUnpickler(f).load() != LEGACY_PROTOCOL or not isinstance(info := InertUnpickler(f).load(), dict) \
            or info.get("little_endian", True) is not True:
        raise CheckpointFormatError(f"{where}: a torch file of a protocol or byte order this reader does not know")
    start, used = f.tell(), {}

    def note(pid: Any) -> None:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            return  # a whole model's class with its source: the source is never compiled
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage" or not isinstance(pid[2], str) \
                or not isinstance(pid[1], StorageTag) or type(pid[4]) is not int or pid[4] < 0:
            raise pickle.UnpicklingError("a persistent id that torch.save never writes")
        if pid[5] is not None:
            raise pickle.UnpicklingError("storage views (torch < 0.4 files)")
        used.setdefault(pid[2], pid[1:5])

    InertUnpickler(f, note, names_only=True).load()
    keys = InertUnpickler(f).load()
    if not isinstance(keys, list) or sorted(keys) != sorted(used):
        raise pickle.UnpicklingError("the storage keys do not match the storages the object uses")
    element = {key: torch.empty((), dtype=tag.dtype).element_size() for key, (tag, _, _, _) in used.items()}
    if sum(used[k][3] * element[k] for k in keys) > size:
        raise pickle.UnpicklingError(f"storages of more bytes than the file's {size}")
    storages = {}
    for key in keys:
        tag, _, location, numel = used[key]
        data = bytearray(numel * element[key])
        if struct.unpack("<q", f.read(8))[0] != numel or f.readinto(data) != len(data):
            raise EOFError(f"storage {key[:40]} is truncated or of the wrong size")
        storages[key] = _storage(data, tag, numel, _device(location, map_location))
    f.seek(start)

    def persistent_load(pid: Any) -> Any:
        return pid[1] if pid[0] == "module" else storages[pid[2]]

    return _unpickle(f, persistent_load)


def _trusted(path: Path, map_location: Any) -> Loaded:
    """torch.load(weights_only=False): only ever on the user's word (--trust-pickle), never by default."""
    with open(path, "rb") as f:
        container = "torch zip" if f.read(4) == ZIP_MAGIC else "torch legacy"
    try:
        return Loaded(torch.load(path, map_location=map_location, weights_only=False), container)
    except (AttributeError, ImportError) as e:
        raise CheckpointFormatError(f"{path}: the pickled objects need code that cannot be imported here "
                                    f"({first_line(e, 150)}); run this where that code is importable") from e
    except Exception as e:
        raise CheckpointCorruptError(f"{path} is not a readable checkpoint ({first_line(e, 150)}); "
                                     f"{_DAMAGED}") from e
