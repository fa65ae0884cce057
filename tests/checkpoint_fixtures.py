"""Checkpoints written by this repository's earlier code, kept as test fixtures (tests/test_compat.py).

Write one with the code of commit SHA (its own trainer and exporter, run as a user would run them):

    git worktree add /tmp/old-SHA SHA
    python tests/checkpoint_fixtures.py --code /tmp/old-SHA --name NAME -- --optimizer muon ...
    git worktree remove /tmp/old-SHA

It trains fastnet_tiny (fixture_models.py: fastnet_small's network, narrower, so that the files stay small)
on synthetic data twice with the same flags: once uninterrupted, once stopped mid-epoch at --stop-at-step.
The stopped run's latest.pt and its weights export are the fixture, as the old code wrote them; the digest
of the uninterrupted run's final state (and its final weights, continued_model.pt) is what a resume of the
fixture must reproduce.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
# the run every fixture is cut from: 2 epochs of 4 steps; the fixture stops at step 6, mid-epoch 2
BASE_FLAGS = ["--model", "fastnet_tiny", "--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "64",
              "--epochs", "2", "--seed", "0", "--amp", "none", "--log-every", "1"]
STOP_AT = 6


def digest(ckpt: dict) -> str:
    """SHA-256 of a training checkpoint's model, optimizer and lookahead state: equal iff bitwise equal."""
    h = hashlib.sha256()

    def feed(name: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                feed(f"{name}.{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                feed(f"{name}[{i}]", item)
        else:
            h.update(f"{name}={value!r};".encode())

    feed("model", ckpt["model"])
    feed("optimizer", (ckpt.get("optimizer") or {}).get("state", {}))
    feed("lookahead", ckpt.get("lookahead"))
    feed("progress", ckpt["progress"])
    return h.hexdigest()


def machine() -> dict[str, str]:
    """What the bits of a CPU run depend on besides the code: torch's kernels, the CPU's ISA, and which
    native bf16 kernels Muon's Newton-Schulz gets (AMX or AVX512-BF16: their roundings differ). Fixtures
    written before "bf16_kernels" was recorded are compared to rounding only."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kernels = [f for f in ("amx_bf16", "avx512_bf16") if re.search(rf"\b{f}\b", flags)]
    return {"torch": str(torch.__version__), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": platform.processor() or platform.machine(), "bf16_kernels": "+".join(kernels) or "none"}


# python -m MODULE ARGS..., with fastnet_tiny registered first
WITH_FIXTURE_MODELS = ("import runpy, sys, fixture_models; module = sys.argv.pop(1); sys.argv[0] = module; "
                       "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def run(code: Path, args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m args...` of the code in `code` (a checkout), from `cwd`, with fastnet_tiny registered."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(FIXTURES)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", WITH_FIXTURE_MODELS, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False, timeout=timeout)


def _run(code: Path, args: list[str], cwd: Path) -> str:
    result = run(code, args, cwd)
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def generate(code: Path, name: str, flags: list[str]) -> None:
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    train = ["ddp.train", *BASE_FLAGS, *flags]
    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        full_log = _run(code, [*train, "--checkpoint-dir", "full", "--logdir", "runs"], work)
        _run(code, [*train, "--checkpoint-dir", "cut", "--logdir", "runs", "--stop-at-step", str(STOP_AT)], work)
        _run(code, ["ddp.checkpoint", "export", "cut/latest.pt", "weights.pt"], work)
        full = torch.load(work / "full" / "latest.pt", map_location="cpu", weights_only=True)
        cut = torch.load(work / "cut" / "latest.pt", map_location="cpu", weights_only=True)
        shutil.copy(work / "cut" / "latest.pt", out / "latest.pt")
        shutil.copy(work / "weights.pt", out / "weights.pt")
        # the uninterrupted run's final weights, for machines whose float32 kernels differ from the writer's
        torch.save(full["model"], out / "continued_model.pt")
    expected = {
        "commit": commit,
        "how": "python tests/checkpoint_fixtures.py at that commit's worktree: these commands, fixture_models imported first",
        "written_by": ["python", "-m", *train, "--checkpoint-dir", "cut", "--stop-at-step", str(STOP_AT)],
        "export": ["python", "-m", "ddp.checkpoint", "export", "cut/latest.pt", "weights.pt"],
        "train_flags": [*BASE_FLAGS, *flags],
        "format": cut.get("format"),
        "progress": cut["progress"],
        "uninterrupted": {"progress": full["progress"], "digest": digest(full), "model": "continued_model.pt",
                          "log": [line for line in full_log.splitlines() if "loss" in line]},
        "machine": machine(),
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"{out}: {commit[:7]} {cut['progress']} -> {full['progress']} {expected['uninterrupted']['digest'][:16]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", type=Path, required=True, help="a checkout (git worktree) of the commit to write with")
    p.add_argument("--name", required=True, help="fixture directory under tests/fixtures/checkpoints/")
    p.add_argument("flags", nargs="*", help="ddp.train flags after --, beside " + " ".join(BASE_FLAGS))
    args = p.parse_args()
    if not shutil.which("git"):
        sys.exit("needs git")
    generate(args.code.resolve(), args.name, args.flags)


if __name__ == "__main__":
    main()
