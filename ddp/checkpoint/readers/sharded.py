"""Hugging Face's sharded layout: an index (*.safetensors.index.json, *.bin.index.json) naming the shard of every tensor."""

from __future__ import annotations

import json
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
from ddp.checkpoint.readers import safetensors_file, torch_file
from ddp.checkpoint.readers.loaded import HEAD_SIZE, MAX_TENSORS, Loaded, open_regular

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
MAX_INDEX_BYTES = 64 << 20  # an index is a map of names: real ones are a few MB at most


def claims(path: Path, head: bytes) -> bool:
    return path.name.endswith(INDEX_SUFFIXES)


def _weight_map(index: Path, root: Path | None) -> dict[str, str]:
    with open_regular(index, root) as f:
        text = f.read(MAX_INDEX_BYTES + 1)
    if len(text) > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{index} is larger than any shard index ({MAX_INDEX_BYTES >> 20} MB); refused")
    try:
        weight_map = json.loads(text)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointCorruptError(f"{index} is not a shard index (expected JSON with a 'weight_map'): "
                                     f"{first_line(e, 120)}") from None
    if not isinstance(weight_map, dict) or len(weight_map) > MAX_TENSORS \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointFormatError(f"{index}: its weight_map is not a map of tensor names to shard file names")
    return weight_map


def _shard(root: Path, name: str, index: Path) -> Path:
    """A shard is a plain file name beside its index: never a path elsewhere, never another index."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise CheckpointFormatError(f"{index} names a shard outside its directory: {name[:60]!r}; refused")
    if name.endswith(INDEX_SUFFIXES):
        raise CheckpointFormatError(f"{index} names another index as a shard ({name[:60]!r}); refused")
    return root / name


def read(index: Path, map_location: Any, *, trust_pickle: bool = False, root: Path | None = None) -> Loaded:
    weight_map = _weight_map(index, root)
    root = index.parent
    state, names, seen = {}, [], set()
    for name in sorted(set(weight_map.values())):
        file = _shard(root, name, index)
        try:
            with open_regular(file, root) as f:  # a symlink out of the directory is refused here
                head, real = f.read(HEAD_SIZE), file.resolve()
        except (CheckpointNotFoundError, OSError) as e:
            if isinstance(e, CheckpointError) and not isinstance(e, CheckpointNotFoundError):
                raise
            raise CheckpointCorruptError(f"{index} names {name[:60]}, which cannot be read ({first_line(e, 60)}); "
                                         "copy every shard beside it") from None
        if real in seen:  # two names for one file (a hard or soft link): read it once
            continue
        seen.add(real)
        reader = safetensors_file if safetensors_file.claims(file, head) else torch_file
        part = reader.read(file, map_location)
        if not isinstance(part.obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in part.obj.items()):
            raise CheckpointFormatError(f"shard {file} is not a flat dict of tensors")
        state.update(part.obj)
        names += part.stand_ins
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointCorruptError(f"{index}: {len(missing)} tensors of the index are in no shard "
                                     f"({', '.join(missing[:3])}, ...); the shards do not match the index")
    kind = "sharded safetensors" if index.name.endswith(".safetensors.index.json") else "sharded torch .bin"
    return Loaded(state, kind, sorted(set(names)))
