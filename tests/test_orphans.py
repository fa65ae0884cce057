"""Orphans stop: workers whose torchrun was SIGKILLed (alone, or with its process group, as a job script or
an OOM killer does) save latest.pt and exit at their next stop check, releasing the run lock, so that the
same command run again continues. torchrun starts each worker in a session of its own: without the check
in ddp.dist.StopSignals they would train on unseen, and a rerun would be refused by the lock.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_launch import STOPPED, TRAIN, free_port, resumed_line

ORPHAN_STOP = re.compile(STOPPED.pattern.replace(r"\(SIGTERM\)", r"\(torchrun is gone\)"))


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def torchrun(tmp_path: Path, *args: str, **popen) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "ddp.train", *TRAIN, *args]


@pytest.mark.parametrize("target", ["torchrun", "its process group"])
def test_workers_of_a_sigkilled_torchrun_save_exit_and_a_rerun_continues(tmp_path, target):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = torchrun(tmp_path, "--epochs", "60", "--timeout-min", "1")
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        agent = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "epoch 1/60" not in (tmp_path / "out.txt").read_text():
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()
            time.sleep(0.1)
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        if target == "torchrun":
            agent.kill()
        else:
            os.killpg(agent.pid, signal.SIGKILL)  # the agent leads its group; its workers have sessions of their own
        agent.wait(timeout=10)
        killed = time.monotonic()
        while any(alive(w) for w in workers) and time.monotonic() - killed < 30:
            time.sleep(0.1)
        out = (tmp_path / "out.txt").read_text()
        assert not any(alive(w) for w in workers), f"orphans still training 30 s after the kill:\n{out}"
    finally:
        for w in children(agent.pid) if alive(agent.pid) else []:
            os.kill(w, signal.SIGKILL)
    stop = ORPHAN_STOP.search(out)
    assert stop and stop["path"] == "checkpoints/latest.pt", out
    assert int(stop["epoch"]) < 60, out

    rerun = subprocess.run([*cmd, "--stop-at-step", str(int(stop["step"]) + 3)], check=False, cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]  # not refused by the lock
    assert resumed_line(stop) in rerun.stdout, rerun.stdout
