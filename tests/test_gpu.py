"""The real trainer on CUDA: one GPU, NCCL under torchrun, fp16 with GradScaler, deterministic resume.

Skipped, with the reason, where there is no GPU. Tiny runs (synthetic data, fastnet_small, 8 steps an epoch).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_resume import SMALL

from conftest import count_gpus, run_module
from ddp import checkpoint
from test_fault_tolerance import assert_bitwise_equal, train

GPUS = count_gpus()  # conftest hides CUDA from every other test; these see it again (gpus_visible)
pytestmark = [pytest.mark.skipif(not GPUS, reason="needs CUDA (no GPU visible: torch.cuda.device_count() is 0)"),
              pytest.mark.usefixtures("gpus_visible")]
needs_2_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 or more GPUs (this machine has {GPUS})")

ONE_GPU = ["ddp.train", *SMALL, "--device", "cuda"]  # 1024 synthetic images, batch 128: 8 steps an epoch
SYNTHETIC_TEST = ["--dataset", "synthetic", "--synthetic-size", "1024"]  # ddp.evaluate: the same 204 test images
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
EVALUATED = re.compile(r"loss (?P<loss>[\d.]+) \| accuracy (?P<acc>[\d.]+)% \(full TTA\) \| 1 x (?P<device>\w+)")


def evaluate(cwd, *flags: str, env: dict[str, str] | None = None) -> re.Match:
    """`python -m ddp.evaluate` on the synthetic test set; its result line."""
    result = run_module(["ddp.evaluate", *SYNTHETIC_TEST, *flags], cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    found = EVALUATED.search(result.stdout)
    assert found, result.stdout
    return found


def test_one_gpu_checkpoint_reloads_in_a_cpu_only_process(tmp_path):
    """Train on cuda:0 and save; evaluate and resume that file where CUDA is hidden."""
    gpu = train(tmp_path, "--epochs", "2", "--amp", "none", torchrun=ONE_GPU)  # float32: CPU can match it
    assert "world 1 x cuda (nccl)" in gpu.stdout and "float32" in gpu.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True, map_location="cpu")
    assert ckpt["env"] == {"world_size": 1, "device": "cuda", "torch": torch.__version__}
    assert ckpt["rng"]["cuda"]  # the GPU generators' states are saved too
    acc, loss = ckpt["metrics"]["acc"], ckpt["metrics"]["loss"]
    assert f"acc {100 * acc:.2f}% (unsure TTA)" in gpu.stdout

    # CPU kernels (and cuDNN's TF32 convolutions on the GPU) round differently: close, not bitwise.
    cpu = evaluate(tmp_path, "--checkpoint", "checkpoints/latest.pt", "--device", "cpu", "--amp", "none", env=CPU_ONLY)
    assert cpu["device"] == "cpu"
    assert float(cpu["acc"]) / 100 == pytest.approx(acc, abs=0.02)  # 204 images: within 4 of them
    assert float(cpu["loss"]) == pytest.approx(loss, rel=0.02, abs=1e-3)

    resumed = run_module(["ddp.train", *SMALL, "--device", "cpu", "--amp", "none", "--epochs", "3"], cwd=tmp_path,
                         env=CPU_ONLY)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert re.search(r"resumed from checkpoints/latest.pt: epoch 2, step 16, best acc [\d.]+% "
                     r"\(saved by 1 x cuda, now 1 x cpu\)", resumed.stdout), resumed.stdout
    assert "world 1 x cpu (gloo)" in resumed.stdout and "epoch 3/3" in resumed.stdout
    after = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True, map_location="cpu")
    assert after["progress"]["step"] == 24 and after["env"]["device"] == "cpu"


@needs_2_gpus
def test_nccl_under_torchrun_then_reload_on_one_gpu(tmp_path):
    """Two processes, one GPU each, backend auto (nccl); the file then evaluates in one process on cuda:0."""
    two = train(tmp_path, "--epochs", "2",
                torchrun=["torchrun", "--standalone", "--nproc_per_node=2", "-m", *ONE_GPU])
    assert "world 2 x cuda (nccl)" in two.stdout and "batch 128 global = 2 x 64" in two.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True, map_location="cpu")
    assert ckpt["env"]["world_size"] == 2 and ckpt["env"]["device"] == "cuda"
    assert ckpt["progress"] == {"epoch": 2, "step": 16, "batch_in_epoch": 0}

    one = evaluate(tmp_path, "--checkpoint", "checkpoints/latest.pt", "--device", "cuda")
    assert one["device"] == "cuda"
    # Same weights and bf16 autocast; other batches (all images, not every second one) and cuDNN algorithms.
    assert float(one["acc"]) / 100 == pytest.approx(ckpt["metrics"]["acc"], abs=0.03)  # within 6 images
    assert float(one["loss"]) == pytest.approx(ckpt["metrics"]["loss"], rel=0.05, abs=2e-3)


def test_fp16_grad_scaler_state_is_saved_and_carried_on_resume(tmp_path):
    """--amp fp16 saves GradScaler's state; --resume auto loads it into the resumed run's scaler."""
    fp16 = [*ONE_GPU, "--amp", "fp16"]
    first = train(tmp_path, "--epochs", "1", torchrun=fp16)
    assert "float16 autocast" in first.stdout
    latest = tmp_path / "checkpoints" / "latest.pt"
    saved = torch.load(latest, weights_only=True, map_location="cpu")
    assert saved["config"]["amp"] == "fp16"
    assert saved["scaler"]["growth_interval"] == 2000 and 0 < saved["scaler"]["scale"] <= 2.0 ** 16

    # Mark the saved scaler: a fresh one starts at 65536 (halved at most once a step, 8 steps: >= 256) with
    # growth_interval 2000. Saved atomically, so the hard-linked epoch_0001.pt and best.pt stay as they were.
    marked = {**saved, "scaler": {**saved["scaler"], "scale": 128.0, "growth_interval": 1000}}
    checkpoint.save_checkpoint(marked, latest)
    resumed = train(tmp_path, "--epochs", "2", "--resume", "auto", torchrun=fp16)
    assert "resumed from checkpoints/latest.pt: epoch 1, step 8" in resumed.stdout
    assert "float16 autocast" in resumed.stdout and "epoch 2/2" in resumed.stdout
    after = torch.load(latest, weights_only=True, map_location="cpu")
    assert after["progress"] == {"epoch": 2, "step": 16, "batch_in_epoch": 0}
    assert after["scaler"]["growth_interval"] == 1000  # carried over
    assert 0 < after["scaler"]["scale"] <= 128  # no growth within 1000 steps: it only backs off from 128
    assert math.isfinite(after["metrics"]["loss"]) and after["metrics"]["acc"] > 0


def test_deterministic_resume_is_bitwise_equal(tmp_path):
    """3 epochs straight vs 2 epochs, stopped, then resumed to 3: the same bits.

    --stop-at-step keeps the 3-epoch LR schedule (--epochs 2 would train the first two on another one).
    """
    flags = [*ONE_GPU, "--deterministic", "--epochs", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    train(straight, torchrun=flags)
    stopped = train(split, "--stop-at-step", "16", torchrun=flags)
    assert "stopping at epoch 2, step 16 (--stop-at-step)" in stopped.stdout
    resumed = train(split, torchrun=flags)
    assert "resumed from checkpoints/latest.pt: epoch 2, step 16" in resumed.stdout
    assert "epoch 3/3" in resumed.stdout and "epoch 1/3" not in resumed.stdout
    assert_bitwise_equal(split / "checkpoints" / "latest.pt", straight / "checkpoints" / "latest.pt")
