"""torch.distributed.checkpoint (DCP) directories, read whole in one plain process.

A DCP directory is `.metadata` (a pickle of DCP's dataclasses) plus `__<rank>_<n>.distcp` files, each a run
of torch.save blobs: one per tensor chunk (a rank's shard, at its offsets in the full tensor) and one per
non-tensor value. DCP's own reader runs pickle.load on `.metadata` and torch.load(weights_only=False) on the
values; here `.metadata` goes through the inert unpickler (its dataclasses come back as StandIns whose
`.state` we read) and every blob through the same torch-file reader as any other file, so nothing in the directory runs.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    first_line,
)
from ddp.checkpoint.readers.loaded import Loaded, open_regular
from ddp.checkpoint.readers.torch_file import read_torch
from ddp.checkpoint.rebuild import RebuildError, ints
from ddp.checkpoint.standins import StandIn, refuse_hostile
from ddp.checkpoint.unpickle import inert_loads

METADATA_NAME = ".metadata"
MAX_CHUNKS = 4096  # chunks of one tensor: one per rank (and per FSDP shard) in practice
_REDO = "copy the whole directory again from where it was saved, or save it again"


def is_dcp_directory(path: str | os.PathLike) -> bool:
    """True if `path` is a directory holding a DCP `.metadata` file."""
    return (Path(path) / METADATA_NAME).is_file()


def claims(path: Path, head: bytes) -> bool:
    return is_dcp_directory(path)


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    obj, names = read_dcp(path, map_location)
    return Loaded(obj, "DCP directory", names)


def _kind(obj: Any) -> str:
    """The class name a StandIn stands for ("TensorStorageMetadata"), or "" for anything else."""
    return obj.name.rsplit(".", 1)[-1] if isinstance(obj, StandIn) else ""


def _fields(obj: Any) -> dict:
    """A pickled dataclass's fields: what BUILD gave its StandIn (the instance's __dict__)."""
    state = getattr(obj, "state", None)
    return state if isinstance(state, dict) else {}


def _read_metadata(directory: Path) -> tuple[dict, list[str]]:
    where = directory / METADATA_NAME
    try:
        with open_regular(where, root=directory) as f:
            data = f.read()
        root, names = inert_loads(data)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointCorruptError(f"cannot read {where}: {first_line(e)}; {_REDO}") from e
    except Exception as e:  # any unpickling failure: truncated, garbage, not a pickle at all
        raise CheckpointCorruptError(f"{where} is not a readable DCP metadata file ({first_line(e)}); the save did "
                                     f"not finish or the file is damaged: {_REDO}") from e
    refuse_hostile(names, str(where))  # before anything of it is used
    meta = _fields(root)
    if _kind(root) != "Metadata" or not isinstance(meta.get("state_dict_metadata"), dict) \
            or not isinstance(meta.get("storage_data"), dict):
        raise CheckpointFormatError(f"{where} holds {type(root).__name__ if _kind(root) == '' else root.name}, not "
                                    "the Metadata that torch.distributed.checkpoint.save writes; is this a DCP checkpoint?")
    return meta, names


def _storage_index(meta: dict, where: Path) -> dict[tuple, dict]:
    """(fqn, chunk offsets or None) -> {relative_path, offset, length}, from Metadata.storage_data."""
    index = {}
    for key, info in meta["storage_data"].items():
        key_f, info_f = _fields(key), _fields(info)
        if _kind(info) != "_StorageInfo" or not {"relative_path", "offset", "length"} <= info_f.keys():
            raise CheckpointFormatError(f"{where}: storage entries of type {_kind(info) or type(info).__name__} are not "
                                        "the .distcp layout of FileSystemWriter, the only one this reader knows")
        if info_f.get("transform_descriptors"):  # e.g. the zstd extension: bytes we cannot decode
            raise CheckpointFormatError(f"{where}: items are stored with transforms {info_f['transform_descriptors']}"
                                        " (compression extensions), which this reader does not decode; save the "
                                        "checkpoint again without _extensions")
        offsets = key_f.get("offset")
        index[(key_f.get("fqn"), None if offsets is None else tuple(offsets))] = info_f
    return index


class _Blobs:
    """The .distcp files of one directory, each read once; `load` reads one item without trusting it."""

    def __init__(self, directory: Path):
        self.directory, self.files, self.names = directory, {}, set()

    def _file(self, rel: Any) -> bytes:
        directory = self.directory
        if not isinstance(rel, str) or not rel or rel in (".", "..") or "/" in rel or "\\" in rel or "\x00" in rel:
            # DCP names its files __<rank>_<n>.distcp: a path would send us reading elsewhere
            raise CheckpointFormatError(f"{directory}/{METADATA_NAME} names a storage file {str(rel)[:60]!r} that is "
                                        "not a plain file name: it points outside the directory; refused")
        if rel not in self.files:
            try:
                with open_regular(directory / rel, root=directory) as f:
                    self.files[rel] = f.read()
            except (CheckpointNotFoundError, OSError) as e:
                if isinstance(e, CheckpointError) and not isinstance(e, CheckpointNotFoundError):
                    raise
                raise CheckpointCorruptError(f"{directory}: cannot read {rel} ({first_line(e)}); the checkpoint is "
                                             f"incomplete: {_REDO}") from e
        return self.files[rel]

    def load(self, info: dict, device: Any = "cpu") -> Any:
        rel, directory = info["relative_path"], self.directory
        whole, start, length = self._file(rel), info["offset"], info["length"]
        if type(start) is not int or type(length) is not int or start < 0 or length <= 0 \
                or start + length > len(whole):
            raise CheckpointCorruptError(f"{directory}: an item of {rel} at offset {start!r}, length {length!r} is "
                                         f"not inside the file's {len(whole)} bytes; {_REDO}")
        obj, names, _ = read_torch(io.BytesIO(whole[start:start + length]), device, f"{directory}/{rel}")
        refuse_hostile(names, f"{directory}/{rel}")
        self.names.update(names)
        return obj


def _boxes_overlap(a: tuple, b: tuple) -> bool:
    (oa, sa), (ob, sb) = a, b
    return all(x < y + m and y < x + n for x, n, y, m in zip(oa, sa, ob, sb, strict=True))


def _tensor(fqn: str, md: dict, items: dict, blobs: _Blobs) -> torch.Tensor:
    """The full tensor, assembled from chunks that tile it exactly: each inside it, none overlapping."""
    where = f"{blobs.directory}/{METADATA_NAME}"
    props = getattr(md["properties"], "state", None)  # TensorProperties pickles as a tuple, dtype first
    dtype = props[0] if isinstance(props, tuple) and props else _fields(md["properties"]).get("dtype")
    if not isinstance(dtype, torch.dtype):
        raise CheckpointFormatError(f"{where}: tensor {fqn} has no dtype; not a DCP layout this reader knows")
    try:
        size = ints(md["size"], "a tensor's size")
        boxes = [(ints(_fields(c)["offsets"], "chunk offsets"), ints(_fields(c)["sizes"], "chunk sizes"))
                 for c in md["chunks"]][:MAX_CHUNKS + 1]
    except (RebuildError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{where}: tensor {fqn} has a size or chunk that is not a list of "
                                    f"non-negative integers ({first_line(e, 80)}); not a DCP checkpoint") from e
    if len(boxes) > MAX_CHUNKS or any(len(o) != len(size) or len(s) != len(size) for o, s in boxes) \
            or any(o + n > d for offsets, sizes in boxes for o, n, d in zip(offsets, sizes, size, strict=True)):
        raise CheckpointFormatError(f"{where}: a chunk of {fqn} lies outside its size {list(size)}; refused")
    if sum(math.prod(s) for _, s in boxes) != math.prod(size) or any(
            _boxes_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if math.prod(a[1]) and math.prod(b[1])):
        raise CheckpointCorruptError(f"{where}: the chunks of {fqn} do not tile its {math.prod(size)} elements "
                                     f"(some overlap, or some rank's part was not saved): {_REDO}")
    parts = []
    for offsets, sizes in boxes:
        if (fqn, offsets) not in items:
            raise CheckpointCorruptError(f"{where} lists a chunk of {fqn} at {list(offsets)} but no file holds it; "
                                         f"{_REDO}")
        part = blobs.load(items[(fqn, offsets)])
        if not isinstance(part, torch.Tensor) or tuple(part.shape) != sizes or part.dtype != dtype:
            raise CheckpointCorruptError(f"{blobs.directory}: the chunk of {fqn} at {list(offsets)} should be a "
                                         f"{dtype} tensor of shape {list(sizes)}, found "
                                         f"{getattr(part, 'shape', type(part).__name__)}; {_REDO}")
        parts.append(part)
    # every element is in exactly one part, and every part's bytes are in the files: the file pays for this
    full = torch.empty(size, dtype=dtype)
    for (offsets, sizes), part in zip(boxes, parts, strict=True):
        full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] = part
    return full


def _set(root: dict, path: tuple, value: Any, limit: int, where: Path) -> None:
    """Put `value` at `path` (str keys: dicts, int keys: lists), as DCP's unflattening does."""
    node: Any = root
    for key, after in zip(path, [*path[1:], None], strict=True):
        if not isinstance(node, (dict, list)) or isinstance(key, int) != isinstance(node, list) \
                or not isinstance(key, (str, int)) or (isinstance(key, int) and not 0 <= key < limit):
            raise CheckpointFormatError(f"{where}: key path {path!r} in planner_data does not fit the others; not "
                                        "a DCP layout this reader knows")
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
        if after is None:
            node[key] = value
        elif (node[key] if isinstance(node, list) else node.get(key)) is None:
            node[key] = [] if isinstance(after, int) else {}
        node = node[key]


