"""A model directory (Hugging Face style): one shard index, or one *.safetensors file, inside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp.checkpoint.readers import safetensors_file, sharded
from ddp.checkpoint.readers.loaded import Loaded


def _model_file(path: Path) -> Path | None:
    indexes = [p for p in path.iterdir() if p.name.endswith(sharded.INDEX_SUFFIXES)]
    singles = list(path.glob("*.safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    return singles[0] if not indexes and len(singles) == 1 else None


def claims(path: Path, head: bytes) -> bool:
    return _model_file(path) is not None


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    file = _model_file(path)
    reader = sharded if file.name.endswith(sharded.INDEX_SUFFIXES) else safetensors_file
    return reader.read(file, map_location)
