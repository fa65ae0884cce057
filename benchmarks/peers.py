"""The three peers of benchmarks.peer: where each one's code comes from, how it is run, what it reports.

    airbench94       PyPI `airbench==0.1.8`, run by benchmarks/airbench_cpu.py
    airbench94_muon  airbench94_muon.py of a checkout of github.com/KellerJordan/cifar10-airbench
    hiverge          cifar10_speedrun.py of a checkout of github.com/hiverge/cifar10-speedrun
                     (the last two run by benchmarks/peer_script.py)

Each runs in a subprocess from a directory holding `cifar10/{train,test}.pt` and prints the PEER_* lines
of benchmarks/peer_cpu.py; `run_peer` times it from launch to its PEER_TRAINED line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPO
from benchmarks.peer_cpu import EPOCH, RESULT, TRAINED


@dataclass(frozen=True)
class Peer:
    name: str
    repo: str  # where its code comes from
    script: str | None  # the file in its checkout; None: the installed airbench package
    dir_flag: str | None = None  # benchmarks.peer's flag for the path to its checkout
    quick_epochs: float | None = None  # --epochs for --quick, where the peer takes one


PEERS = {
    "airbench94": Peer("airbench94", "PyPI airbench==0.1.8", None, quick_epochs=3),
    "airbench94_muon": Peer("airbench94_muon", "https://github.com/KellerJordan/cifar10-airbench", "airbench94_muon.py",
                            "--airbench-muon-dir"),
    "hiverge": Peer("hiverge", "https://github.com/hiverge/cifar10-speedrun", "cifar10_speedrun.py", "--hiverge-dir"),
}


def source(peer: Peer, checkout: Path | None) -> str:
    """What ran: airbench's installed version, or the checkout's commit (and whether it has local changes)."""
    if peer.script is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"airbench {version('airbench')} (PyPI)"
        except PackageNotFoundError:
            return "airbench not installed"
    git = ["git", "-C", str(checkout)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           check=False).stdout.strip()
    return f"{peer.repo} @ {commit or 'unknown commit (not a git checkout)'}{' with local changes' if dirty else ''}"


def command(peer: Peer, checkout: Path | None, seed: int, quick: bool, device: str = "cpu") -> list[str]:
    """The peer's runner, as a command line to start in the data directory."""
    runner = ["-m", "benchmarks.airbench_cpu"] if peer.script is None else [
        "-m", "benchmarks.peer_script", "--script", str(Path(checkout, peer.script).resolve())]
    epochs = ["--epochs", str(peer.quick_epochs)] if quick and peer.quick_epochs else []
    return [sys.executable, "-u", *runner, "--seed", str(seed), "--device", device, *epochs]


def check_checkout(peer: Peer, checkout: Path | None) -> str | None:
    """Why this peer cannot run (one line), or None."""
    if peer.script is None:
        return None if "not installed" not in source(peer, None) else (
            "airbench94 needs `pip install airbench==0.1.8` (benchmarks/requirements.txt)")
    if checkout is None:
        return f"{peer.name} needs {peer.dir_flag} DIR, a checkout of {peer.repo} (git clone {peer.repo})"
    if not (checkout / peer.script).is_file():
        return f"{peer.dir_flag} {checkout}: no {peer.script} there; give a checkout of {peer.repo}"
    return None


def run_peer(peer: Peer, checkout: Path | None, seed: int, data_root: Path, quick: bool) -> dict:
    """One run of the peer in a subprocess, its stdout echoed with times since launch and parsed."""
    cmd = command(peer, checkout, seed, quick)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    print(f"$ (cd {data_root} && {' '.join(cmd)})   # {source(peer, checkout)}", flush=True)
    run = {"side": peer.name, "seed": seed, "command": cmd, "source": source(peer, checkout),
           "load_before": os.getloadavg(), "curve": []}
    launch = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=data_root, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    epochs = []
    for line in proc.stdout:
        t = time.perf_counter() - launch
        print(f"[{peer.name} {t:7.1f}s] {line}", end="", flush=True)
        tag, _, payload = line.partition(" ")
        if tag == EPOCH:
            epochs.append(json.loads(payload))
            run["curve"].append([t, epochs[-1]["acc"]])
        elif tag == TRAINED:
            trained = json.loads(payload)
            run.update(wall_s=t, reported=trained["acc"], final_point=[t, trained["acc"]])
            # Images per second of training: its own timer up to the last epoch it logged (no final TTA).
            train_s = epochs[-1]["train_s"] if epochs else trained["train_s"]
            run["img_s"] = trained["images"] / train_s if train_s else float("nan")
        elif tag == RESULT:
            run["acc"] = json.loads(payload)
    if proc.wait() != 0 or "acc" not in run:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}) in {data_root}")
    run["load_after"] = os.getloadavg()
    return run
