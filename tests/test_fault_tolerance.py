"""Jobs get killed, preempted and restarted; files get truncated. Training must survive with nothing lost.

Every run here is the real trainer under the real torchrun (2 processes, gloo). The reference is one
uninterrupted 6-epoch run; each interrupted run must end with bitwise the same weights.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_module
from ddp import checkpoint
from ddp.dist import Context
from ddp.resume import find_resume_checkpoint
from ddp.train import PREEMPTED_EXIT_CODE

# 896 images / 128 per step = 7 steps per epoch, so a stop check every 10 steps lands mid-epoch.
FLAGS = ["--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "896", "--batch-size", "128", "--epochs", "6",
         "--log-every", "7", "--keep", "0"]
TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "ddp.train", *FLAGS]


def train(cwd: Path, *extra: str, torchrun: list[str] = TORCHRUN) -> subprocess.CompletedProcess:
    result = run_module([*torchrun, *extra], cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def assert_bitwise_equal(a: Path, b: Path) -> None:
    """Same weights, buffers, optimizer momentum, schedule position and progress."""
    x, y = (torch.load(f, weights_only=True, map_location="cpu") for f in (a, b))  # cuda ones too
    assert x["progress"] == y["progress"]
    assert list(x["model"]) == list(y["model"])
    for key in x["model"]:
        assert torch.equal(x["model"][key], y["model"][key]), key
    for index, state in x["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], y["optimizer"]["state"][index]["momentum_buffer"])
    assert x["scheduler"] == y["scheduler"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("reference")
    train(cwd)
    return cwd / "checkpoints"


def worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of the workers a torchrun agent started (read from their environment)."""
    pids = {}
    for child in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next(int(v[5:]) for v in environ if v.startswith(b"RANK="))
        pids[rank] = int(child)
    return pids


def start(cwd: Path, *extra: str, torchrun_flags: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *torchrun_flags,
           "-m", "ddp.train", *FLAGS, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=open(cwd / "stderr.txt", "w"),
                            text=True)


def wait_for_line(process: subprocess.Popen, pattern: str) -> str:
    """Read the job's stdout until a line matches; return everything read."""
    seen = ""
    for line in process.stdout:
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"job ended before printing {pattern!r}:\n{seen}")


# --------------------------------------------------------------------------- exact resume

def test_resume_after_an_epoch_is_bitwise_exact(reference, tmp_path):
    shutil.copy(reference / "epoch_0002.pt", tmp_path / "after_epoch_2.pt")
    result = train(tmp_path, "--resume", "after_epoch_2.pt")
    assert "resumed from after_epoch_2.pt: epoch 2, step 14" in result.stdout
    assert_bitwise_equal(tmp_path / "checkpoints" / "latest.pt", reference / "latest.pt")


def test_resume_mid_epoch_is_bitwise_exact(reference, tmp_path):
    stopped = train(tmp_path, "--stop-at-step", "11")
    assert "stopping at epoch 1 + 4 batches, step 11 (--stop-at-step)" in stopped.stdout
    assert torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["progress"] == {
        "epoch": 1, "step": 11, "batch_in_epoch": 4}
    resumed = train(tmp_path)
    assert "resumed from checkpoints/latest.pt: epoch 1 + 4 batches, step 11" in resumed.stdout
    assert_bitwise_equal(tmp_path / "checkpoints" / "latest.pt", reference / "latest.pt")


