"""Checkpoints written by the real trainer, reloaded every way a user would: CPU, DDP, compile, resume."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, retag_storages, run_module
from ddp import checkpoint, models

SMALL = ["--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "1024", "--batch-size", "128", "--log-every", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-epoch run of 2 processes under torchrun; its working directory."""
    cwd = tmp_path_factory.mktemp("trained")
    result = run_module(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "ddp.train", *SMALL,
                         "--epochs", "2", "--run-name", "run"], cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return cwd


def test_checkpoint_files_and_contents(trained):
    folder = trained / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "best.pt", "epoch_0001.pt", "epoch_0002.pt", "latest.pt"]
    ckpt = torch.load(folder / "latest.pt", weights_only=True)  # plain types and tensors only
    assert ckpt["format"] == checkpoint.FORMAT
    assert ckpt["progress"] == {"epoch": 2, "step": 16, "batch_in_epoch": 0}
    assert ckpt["env"]["world_size"] == 2 and ckpt["env"]["device"] == "cpu"
    assert ckpt["config"]["model"] == "fastnet_small" and ckpt["config"]["batch_size"] == 128
    assert ckpt["scheduler"]["last_epoch"] == 16
    trained_params = [p for p in models.build("fastnet_small").parameters() if p.requires_grad]
    assert len(ckpt["optimizer"]["state"]) == len(trained_params)  # a momentum buffer each
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch", "cuda"}
    assert 0 < ckpt["metrics"]["acc"] <= ckpt["metrics"]["best_acc"] <= 1


def test_saved_keys_are_the_bare_models_and_reload_without_ddp_or_with_compile(trained):
    path = trained / "checkpoints" / "latest.pt"
    saved = checkpoint.load_model_state(path)
    bare = models.build("fastnet_small")
    assert list(saved) == list(bare.state_dict())  # canonical: no module. / _orig_mod.
    assert checkpoint.load_into(bare, path).ok
    compiled = torch.compile(models.build("fastnet_small"))  # keys of a compiled model carry _orig_mod.
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert checkpoint.load_into(compiled, path).ok
    for model in (bare, checkpoint.unwrap_model(compiled)):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_reload_into_two_ddp_processes(trained):
    result = run_module(["torchrun", "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "reload_under_ddp.py"),
                         str(trained / "checkpoints" / "latest.pt")], cwd=trained)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "rank 0: 39 tensors equal" in result.stdout and "[rank 1] rank 1: 39 tensors equal" in result.stderr


