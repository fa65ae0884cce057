"""The files in launch/, run for real: the torchrun scripts under the real torchrun on this machine, and
the SLURM job files submitted to a real single-node SLURM cluster on localhost (tests/slurm_cluster.py).

Where the cluster cannot run (not root, packages missing) its tests are skipped with the reason; with
CI=true they fail instead, since CI installs the packages (.ci/run) and must run them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm_cluster
from conftest import REPO

TRAIN = ["--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "896", "--batch-size", "128"]  # 7 steps per epoch
ON_CI = os.environ.get("CI") == "true"


def unavailable(reason: str) -> None:
    if ON_CI:
        pytest.fail(f"{reason} (CI=true: these tests must run there)")
    pytest.skip(reason)


def script_env(**extra: str) -> dict[str, str]:
    """The environment a user has: none of the variables the scripts read, unless given here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NPROC", "NNODES"))
           and k not in ("OMP_NUM_THREADS", "NODE_RANK", "RDZV_ID", "MAX_RESTARTS", "TORCHRUN_ARGS", "RDZV_ARGS")}
    return {**env, "PYTHON": sys.executable, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resumed_line(stop: re.Match) -> str:
    """What the trainer logs when it resumes from the checkpoint that this stop line says it saved."""
    return f"resumed from {stop['path']}: epoch {stop['epoch']}{stop['batches'] or ''}, step {stop['step']}"


STOPPED = re.compile(r"stopping at epoch (?P<epoch>\d+)(?P<batches> \+ \d+ batches)?, step (?P<step>\d+) "
                     r"\(SIGTERM\): saved (?P<path>\S+/latest\.pt)")

# --------------------------------------------------------------------------- shellcheck

def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        unavailable("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    scripts = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("launch/**/*.sh"), *REPO.glob("launch/**/*.sbatch"),
                                                        *REPO.glob("benchmarks/*.sh"), REPO / ".ci" / "run"])
    assert {"benchmarks/gpu_check.sh", "launch/torchrun.sh", "launch/torchrun_multinode.sh", "launch/slurm/train.sbatch",
            "launch/slurm/train_cpu.sbatch", "launch/slurm/train_multinode.sbatch"} <= set(scripts), scripts
    result = subprocess.run(["shellcheck", *scripts], check=False, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_check_dry_run_prints_commands_whose_flags_exist_and_refuses_without_a_gpu(tmp_path):
    """benchmarks/gpu_check.sh cannot run here (no GPU): its DRY_RUN prints each command, and the trainer's
    flags in them parse; a real run where no GPU is visible stops at once with one line."""
    from ddp import config

    script = str(REPO / "benchmarks" / "gpu_check.sh")
    env = script_env(DRY_RUN="1", GPUS="4", AIRBENCH_DIR="/x/cifar10-airbench", OUT=str(tmp_path / "out"))
    dry = subprocess.run([script], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    trains = [line.split(" -m ddp.train ")[1].split() for line in dry.stdout.splitlines() if " -m ddp.train " in line]
    assert len(trains) == 2 and "--nproc_per_node=1 " in dry.stdout and "--nproc_per_node=4 " in dry.stdout
    for flags in trains:
        args = config.parse_args(flags)
        assert (args.dataset, args.synthetic_size, args.epochs, args.device) == ("synthetic", 50000, 8, "cuda")
    assert "--script /x/cifar10-airbench/airbench94_muon.py" in dry.stdout and "hiverge" not in dry.stdout
    assert "| ours, 4 GPU(s), 8 epochs | - | dry run |" in dry.stdout
    real = subprocess.run([script], check=False, env={**env, "DRY_RUN": "0", "GPUS": "0"}, capture_output=True,
                          text=True, timeout=60)
    assert real.returncode == 1 and real.stderr.strip() == (
        "gpu_check.sh: no GPU visible (torch.cuda.device_count() is 0); DRY_RUN=1 prints the commands")


# --------------------------------------------------------------------------- torchrun scripts

def test_torchrun_sh_trains_with_its_defaults_stops_cleanly_on_sigusr1_and_resumes(tmp_path):
    """NPROC and OMP_NUM_THREADS from the machine, flags passed through, outputs in the current directory;
    SIGUSR1 to the script reaches the trainer as a clean stop, and the same command continues."""
    cmd = [str(REPO / "launch" / "torchrun.sh"), *TRAIN, "--epochs", "4", "--run-name", "tr"]
    with open(tmp_path / "stderr.txt", "w") as stderr_file:
        job = subprocess.Popen(cmd, cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=stderr_file,
                               text=True)
    out = ""
    for line in job.stdout:
        out += line
        if line.startswith("epoch 1/4"):
            job.send_signal(signal.SIGUSR1)  # to the script: its trap sends SIGTERM to torchrun
    job.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    nproc = torch.cuda.device_count() or 2
    threads = max(1, len(os.sched_getaffinity(0)) // nproc)
    assert f"launch/torchrun.sh: {nproc} processes x {threads} threads" in stderr
    assert f"world {nproc} x cpu (gloo)" in out and "batch 128 global" in out
    assert job.returncode != 0, out
    assert "launch/torchrun.sh: got SIGUSR1" in stderr
    stop = STOPPED.search(out)
    assert stop and stop.group("path") == "checkpoints/latest.pt", out + stderr[-3000:]

    rerun = subprocess.run(cmd, check=False, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
    assert resumed_line(stop) in rerun.stdout
    assert "epoch 4/4" in rerun.stdout
    assert (tmp_path / "checkpoints" / "epoch_0004.pt").is_file()
    assert (tmp_path / "runs" / "tr").is_dir()


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_torchrun_multinode_sh_two_agents_on_127_0_0_1_train_together(tmp_path, rendezvous):
    """Two 'nodes' of one process each: both agents meet at MASTER_ADDR:MASTER_PORT, form one world of 2,
    and finish; global rank 0 alone logs and saves."""
    env = script_env(NNODES="2", NPROC="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                     RDZV_ID=f"test-{tmp_path.name}", OMP_NUM_THREADS="1")  # two nodes' threads share 2 cores here
    agents = []
    for n in range(2):
        with open(tmp_path / f"out{n}.txt", "w") as out, open(tmp_path / f"err{n}.txt", "w") as err:
            agents.append(subprocess.Popen(
                [str(REPO / "launch" / "torchrun_multinode.sh"), *TRAIN, "--epochs", "2"], cwd=tmp_path,
                env={**env, **({"NODE_RANK": str(n)} if rendezvous == "static" else {})}, stdout=out, stderr=err))
    for agent in agents:
        agent.wait(timeout=180)
    results = [((tmp_path / f"out{n}.txt").read_text(), (tmp_path / f"err{n}.txt").read_text()) for n in range(2)]
    logs = "\n".join(out + err[-3000:] for out, err in results)
    assert [agent.returncode for agent in agents] == [0, 0], logs
    mode = "c10d rendezvous test-" if rendezvous == "c10d" else "static rendezvous, node rank "
    assert all(f"launch/torchrun_multinode.sh: 2 nodes via 127.0.0.1:{env['MASTER_PORT']} ({mode}" in err
               for _, err in results), logs
    outs = [out for out, _ in results]
    assert sum("world 2 x cpu (gloo)" in out for out in outs) == 1, logs  # one world of two, logged once
    assert "epoch 2/2" in "".join(outs)
    assert (tmp_path / "checkpoints" / "epoch_0002.pt").is_file()


def test_torchrun_multinode_sh_needs_master_addr(tmp_path):
    result = subprocess.run([str(REPO / "launch" / "torchrun_multinode.sh")], check=False, cwd=tmp_path,
                            env=script_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "MASTER_ADDR: set MASTER_ADDR to the address of the node that hosts the rendezvous" in result.stderr


# --------------------------------------------------------------------------- SLURM

@pytest.fixture(scope="module")
def cluster():
    try:
        running = slurm_cluster.start()
    except slurm_cluster.Unavailable as e:
        unavailable(f"no SLURM cluster on this machine: {e}")
    yield running
    running.stop()


def submit(cluster, tmp_path: Path, *args: str) -> int:
    """sbatch from tmp_path (the job's working directory: output file, checkpoints, runs go there)."""
    return cluster.sbatch(*args, cwd=tmp_path, env={"REPO": str(REPO), "PYTHON": sys.executable})


def wait_for_output(cluster, path: Path, pattern: str, job_id: int, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job_id} is {state} before printing {pattern!r}:\n{text}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {path} after {timeout} s:\n{text}\n{cluster.logs()}")


def test_train_sbatch_as_it_is_runs_on_a_node_with_gpus_and_saves_per_job(cluster, tmp_path):
    """The GPU job file unchanged: accepted by a cluster whose node has GPUs (placeholders here, so the
    job trains on CPU), output file and checkpoint and TensorBoard directories named by job id."""
    job_id = submit(cluster, tmp_path, str(REPO / "launch/slurm/train.sbatch"), *TRAIN,
                    "--epochs", "2")
    info = cluster.wait(job_id, timeout=150)
    output = tmp_path / f"ddp-cifar-{job_id}.out"
    text = output.read_text() if output.exists() else "(no output file)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text + cluster.logs()
    assert info["TresPerNode"] == "gres:gpu:4" and info["Requeue"] == "1"
    ckpt_dir = tmp_path / "checkpoints" / f"ddp-cifar-{job_id}"
    assert f"job {job_id} (restart 0) on {cluster.node}: checkpoints in {ckpt_dir}, TensorBoard in " \
           f"{tmp_path}/runs/ddp-cifar-{job_id}" in text
    assert "launch/torchrun.sh: 2 processes x 1 threads" in text  # no CUDA device: 2 processes share the node
    assert "world 2 x cpu (gloo)" in text and "epoch 2/2" in text
    assert torch.load(ckpt_dir / "latest.pt", weights_only=True)["progress"]["epoch"] == 2
    assert list((tmp_path / "runs" / f"ddp-cifar-{job_id}").glob("events.out.tfevents.*"))


def preempt_and_follow(cluster, tmp_path: Path, output_name: str, *sbatch_args: str) -> tuple[int, str]:
    """Submit with --epochs 4; after epoch 1, signal the batch shell as --signal=B:USR1 does; wait until
    the job, requeued, has finished. Returns the job id and its output file's text."""
    job_id = submit(cluster, tmp_path, *sbatch_args, *TRAIN, "--epochs", "4")
    output = tmp_path / output_name.format(job_id)
    wait_for_output(cluster, output, r"\nepoch 1/4", job_id)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))
    info = cluster.wait(job_id, timeout=150)
    text = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text + cluster.logs()
    assert info["Restarts"] == "1", text
    return job_id, text


def assert_stopped_requeued_resumed(text: str, job_id: int, ckpt_dir: Path) -> None:
    first, _, second = text.partition(f"job {job_id} (restart 1)")
    assert second, f"the job did not run again after its requeue:\n{text}"
    assert "launch/slurm/preemptible.sh" in first and "got SIGUSR1" in first
    stop = STOPPED.search(first)
    assert stop and stop.group("path") == f"{ckpt_dir}/latest.pt", text
    assert f"requeueing job {job_id} to resume" in first
    assert resumed_line(stop) in second, text  # the same epoch, batch and step it stopped at
    epochs = [int(e) for e in re.findall(r"^epoch (\d)/4", second, re.MULTILINE)]
    assert epochs == list(range(int(stop.group("epoch")) + 1, 5)), text  # only what was left
    assert torch.load(ckpt_dir / "latest.pt", weights_only=True)["progress"] == {
        "epoch": 4, "step": 28, "batch_in_epoch": 0}


def test_preempted_cpu_job_saves_requeues_itself_and_resumes(cluster, tmp_path):
    """USR1 to the batch shell -> SIGTERM to torchrun -> the trainer saves latest.pt and exits 75 ->
    scontrol requeue -> the same job id runs again, resumes at the saved step and completes."""
    job_id, text = preempt_and_follow(cluster, tmp_path, "ddp-cifar-cpu-{}.out", "--cpus-per-task=2",
                                      str(REPO / "launch/slurm/train_cpu.sbatch"))
    assert "launch/torchrun.sh: 2 processes x 1 threads" in text
    assert_stopped_requeued_resumed(text, job_id, tmp_path / "checkpoints" / f"ddp-cifar-cpu-{job_id}")


def test_multinode_sbatch_on_one_node_runs_srun_torchrun_and_survives_preemption(cluster, tmp_path):
    """The multi-node job file with --nodes=1: srun starts launch/torchrun_multinode.sh, whose agent meets
    itself at the first host of the node list; USR1 travels batch shell -> srun -> every process of the
    step (torchrun ignores it, its wrapper turns it into SIGTERM), and the requeued job resumes."""
    job_id, text = preempt_and_follow(cluster, tmp_path, "ddp-cifar-multinode-{}.out", "--nodes=1",
                                      str(REPO / "launch/slurm/train_multinode.sbatch"))
    port = 20000 + job_id % 20000
    assert f"launch/torchrun_multinode.sh: 1 nodes via {cluster.node}:{port} (c10d rendezvous {job_id}," in text
    assert "world 2 x cpu (gloo)" in text
    assert_stopped_requeued_resumed(text, job_id, tmp_path / "checkpoints" / f"ddp-cifar-multinode-{job_id}")
