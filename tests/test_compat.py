"""Checkpoints written by earlier commits (tests/fixtures/checkpoints/) load, inspect, evaluate and resume today.

Each fixture is a mid-epoch latest.pt and its weights export, written by the old code itself, with the digest
of how the old code's uninterrupted run ended. A resumed fixture must end there bit for bit (on a machine
with the writer's torch and CPU kernels; elsewhere, float32 within rounding of the writer's final weights).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoint_fixtures import FIXTURES, digest, machine, run
from conftest import REPO, run_module, write_cifar_dir

CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.json").is_file())
RESUMABLE = {"ca350a7-muon", "33ee9b8-muon-before-run-names"}  # the Muon recipe's optimizer layout, as today's
REFUSED = {"48d373d-sgd-lookahead"}  # SGD + lookahead before the Muon recipe: two unnamed parameter groups


def _expected(name: str) -> dict:
    return json.loads((FIXTURES / name / "expected.json").read_text())


def test_fixtures_are_all_accounted_for_and_small():
    assert set(CASES) == RESUMABLE | REFUSED
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert total < 2 << 20, f"{total} bytes of fixtures; keep them under 2 MB"
    tracked = REPO / ".gitignore"
    assert "/checkpoints/*" in tracked.read_text()  # anchored at the root: tests/fixtures/checkpoints is kept


@pytest.mark.parametrize("name", CASES)
def test_inspect_and_evaluate_old_files(name, tmp_path):
    expected = _expected(name)
    for file, fmt in [("latest.pt", expected["format"]), ("weights.pt", "ddp-cifar-weights/1")]:
        inspect = run_module(["ddp.checkpoint", "inspect", str(FIXTURES / name / file)], cwd=tmp_path)
        assert inspect.returncode == 0, inspect.stderr
        assert "fastnet_tiny" in inspect.stdout and fmt in inspect.stdout, inspect.stdout
    data = write_cifar_dir(tmp_path / "data")
    for file in ["latest.pt", "weights.pt"]:
        result = run(REPO, ["ddp.evaluate", "--checkpoint", str(FIXTURES / name / file), "--dataset", "cifar10",
                            "--data-dir", str(data), "--device", "cpu", "--tta", "none"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "fastnet_tiny on 20 cifar10 test images" in result.stdout and "accuracy" in result.stdout


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_continues_as_the_old_run_did(name, tmp_path):
    expected = _expected(name)
    (tmp_path / "ckpt").mkdir()
    shutil.copy(FIXTURES / name / "latest.pt", tmp_path / "ckpt" / "latest.pt")
    result = run(REPO, ["ddp.train", *expected["train_flags"], "--checkpoint-dir", "ckpt", "--logdir", "runs",
                        "--resume", "latest"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"step {expected['progress']['step']}" in result.stdout  # resumed mid-epoch, not started afresh
    final = torch.load(tmp_path / "ckpt" / "latest.pt", map_location="cpu", weights_only=True)
    assert final["progress"] == expected["uninterrupted"]["progress"]
    old = torch.load(FIXTURES / name / "continued_model.pt", map_location="cpu", weights_only=True)
    # On any machine: the old run's final weights, to the rounding of Muon's bf16 Newton-Schulz, whose bits
    # differ between CPUs with AMX and with AVX512-BF16 only (2.4e-4 at most, measured; a wrong recipe: 0.02+).
    for key, value in old.items():
        torch.testing.assert_close(final["model"][key], value, rtol=1e-3, atol=2e-3, msg=key)
    if all(machine()[k] == expected["machine"].get(k) for k in machine()):  # the same kernels: the same bits
        assert digest(final) == expected["uninterrupted"]["digest"], "resumed run differs from the old one's bits"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_pre_muon_checkpoint_is_refused_in_one_line_and_its_weights_still_start_a_run(name, tmp_path):
    expected = _expected(name)
    (tmp_path / "ckpt").mkdir()
    shutil.copy(FIXTURES / name / "latest.pt", tmp_path / "ckpt" / "latest.pt")
    flags = [*expected["train_flags"], "--optimizer", "sgd", "--logdir", "runs"]
    refused = run(REPO, ["ddp.train", *flags, "--checkpoint-dir", "ckpt", "--resume", "latest"], cwd=tmp_path)
    assert refused.returncode == 1
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "predates the Muon recipe" in errors[0] and "--init-from" in errors[0], errors
    assert "Traceback" not in refused.stderr
    fresh = run(REPO, ["ddp.train", *flags, "--checkpoint-dir", "fresh", "--init-from", "ckpt/latest.pt",
                       "--resume", "none", "--epochs", "1"], cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stdout[-2000:] + fresh.stderr[-2000:]
    assert "--init-from ckpt/latest.pt" in fresh.stdout and (tmp_path / "fresh" / "latest.pt").is_file()
