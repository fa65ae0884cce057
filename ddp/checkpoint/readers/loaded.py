"""What every reader returns, and what they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddp.checkpoint.errors import CheckpointFormatError

HEAD_SIZE = 64  # the bytes every reader may look at to recognise a file


@dataclass
class Loaded:
    """What a checkpoint holds, as read: the object, how it was recognised, what stood in for foreign classes."""

    obj: Any  # normally a dict; an nn.Module only with trust_pickle
    container: str  # "torch zip", "torch legacy", "safetensors", "sharded safetensors", "DCP directory", ...
    stand_ins: list[str] = field(default_factory=list)  # classes the pickle names that were never imported
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors' string metadata


def not_recognised(path: Path) -> Exception:
    if path.is_dir():
        return IsADirectoryError(f"{path} is a directory but not a DCP checkpoint (no .metadata) nor a model "
                                 f"directory with one *.safetensors or shard index; pass a checkpoint file (e.g. "
                                 f"{path / 'latest.pt'})")
    return CheckpointFormatError(f"{path} is not a checkpoint file this reader recognises; pass a torch, "
                                 "safetensors or DCP checkpoint (python -m ddp.checkpoint inspect --help lists them)")
