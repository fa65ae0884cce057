"""One run per checkpoint directory: a second run is refused at once, on every rank, having read nothing.

Real processes hold the lock (flock is per open file, so only another process shows the refusal a second
job would see); the end-to-end test uses the real trainer, under python and under torchrun.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_module
from ddp.checkpoint import LOCK_NAME, CheckpointLockedError, CheckpointWriteError, hold_run_lock
from ddp.checkpoint.lock import describe_holder

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SMALL = ["--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "128",
         "--log-every", "2", "--keep", "0", "--checkpoint-dir", "ckpt"]
HOLD = ("import sys, time; from ddp.checkpoint import hold_run_lock\n"
        "with hold_run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")


def hold_in_another_process(directory: Path, **env: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], env={**ENV, **env},
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def refusal(directory: Path, pid: int) -> str:
    """The start of the message a second run gets while `pid` on this host holds the lock."""
    return (f"another run is using {directory}/ ({directory}/{LOCK_NAME} is held by pid {pid} on "
            f"{socket.gethostname()} since ")


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_second_process_is_refused_with_the_holders_name_until_the_holder_is_killed(tmp_path):
    folder = tmp_path / "ckpt"
    holder = hold_in_another_process(folder, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(CheckpointLockedError) as refused, hold_run_lock(folder):
            pass
        message = str(refused.value)
        assert message.startswith(refusal(folder, holder.pid)) and "\n" not in message
        assert re.search(r" since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d, SLURM job 4242\): wait for it to "
                         r"finish, stop it, or pass another --checkpoint-dir$", message)
    finally:
        holder.kill()  # SIGKILL: no Python cleanup runs, the kernel alone releases the lock
        holder.wait()
    with hold_run_lock(folder) as lock:
        assert lock.locked and f'"pid": {os.getpid()}' in lock.path.read_text()
    assert lock.path.read_text() == ""  # a clean exit leaves a file that names nobody, and leaves it there


def test_stale_temp_files_are_removed_and_everything_else_is_kept(tmp_path):
    stale = [".latest.pt.123.deadbeef.tmp", ".epoch_0003.pt.9.0123abcd.tmp", ".best.pt.7.00000000.tmp"]
    kept = ["latest.pt", "epoch_0003.pt", ".gitignore", ".notes.tmp", "latest.pt.1.deadbeef.tmp",
            ".latest.pt.123.DEADBEEF.tmp", ".latest.pt.x.deadbeef.tmp", ".latest.pt.1.deadbeef.tmp.bak"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / ".dir.1.deadbeef.tmp").mkdir()  # not a file: not ours
    with hold_run_lock(tmp_path) as lock:
        assert sorted(lock.removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".dir.1.deadbeef.tmp", LOCK_NAME])
    assert all((tmp_path / name).read_bytes() == name.encode() for name in kept)


def test_a_file_where_the_directory_should_be_is_one_line(tmp_path):
    (tmp_path / "ckpt").write_text("not a directory")
    with pytest.raises(CheckpointWriteError, match=r"^cannot create .*/ckpt/\.lock: \[Errno 17\] File exists: .*ckpt'; "
                       r"move the file in the way, or pass another --checkpoint-dir$"), hold_run_lock(tmp_path / "ckpt"):
        pass


def test_a_holder_that_has_not_written_its_name_yet_is_still_described():
    assert describe_holder("") == describe_holder("{not json") == describe_holder('{"pid": 1}') == (
        "a run that has not written its name yet")
    assert describe_holder('{"host": "n1", "pid": 7, "since": "S", "torchelastic_run_id": "r"}') == (
        "pid 7 on n1 since S, torchrun run r")


def test_a_second_training_run_on_the_same_directory_stops_at_once_on_every_rank(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "ddp.train", *SMALL, "--epochs", "1000"], cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # a checkpoint exists once the first epoch is logged
            if line.startswith("epoch 1/1000"):
                break
        deadline = time.monotonic() + 30  # the epoch's save is written in the background: let it land
        while time.monotonic() < deadline and not ((tmp_path / "ckpt" / "latest.pt").exists()
                                                   and not list((tmp_path / "ckpt").glob(".*.tmp"))):
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # still holds the lock; now its files stay as they are
        (tmp_path / "ckpt" / ".latest.pt.1.0badc0de.tmp").write_bytes(b"as if a writer had been killed")
        before = files(tmp_path / "ckpt")

        t0 = time.monotonic()
        second = run_module(["ddp.train", *SMALL, "--epochs", "1000"], cwd=tmp_path, timeout=60)
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stdout.startswith(f"error: {refusal(Path('ckpt'), first.pid)}")
        assert second.stdout.count("\n") == 1 and "Traceback" not in second.stderr  # nothing read, nothing logged
        both = run_module(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "ddp.train", *SMALL, "--epochs",
                           "1000"], cwd=tmp_path, timeout=60)
        elapsed = time.monotonic() - t0
        assert both.returncode != 0
        assert f"error: {refusal(Path('ckpt'), first.pid)}" in both.stdout
        assert "[rank 1] error: another rank failed (its error is in the log); stopping too" in both.stderr
        reader = run_module(["ddp.checkpoint", "inspect", "ckpt/latest.pt"], cwd=tmp_path, timeout=60)
        assert reader.returncode == 0 and "ddp-cifar/1" in reader.stdout, reader.stderr  # readers never lock
        assert files(tmp_path / "ckpt") == before  # byte for byte, the first run's temp files included
        assert elapsed < 40  # a refusal, not a wait: nothing but starting Python and torch takes time
    finally:
        first.kill()  # SIGKILL, as a scheduler would: the next run must find the lock free
        first.wait()
    third = run_module(["ddp.train", *SMALL, "--epochs", "1"], cwd=tmp_path, timeout=60)
    assert third.returncode == 0, third.stdout + third.stderr
    assert re.search(r"removed \d stale temporary file\(s\) from ckpt/: .*\.latest\.pt\.1\.0badc0de\.tmp", third.stdout)
    assert "resumed from ckpt/latest.pt" in third.stdout
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]