def _optimizer_keys(node: Any) -> None:
    """Optimizer.state_dict()["state"] is keyed by the ints of param_groups' params; DCP str()s every dict key."""
    if isinstance(node, dict):
        groups = node.get("param_groups") if isinstance(node.get("param_groups"), list) else []
        params = {p for g in groups if isinstance(g, dict) for p in g.get("params") or ()}
        if params and all(type(p) is int for p in params) and isinstance(node.get("state"), dict):
            node["state"] = {int(k) if isinstance(k, str) and k.isdigit() and int(k) in params else k: v
                             for k, v in node["state"].items()}
    for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
        _optimizer_keys(child)


def read_dcp(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict, list[str]]:
    """The whole DCP checkpoint at `path`, nested as it was saved, tensors whole: (state, stand-in names)."""
    directory = Path(path)
    meta, names = _read_metadata(directory)
    where = directory / METADATA_NAME
    mapping = meta.get("planner_data") if isinstance(meta.get("planner_data"), dict) else {}
    blobs = _Blobs(directory)
    entries = meta["state_dict_metadata"]
    state: dict = {}
    try:
        items = _storage_index(meta, where)
        for fqn, md in entries.items():
            if _kind(md) == "TensorStorageMetadata":
                value = _tensor(fqn, _fields(md), items, blobs).to(map_location)
            elif _kind(md) == "BytesStorageMetadata" and (fqn, None) in items:
                value = blobs.load(items[(fqn, None)], map_location)
            else:
                raise CheckpointFormatError(f"{where}: entry {fqn} is {_kind(md) or type(md).__name__} with no "
                                            "stored data; not a DCP layout this reader knows")
            _set(state, tuple(mapping.get(fqn) or (fqn,)), value, len(entries), where)
    except CheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a field missing or of the wrong type
        raise CheckpointFormatError(f"{where} is not laid out as DCP's Metadata ({first_line(e)}); was it written "
                                    "by torch.distributed.checkpoint.save?") from e
    _optimizer_keys(state)  # the parameter indices as they were saved: load_state_dict ignores "0"
    # DCP's own metadata classes always stand in: list only what the values (or odd metadata) named
    return state, sorted(blobs.names | {n for n in names if not n.startswith("torch.distributed.checkpoint.")})
