"""Hugging Face's sharded layout: an index (*.safetensors.index.json, *.bin.index.json) naming the shard of every tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import CheckpointCorruptError, CheckpointFormatError, first_line
from ddp.checkpoint.readers.loaded import Loaded

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def claims(path: Path, head: bytes) -> bool:
    return path.name.endswith(INDEX_SUFFIXES)


def read(index: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    from ddp.checkpoint.readers import read_checkpoint  # a shard is any file the dispatcher reads

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
