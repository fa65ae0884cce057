"""One run per checkpoint directory: global rank 0 holds flock(DIR/.lock) for as long as it trains.

A flock belongs to the open file, so the kernel drops it when the process dies, however it dies: a
torchrun restart, a SIGKILLed job or a SLURM requeue never finds a stale lock. The file is never
unlinked (a second run would then lock a new file of the same name while the first holds the old
one); it only names its holder, for the message of the run that is refused. Readers never take it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ddp.checkpoint.errors import CheckpointError, CheckpointLockedError, CheckpointWriteError, first_line

LOCK_NAME = ".lock"
NO_LOCK_ENV = "DDP_CIFAR_NO_LOCK"  # =1: where the file system cannot flock at all, run without the lock
JOB_IDS = {"SLURM_JOB_ID": ("slurm_job_id", "SLURM job"), "TORCHELASTIC_RUN_ID": ("torchelastic_run_id", "torchrun run")}
TEMP_FILE = re.compile(r"^\.(.+)\.(\d+)\.([0-9a-f]{8})\.tmp$")  # files.atomic_write's temp names


@dataclass(frozen=True)
class RunLock:
    path: Path  # DIR/.lock
    locked: bool  # False only where flock failed and NO_LOCK_ENV=1 said to go on without it
    removed: tuple[str, ...] = ()  # temp files that killed writers had left behind, now deleted


def holder_record() -> dict[str, str | int]:
    """What the lock file says about its holder: host, pid, since when, and the job's ids where set."""
    record: dict[str, str | int] = {"host": socket.gethostname(), "pid": os.getpid(),
                                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    for env, (key, _) in JOB_IDS.items():
        if os.environ.get(env, "none") not in ("", "none"):  # torchrun's default run id is "none"
            record[key] = os.environ[env]
    return record


def describe_holder(text: str) -> str:
    """The holder as a refusal names it, from the lock file's text."""
    try:
        holder = json.loads(text)
        words = f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (ValueError, TypeError, KeyError):  # the holder is between flock and its write, or exiting
        return "a run that has not written its name yet"
    extra = [f"{what} {holder[key]}" for key, what in JOB_IDS.values() if holder.get(key)]
    return ", ".join([words, *extra])


def stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """atomic_write's temp files in `directory`: with the lock held, only killed writers leave them."""
    return sorted(p for p in Path(directory).iterdir() if TEMP_FILE.match(p.name) and p.is_file())


def _lock(fd: int, directory: Path, path: Path) -> bool:
    """flock; True if held, False if the file system cannot flock and NO_LOCK_ENV allows going on."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:  # EWOULDBLOCK: another open file holds it
        holder = describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        raise CheckpointLockedError(f"another run is using {directory}/ ({path} is held by {holder}): wait for it "
                                    "to finish, stop it, or pass another --checkpoint-dir") from None
    except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: NFS without lockd, Lustre without -o flock
        if os.environ.get(NO_LOCK_ENV) == "1":
            return False
        raise CheckpointError(f"cannot lock {directory}/: flock({path}) failed ({first_line(e)}), so a second run "
                              f"could write there too; use a directory on a local file system or on one mounted "
                              f"with flock support, or set {NO_LOCK_ENV}=1 to run without the lock") from e


@contextlib.contextmanager
def hold_run_lock(directory: str | os.PathLike) -> Iterator[RunLock]:
    """Hold `directory`'s lock (CheckpointLockedError naming the holder if taken), then remove stale temp files."""
    directory = Path(directory)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # writable: NFS emulates flock with write locks
    except OSError as e:
        in_the_way = isinstance(e, (FileExistsError, NotADirectoryError))  # a file has a directory's name
        hint = "move the file in the way" if in_the_way else "check write permissions"
        raise CheckpointWriteError(f"cannot create {path}: {first_line(e)}; {hint}, or pass another --checkpoint-dir") from e
    try:
        locked = _lock(fd, directory, path)
        removed = []
        if locked:
            os.ftruncate(fd, 0)  # the same file, rewritten: see the module docstring
            os.pwrite(fd, (json.dumps(holder_record()) + "\n").encode(), 0)
            for stale in stale_temp_files(directory):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
                    removed.append(stale.name)
        try:
            yield RunLock(path, locked, tuple(removed))
        finally:
            if locked:
                with contextlib.suppress(OSError):  # never hide the error that ends the run
                    os.ftruncate(fd, 0)  # a clean exit leaves a file that names nobody
    finally:
        os.close(fd)  # releases the flock
