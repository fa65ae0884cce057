"""One reader behind every entry point: recognise a checkpoint by its content, read it without trusting it.

    torch zip      torch.save since 1.6 (ours, Lightning .ckpt, timm, pytorch/examples): "PK\\x03\\x04"
    torch legacy   torch.save before 1.6: a pickle that starts with torch's magic number
    safetensors    8-byte header length, then a JSON header
    sharded        a *.safetensors.index.json or *.bin.index.json (Hugging Face) naming shard files
    DCP directory  torch.distributed.checkpoint (FSDP2, torchtitan, dcp.save): a directory with .metadata

Pickled files go through torch's weights-only loader with a scoped allowlist, then, for classes beyond
it, through the inert unpickler (`unpickle.py`); nothing from a file ever runs unless trust_pickle.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, first_line
from ddp.checkpoint.files import LATEST_NAME, load_checkpoint
from ddp.checkpoint.unpickle import inert_load_zip, refuse_hostile, safe_globals

ZIP_MAGIC = b"PK\x03\x04"
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


@dataclass
class Loaded:
    """What a checkpoint holds, as read: the object, how it was recognised, what stood in for foreign classes."""

    obj: Any  # normally a dict; an nn.Module only with trust_pickle
    container: str  # "torch zip", "torch legacy", "safetensors", "sharded safetensors", "DCP directory", ...
    stand_ins: list[str] = field(default_factory=list)  # classes the pickle names that were never imported
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors' string metadata


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, trust_pickle: bool = False) -> Loaded:
    """Read any checkpoint file or directory we recognise onto `map_location`, in a plain process."""
    path = Path(path)
    if path.is_dir():
        return _read_directory(path, map_location)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.endswith(INDEX_SUFFIXES):
        return _read_sharded(path, map_location)
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(path, head):
        return _read_safetensors(path, map_location)
    container = "torch zip" if head.startswith(ZIP_MAGIC) else "torch legacy"
    if trust_pickle:
        return Loaded(load_checkpoint(path, map_location, trust_pickle=True), container)
    try:
        with safe_globals():  # argparse.Namespace, numpy scalars etc. load as themselves
            return Loaded(load_checkpoint(path, map_location), container)
    except CheckpointError as e:
        # the bytes are sound (CRCs checked) but name classes beyond the allowlist: read them inertly
        if container != "torch zip" or not isinstance(e.__cause__, pickle.UnpicklingError):
            raise
        with open(path, "rb") as f:
            try:
                obj, names = inert_load_zip(f, map_location)
            except Exception:  # noqa: BLE001 -- not even inertly readable: torch's own verdict stands
                raise e from None
    refuse_hostile(names, str(path))
    return Loaded(obj, container, names)


def _is_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_len <= path.stat().st_size


def _read_safetensors(path: Path, map_location: Any) -> Loaded:
    from safetensors import SafetensorError, safe_open

    device = str(torch.device(map_location)) if map_location is not None else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a Mapping
            return Loaded(state, "safetensors", metadata=dict(f.metadata() or {}))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointCorruptError(f"{path} is a damaged safetensors file ({first_line(e, 120)}); delete it "
                                     "or pick another file") from e


def _read_sharded(index: Path, map_location: Any) -> Loaded:
    """Hugging Face's sharded layout: an index whose weight_map names the shard of every tensor."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{index} is not a shard index (expected JSON with a 'weight_map'): "
                                     f"{first_line(e, 120)}") from e
    root, state, names = index.parent.resolve(), {}, []
    for shard in sorted(set(weight_map.values())):
        file = (root / shard).resolve()
        if file.parent != root:  # an index must not send us reading elsewhere (../../etc/passwd)
            raise CheckpointFormatError(f"{index} names a shard outside its directory: {shard!r}; refused")
        if not file.is_file():
            raise CheckpointCorruptError(f"{index} names {shard}, which is missing; copy every shard beside it")
        part = read_checkpoint(file, map_location)
        if not all(isinstance(v, torch.Tensor) for v in part.obj.values()):
            raise CheckpointFormatError(f"shard {file} is not a flat dict of tensors")
        state.update(part.obj)
        names += part.stand_ins
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointCorruptError(f"{index}: {len(missing)} tensors of the index are in no shard "
                                     f"({', '.join(missing[:3])}, ...); the shards do not match the index")
    kind = "sharded safetensors" if index.name.endswith(".safetensors.index.json") else "sharded torch .bin"
    return Loaded(state, kind, sorted(set(names)))


def _read_directory(path: Path, map_location: Any) -> Loaded:
    from ddp.checkpoint.dcp import is_dcp_directory, read_dcp

    if is_dcp_directory(path):
        obj, names = read_dcp(path, map_location)
        return Loaded(obj, "DCP directory", names)
    indexes = [p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIXES)]
    singles = list(path.glob("*.safetensors"))
    if len(indexes) == 1:
        return _read_sharded(indexes[0], map_location)
    if not indexes and len(singles) == 1:
        return _read_safetensors(singles[0], map_location)
    raise IsADirectoryError(f"{path} is a directory but not a DCP checkpoint (no .metadata) nor a model directory "
                            f"with one *.safetensors or shard index; pass a checkpoint file (e.g. {path / LATEST_NAME})")

