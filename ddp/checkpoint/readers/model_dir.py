"""A model directory (Hugging Face style): one shard index, or one *.safetensors file, inside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp.checkpoint.readers import safetensors_file, sharded
from ddp.checkpoint.readers.loaded import Loaded, open_regular


def _model_file(path: Path) -> Path | None:
    indexes = [p for p in path.iterdir() if p.name.endswith(sharded.INDEX_SUFFIXES)]
    singles = [p for p in path.iterdir() if p.name.endswith(".safetensors")]
    if len(indexes) == 1:
        return indexes[0]
    return singles[0] if not indexes and len(singles) == 1 else None


def claims(path: Path, head: bytes) -> bool:
    return _model_file(path) is not None


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    file = _model_file(path)
    if file.name.endswith(sharded.INDEX_SUFFIXES):
        return sharded.read(file, map_location, root=path)
    open_regular(file, root=path).close()  # a symlink out of the directory, or a FIFO, is refused
    return safetensors_file.read(file, map_location)
