"""Shared test fixtures: a tiny CIFAR-10 in the official layout, and running the real CLIs."""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# The CPU tests stay on the CPU on a machine with GPUs: CUDA is hidden from this process and from every
# process the tests start (their --device auto would pick a GPU, and their assertions expect cpu).
# tests/test_gpu.py opts back in with the `gpus_visible` fixture.
VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")  # as the user set it; None: all of them
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def gpu_env() -> dict[str, str]:
    """os.environ with CUDA visible as it was before the tests hid it."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return env if VISIBLE_GPUS is None else {**env, "CUDA_VISIBLE_DEVICES": VISIBLE_GPUS}


def count_gpus() -> int:
    """GPUs a child process would see with CUDA visible again (no NVIDIA device node: 0, without asking torch)."""
    if not list(Path("/dev").glob("nvidia[0-9]*")):
        return 0
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           env=gpu_env(), capture_output=True, text=True, check=False, timeout=120)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


@pytest.fixture
def gpus_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """For this test, the processes it starts see the GPUs again."""
    if VISIBLE_GPUS is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", VISIBLE_GPUS)


def write_cifar_dir(root: Path, per_batch: int = 20, bytes_keys: bool = False, seed: int = 0,
                    dataset: str = "cifar10") -> Path:
    """Write a tiny copy of CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test,
    meta; `fine_labels` and `coarse_labels`) in the official pickle layout, and return `root`.

    bytes_keys=True writes b"data"/b"labels" keys, as Python 3 reads Python 2's str keys with
    encoding="bytes"; False writes str keys, as encoding="latin1" gives them.
    """
    rng = np.random.default_rng(seed)
    cifar100 = dataset == "cifar100"
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    files = {"train": 5 * per_batch, "test": per_batch} if cifar100 else {
        **{f"data_batch_{i}": per_batch for i in range(1, 6)}, "test_batch": per_batch}
    for name, n in files.items():
        labels = {key("fine_labels"): rng.integers(0, 100, n).tolist(), key("coarse_labels"): rng.integers(0, 20, n).tolist()
                  } if cifar100 else {key("labels"): rng.integers(0, 10, n).tolist()}
        batch = {key("batch_label"): f"{name} of tiny test set", **labels,
                 key("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key("filenames"): [f"img_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {key("fine_label_names"): [f"class{i}" for i in range(100)]} if cifar100 else {
        key("label_names"): [f"class{i}" for i in range(10)]}
    with open(folder / ("meta" if cifar100 else "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    return write_cifar_dir(tmp_path / "data")


def run_module(args: list[str], cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m ...` or `torchrun ...` (args[0] picks which) from `cwd` with the repo importable."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", *args] if args[0] != "torchrun" else [
        sys.executable, "-m", "torch.distributed.run", *args[1:]]
    return subprocess.run(cmd, check=False, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def retag_storages(src: Path, dst: Path, location: str) -> None:
    """Copy a torch zip checkpoint, rewriting each storage's location tag ('cpu') in data.pkl.

    torch.save pickles with protocol 2 (no frames; memo by index, not offset), so replacing the
    BINUNICODE 'cpu' opcode by one with a longer string keeps the pickle valid.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                out, last, count = bytearray(), 0, 0
                for op, arg, pos in pickletools.genops(data):
                    if op.name == "BINUNICODE" and arg == "cpu":
                        out += data[last:pos] + b"X" + struct.pack("<I", len(location)) + location.encode()
                        last, count = pos + 1 + 4 + 3, count + 1
                assert count, "no 'cpu' location tag found"
                data = bytes(out + data[last:])
            zout.writestr(info, data)