def test_fractional_last_epoch_ends_early_and_resumes_bitwise_inside_it(tmp_path):
    # 7 steps an epoch: --epochs 2.5 is ceil(17.5) = 18 steps, the third epoch stopping after 4 batches.
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir(), interrupted.mkdir()
    done = train(whole, "--epochs", "2.5")
    assert "7 steps/epoch, 18 in all" in done.stdout and "epoch 3/3" in done.stdout and "epoch 4/" not in done.stdout
    final = torch.load(whole / "checkpoints" / "latest.pt", weights_only=True)
    assert final["progress"] == {"epoch": 3, "step": 18, "batch_in_epoch": 0}
    assert final["config"]["epochs"] == 2.5 and final["scheduler"]["last_epoch"] == 18
    assert sorted(p.name for p in (whole / "checkpoints").glob("epoch_*.pt")) == [
        "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]

    stopped = train(interrupted, "--epochs", "2.5", "--stop-at-step", "16")
    assert "stopping at epoch 2 + 2 batches, step 16" in stopped.stdout
    resumed = train(interrupted, "--epochs", "2.5")
    assert "resumed from checkpoints/latest.pt: epoch 2 + 2 batches, step 16" in resumed.stdout
    assert_bitwise_equal(interrupted / "checkpoints" / "latest.pt", whole / "checkpoints" / "latest.pt")


# --------------------------------------------------------------------------- killed, restarted, preempted

def test_elastic_restart_after_a_worker_is_killed(reference, tmp_path):
    job = start(tmp_path, "--save-every-steps", "2", torchrun_flags=("--max-restarts=3",))
    latest = tmp_path / "checkpoints" / "latest.pt"
    while not latest.exists():  # a mid-epoch checkpoint exists: now kill rank 1 in the middle of training
        assert job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.01)
    os.kill(worker_pids(job)[1], signal.SIGKILL)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out + (tmp_path / "stderr.txt").read_text()[-4000:]
    assert "resumed from checkpoints/latest.pt" in out  # the restarted group picked up where it was
    assert "epoch 6/6" in out
    assert_bitwise_equal(latest, reference / "latest.pt")


def test_sigusr1_to_one_rank_saves_and_every_rank_exits_with_the_preemption_code(reference, tmp_path):
    job = start(tmp_path)
    wait_for_line(job, r"epoch 1/6")
    os.kill(worker_pids(job)[1], signal.SIGUSR1)  # rank 1 only: the ranks must agree to stop together
    out = job.communicate(timeout=120)[0]
    stderr = (tmp_path / "stderr.txt").read_text()
    assert job.returncode != 0
    assert re.search(r"stopping at epoch \d( \+ \d batches)?, step \d+ \(SIGUSR1\): saved checkpoints/latest.pt", out)
    exit_codes = re.findall(r"exitcode\s+: (-?\d+)", stderr)  # torchrun's report of its workers
    assert exit_codes and set(exit_codes) == {str(PREEMPTED_EXIT_CODE)}
    assert "ddp/" not in stderr  # torchrun prints its own traceback; the workers print none
    progress = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["progress"]
    assert 0 < progress["step"] < 42


def test_sigterm_to_the_torchrun_agent_saves_and_the_rerun_finishes_exactly(reference, tmp_path):
    job = start(tmp_path)
    wait_for_line(job, r"epoch 1/6")
    job.send_signal(signal.SIGTERM)  # as SLURM or a cluster manager would: torchrun passes it to the workers
    out = job.communicate(timeout=120)[0]
    assert job.returncode != 0
    assert re.search(r"stopping at .*\(SIGTERM\): saved checkpoints/latest.pt", out)
    resumed = train(tmp_path)
    assert "resumed from checkpoints/latest.pt" in resumed.stdout
    assert_bitwise_equal(tmp_path / "checkpoints" / "latest.pt", reference / "latest.pt")


# --------------------------------------------------------------------------- damaged and hostile files

def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "bit-flip":  # still a valid zip and a valid pickle: only the CRC32 check can tell
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))


@pytest.mark.parametrize("how", ["truncated", "zero-byte", "garbage", "bit-flip"])
def test_damaged_latest_falls_back_to_the_newest_valid_checkpoint(reference, tmp_path, how, capsys):
    folder = tmp_path / "checkpoints"
    shutil.copytree(reference, folder)
    damage(folder / "latest.pt", how)
    args = type("Args", (), {"resume": "auto", "checkpoint_dir": str(folder)})
    path, ckpt = find_resume_checkpoint(args, Context(0, 0, 1, torch.device("cpu"), "gloo"))
    assert path.name == "epoch_0006.pt" and ckpt["progress"]["epoch"] == 6
    assert re.search(r"warning: skipping unreadable checkpoint: .*latest.pt", capsys.readouterr().out)


