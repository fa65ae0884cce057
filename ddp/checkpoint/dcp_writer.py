"""Writing a torch.distributed.checkpoint (DCP) directory from one process, atomically."""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from pathlib import Path

from ddp.checkpoint.errors import CheckpointWriteError, first_line


def write_dcp(state: dict, directory: str | os.PathLike) -> None:
    """dcp.save `state` (nested dicts of tensors and plain values) from this one process, atomically.

    Written into a hidden sibling and renamed into place: a failed write leaves nothing under `directory`.
    """
    import torch.distributed.checkpoint as dcp  # here: importing it costs every entry point ~0.6 s
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointWriteError(f"{directory} already exists and is not an empty directory; DCP writes a "
                                   "directory of its own: pass a new path, or remove the old one first")
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # dot: never a checkpoint
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # "assuming ... a single process": that is the point
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            # no_dist: no collectives even where a process group exists, as only the caller's rank writes
            dcp.save(state, checkpoint_id=tmp, no_dist=True)
        os.rename(tmp, directory)  # replaces an empty directory; fails rather than touch a filled one
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # DCP wraps every failure in CheckpointException, a BaseException: name the real one inside it
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        if not isinstance(cause, Exception):  # Ctrl-C etc.: clean up but don't disguise it
            raise
        hint = "check free space and write permissions" if isinstance(cause, OSError) else \
            "keep the state to tensors and plain Python values"
        raise CheckpointWriteError(f"could not write DCP checkpoint {directory}: {first_line(cause)}; {hint} "
                                   "(nothing was left under that name)") from e
    fd = os.open(directory.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