def test_resume_from_gpu_checkpoint_on_one_cpu_process_continues_step_and_schedule(trained, tmp_path):
    # As if saved on GPUs: every storage is tagged cuda:0. This machine has no CUDA.
    retag_storages(trained / "checkpoints" / "latest.pt", tmp_path / "gpu.pt", "cuda:0")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "gpu.pt", weights_only=True)
    result = run_module(["ddp.train", *SMALL, "--epochs", "3", "--resume", str(tmp_path / "gpu.pt"),
                         "--run-name", "resumed"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert re.search(r"resumed from .*gpu.pt: epoch 2, step 16, best acc [\d.]+% \(saved by 2 x cuda:0, "
                     r"now 1 x cpu\)", result.stdout)
    assert "note: flags changed since the checkpoint: --epochs 2 -> 3" in result.stdout
    assert "epoch 3/3" in result.stdout and "epoch 1/3" not in result.stdout
    after = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert after["progress"]["step"] == 24 and after["scheduler"]["last_epoch"] == 24
    assert after["env"] == {"world_size": 1, "device": "cpu", "torch": torch.__version__}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run"]  # the run the checkpoint names
    lr = EventAccumulator(str(tmp_path / "runs" / "run")).Reload().Scalars("train/lr")
    assert [e.step for e in lr] == [20, 24]  # the step count continues from 16
    assert lr[-1].value < lr[0].value  # on the decaying schedule of the original run


def test_only_global_rank_0_writes_even_across_nodes(tmp_path):
    """Two torchrun agents (two "nodes", one process each, both LOCAL_RANK 0) in separate directories."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for node_rank in (0, 1):
        cwd = tmp_path / f"node{node_rank}"
        cwd.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node_rank}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "ddp.train",
               *SMALL, "--epochs", "1"]
        env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
        nodes.append((cwd, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)))
    outputs = [p.communicate(timeout=300)[0] for _, p in nodes]
    assert [p.returncode for _, p in nodes] == [0, 0], outputs
    assert "world 2 x cpu (gloo)" in outputs[0] and "epoch 1/1" in outputs[0]
    assert "epoch 1/1" not in outputs[1]  # only global rank 0 prints
    assert sorted(p.name for p in (tmp_path / "node0" / "checkpoints").iterdir()) == [
        ".lock", "best.pt", "epoch_0001.pt", "latest.pt"]
    assert not (tmp_path / "node1" / "checkpoints").exists() and not (tmp_path / "node1" / "runs").exists()


def test_init_from_foreign_layout_with_remap_reports_and_skips(trained, tmp_path):
    # Another project's file: weights under "state_dict", saved through DDP, nested under backbone.,
    # with a 7-class head.
    donor = checkpoint.load_model_state(trained / "checkpoints" / "latest.pt")
    donor["head.weight"] = torch.zeros(7, donor["head.weight"].shape[1])
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in donor.items()}, "epoch": 9},
               tmp_path / "foreign.pt")
    result = run_module(["ddp.train", *SMALL, "--epochs", "1", "--init-from", "foreign.pt",
                         "--remap", "backbone.=", "--checkpoint-dir", "ft"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "--init-from foreign.pt: 38 keys match; 1 shape mismatch" in result.stdout
    assert "head.weight 7x128 in checkpoint vs 10x128 in model" in result.stdout
    tuned = checkpoint.load_model_state(tmp_path / "ft" / "epoch_0001.pt")
    assert list(tuned) == list(models.build("fastnet_small").state_dict())


def test_torchvision_imagenet_resnet18_into_cifar_resnet18(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18_imagenet.pth")
    model = models.build("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diff = checkpoint.load_into(model, tmp_path / "resnet18_imagenet.pth", strict=False)
    assert sorted(k for k, _, _ in diff.shape_mismatch) == ["conv1.weight", "fc.bias", "fc.weight"]
    assert not diff.missing and not diff.unexpected and diff.matched == len(before) - 3
    assert torch.equal(model.conv1.weight, before["conv1.weight"])  # skipped: 3x3 stem vs ImageNet's 7x7
    assert not torch.equal(model.layer1[0].conv1.weight, before["layer1.0.conv1.weight"])  # loaded
    with pytest.raises(checkpoint.CheckpointMismatchError, match="3 shape mismatch"):
        checkpoint.load_into(model, tmp_path / "resnet18_imagenet.pth")  # strict by default


def test_evaluate_checkpoint_and_its_export_agree(trained, tmp_path):
    latest = trained / "checkpoints" / "latest.pt"  # its accuracy: the last epoch's, with --tta full
    export = run_module(["ddp.checkpoint", "export", str(latest), str(tmp_path / "w.safetensors"), "--safetensors"],
                        cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    acc = torch.load(latest, weights_only=True)["metrics"]["acc"]
    for path in (latest, tmp_path / "w.safetensors"):
        result = run_module(["ddp.evaluate", "--checkpoint", str(path), "--dataset", "synthetic",
                             "--synthetic-size", "1024"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"accuracy {100 * acc:.2f}%" in result.stdout


def test_user_errors_are_one_line_without_traceback(trained, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    wrong_model = ["--model", "resnet18", "--resume", str(trained / "checkpoints" / "latest.pt")]
    for flags, message in [(["--resume", "garbage.pt"], "garbage.pt is in no checkpoint format this reader knows"),
                           (wrong_model, "checkpoint does not fit ResNet: ")]:
        result = run_module(["ddp.train", *SMALL, "--epochs", "3", *flags], cwd=tmp_path)
        assert result.returncode == 1
        assert message in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_failed_save_on_rank_0_stops_every_rank(tmp_path):
    (tmp_path / "ck" / "latest.pt").mkdir(parents=True)  # a directory where the checkpoint file should go
    result = run_module(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "ddp.train", *SMALL,
                         "--epochs", "2", "--checkpoint-dir", "ck"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert re.search(r"error: could not write checkpoint ck/\w+\.pt: .*directory", result.stdout), result.stdout
    assert "[rank 1] error: another rank failed" in result.stderr
    assert "epoch 2/2" not in result.stdout
    assert (tmp_path / "ck" / "latest.pt").is_dir()