def test_trainer_falls_back_past_a_damaged_file_and_refuses_when_all_are_damaged(reference, tmp_path):
    shutil.copy(reference / "epoch_0004.pt", tmp_path / "good.pt")
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(reference / "epoch_0003.pt", tmp_path / "checkpoints" / "epoch_0003.pt")
    shutil.copy(reference / "epoch_0004.pt", tmp_path / "checkpoints" / "latest.pt")
    damage(tmp_path / "checkpoints" / "latest.pt", "truncated")
    result = train(tmp_path)
    assert "warning: skipping unreadable checkpoint: checkpoints/latest.pt" in result.stdout
    assert "resumed from checkpoints/epoch_0003.pt: epoch 3" in result.stdout
    assert_bitwise_equal(tmp_path / "checkpoints" / "latest.pt", reference / "latest.pt")

    for name in ("latest.pt", "epoch_0006.pt"):
        damage(tmp_path / "checkpoints" / name, "garbage")
    for path in (tmp_path / "checkpoints").glob("epoch_000[345].pt"):
        path.unlink()
    refused = run_module(["ddp.train", *FLAGS], cwd=tmp_path)
    assert refused.returncode == 1
    assert "error: no valid checkpoint in checkpoints/ (2 damaged files, see above); restore one, or pass " \
           "--resume none to start fresh" in refused.stdout


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_as_latest_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "checkpoints").mkdir()
    with open(tmp_path / "checkpoints" / "latest.pt", "wb") as f:
        pickle.dump({"format": "ddp-cifar/1", "model": Payload(str(marker))}, f)
    result = run_module(["ddp.train", *FLAGS], cwd=tmp_path)
    assert result.returncode == 1
    assert "its pickle calls io.open" in result.stdout and "Traceback" not in result.stderr
    assert not marker.exists()


def test_sigkill_at_random_moments_during_saves_never_leaves_a_partial_checkpoint(tmp_path):
    path = tmp_path / "latest.pt"
    old = {"format": checkpoint.FORMAT, "value": torch.zeros(2_000_000)}
    new = {"format": checkpoint.FORMAT, "value": torch.ones(2_000_000)}
    checkpoint.save_checkpoint(old, path)
    rng = random.Random(0)
    outcomes = set()
    for _ in range(24):
        pid = os.fork()
        if pid == 0:  # the child saves over and over until it is killed
            try:
                while True:
                    checkpoint.save_checkpoint(rng.choice([old, new]), path)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = checkpoint.load_checkpoint(path, map_location="cpu")  # CRC-checked: complete or it raises
        assert torch.equal(loaded["value"], old["value"]) or torch.equal(loaded["value"], new["value"])
        outcomes.add(int(loaded["value"][0]))
        for tmp in tmp_path.glob(".latest.pt.*.tmp"):  # what a killed writer leaves is never the real name
            tmp.unlink()
    assert outcomes == {0, 1}


def test_disk_full_keeps_previous_checkpoints_and_stops_every_rank(reference, tmp_path):
    shutil.copytree(reference, tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "latest.pt").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}

    def file_size_limit() -> None:  # writes past 1 MB fail with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddp.train",
           *FLAGS, "--resume", "checkpoints/epoch_0004.pt", "--epochs", "6"]
    result = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=120, preexec_fn=file_size_limit, check=False)
    assert result.returncode != 0
    assert re.search(r"error: could not write checkpoint checkpoints/\w+\.pt: \[Errno 27\] File too large; "
                     r"check the file system or save to another directory \(any previous file there is untouched\)",
                     result.stdout)
    assert "[rank 1] error: another rank failed" in result.stderr
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert after == before  # nothing lost, nothing half-written left behind


def test_resume_modes(reference, tmp_path, capsys):
    ctx = Context(0, 0, 1, torch.device("cpu"), "gloo")

    def args(resume: str, folder: Path):
        return type("Args", (), {"resume": resume, "checkpoint_dir": str(folder)})

    assert find_resume_checkpoint(args("none", reference), ctx) is None
    path, ckpt = find_resume_checkpoint(args("latest", reference), ctx)
    assert path == reference / "latest.pt" and ckpt["progress"]["epoch"] == 6
    path, ckpt = find_resume_checkpoint(args(str(reference / "epoch_0002.pt"), tmp_path), ctx)
    assert ckpt["progress"]["epoch"] == 2
    assert find_resume_checkpoint(args("auto", tmp_path), ctx) is None  # empty directory: start fresh
    assert "no checkpoint in" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*latest.pt"):
        find_resume_checkpoint(args("latest", tmp_path), ctx)  # latest means latest: no silent fresh start
