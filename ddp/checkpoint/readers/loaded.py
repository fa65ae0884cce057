"""What every reader returns, and what they share."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ddp.checkpoint.errors import CheckpointFormatError, CheckpointNotFoundError

HEAD_SIZE = 64  # the bytes every reader may look at to recognise a file
MAX_TENSORS = 200_000  # in one file or weight set: more than any model has, and key alignment is quadratic


@dataclass
class Loaded:
    """What a checkpoint holds, as read: the object, how it was recognised, what stood in for foreign classes."""

    obj: Any  # normally a dict; an nn.Module only with trust_pickle
    container: str  # "torch zip", "torch legacy", "safetensors", "sharded safetensors", "DCP directory", ...
    stand_ins: list[str] = field(default_factory=list)  # classes the pickle names that were never imported
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors' string metadata


def not_recognised(path: Path) -> CheckpointFormatError:
    if path.is_dir():
        return CheckpointFormatError(f"{path} is a directory but not a DCP checkpoint (no .metadata) nor a model "
                                 f"directory with one *.safetensors or shard index; pass a checkpoint file (e.g. "
                                 f"{path / 'latest.pt'})")
    return CheckpointFormatError(f"{path} is not a checkpoint file this reader recognises; pass a torch, "
                                 "safetensors or DCP checkpoint (python -m ddp.checkpoint inspect --help lists them)")


def open_regular(path: Path, root: Path | None = None) -> BinaryIO:
    """Open a file to read, refusing what is not a regular file (a FIFO would block us, a device never ends)
    and, with `root`, anything whose real path lies outside that directory (a symlink out of it)."""
    if root is not None and path.resolve().parent != root.resolve():
        raise CheckpointFormatError(f"{path} leads outside {root} (a symlink?); refused: copy the file itself there")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO for reading would wait for a writer
    except OSError as e:
        raise CheckpointNotFoundError(f"checkpoint not found: {path}") if e.errno == errno.ENOENT else e from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointFormatError(f"{path} is not a regular file (a FIFO, device or socket); pass a checkpoint file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
