"""Checkpoints as other tools write them load through every entry point, every tensor equal; hostile ones don't.

Each layout is written by the real library where it installs quickly (Lightning's Trainer, timm's
CheckpointSaver, huggingface_hub's sharded safetensors, torch.distributed.checkpoint) for fastnet_small
and torchvision's ResNet-18, then loaded on CPU by load_weights/load_into, --init-from, inspect, convert
and export. DCP written by 2 ranks and the 2-rank DCP load are in test_dcp.py.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_module
from ddp import checkpoint, models, resume
from ddp.checkpoint.__main__ import main as cli_main
from ddp.dist import Context

MODELS = ["fastnet_small", "resnet18"]
CPU = Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(name, 10)


def trained_copy(name: str) -> nn.Module:
    """A model whose weights differ from build()'s, BatchNorm statistics included."""
    model = build(name, seed=1)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn_like(t.float()).to(t.dtype) if t.is_floating_point() else t + 3)
    return model


class Payload:
    """Unpickling it would run os.system and create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- writers, one per tool


def write_lightning(model: nn.Module, path: Path, extra_callback_state: object = None) -> None:
    """A Lightning .ckpt from a real Trainer: weights under state_dict as `model.<key>`, hparams, callbacks."""
    import lightning as L
    from lightning.fabric.utilities.data import AttributeDict

    class Classifier(L.LightningModule):
        def __init__(self, net: nn.Module, config: AttributeDict):
            super().__init__()
            self.save_hyperparameters({"config": config, "args": argparse.Namespace(lr=0.0)})
            self.model = net

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: the weights stay as written

    class Stateful(L.Callback):
        def state_dict(self):
            return {"payload": extra_callback_state, "best": np.float64(0.5)}

    module = Classifier(model, AttributeDict(width=64, lr=0.0))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Stateful()], default_root_dir=path.parent)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and small data sets
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    model.eval()
    trainer.save_checkpoint(path)


def write_timm(model: nn.Module, path: Path) -> None:
    """timm's CheckpointSaver: state_dict, state_dict_ema, optimizer, args as an argparse.Namespace."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for t in ema.module.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)  # the EMA weights differ from the model's
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model="resnet18", lr=0.1), model_ema=ema,
                            checkpoint_dir=str(path.parent), recovery_dir=str(path.parent), max_history=1)
    saver.save_checkpoint(epoch=3, metric=0.5)
    (path.parent / "last.pth.tar").rename(path)


def write_examples(model: nn.Module, path: Path) -> None:
    """pytorch/examples' ImageNet script: a DDP model's state_dict, best_acc1 as a numpy scalar."""
    state = {"module." + k: v for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 5, "arch": "resnet18", "state_dict": state, "best_acc1": np.float64(71.2),
                "optimizer": optimizer.state_dict(),
                "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 30).state_dict()}, path)


def write_sharded(model: nn.Module, directory: Path) -> Path:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(model.state_dict(), directory, max_shard_size="200KB")
    [index] = directory.glob("*.safetensors.index.json")
    assert len(json.loads(index.read_text())["weight_map"]) == len(model.state_dict())
    return index


def write_dcp(model: nn.Module, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP notes that it runs without a process group
        dcp.save({"model": model.state_dict(), "step": 7}, checkpoint_id=directory)


LAYOUTS = ["lightning", "timm", "examples", "safetensors", "sharded", "dcp", "legacy", "whole_model"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict[str, torch.Tensor]]]:
    """(layout, model) -> (path to give the loaders, the state dict they must produce)."""
    from safetensors.torch import save_file

    writers = {
        "lightning": write_lightning, "timm": write_timm, "examples": write_examples,
        "safetensors": lambda m, p: save_file(m.state_dict(), p),
        "sharded": lambda m, p: write_sharded(m, p.parent), "dcp": write_dcp,
        "legacy": lambda m, p: torch.save({"model." + k: v for k, v in m.state_dict().items()}, p,
                                          _use_new_zipfile_serialization=False),
        "whole_model": lambda m, p: torch.save(m, p),
    }
    out = {}
    for name in MODELS:
        root = tmp_path_factory.mktemp(name)
        for layout, write in writers.items():
            model, path = trained_copy(name), root / layout / "ckpt"
            path.parent.mkdir()
            path = write(model, path) or path  # the sharded writer returns its index
            # the state as written (Lightning's one training step updates BatchNorm statistics)
            out[layout, name] = path, {k: v.clone() for k, v in model.state_dict().items()}
    return out


def assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(state) == sorted(expected)
    for k, v in expected.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


# ----------------------------------------------------------------------------- every layout, every entry point


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_everywhere(written, tmp_path, capsys, layout, name):
    path, expected = written[layout, name]
    weights = checkpoint.load_weights(path)
    assert weights.state  # a readable layout, recognised from its content

    model = build(name)
    diff = checkpoint.load_into(model, path)  # strict: every key fits after alignment
    assert diff.ok
    assert_same(model.state_dict(), expected)

    model = build(name)
    args = argparse.Namespace(init_from=str(path), checkpoint_key=None, remap=[], min_match=0.5)
    resume.init_from(args, model, CPU)
    assert_same(model.state_dict(), expected)

    capsys.readouterr()
    assert cli_main(["inspect", str(path), "--model", name]) == 0
    assert "strict load: would succeed" in capsys.readouterr().out

    assert cli_main(["convert", str(path), str(tmp_path / "ours.pt"), "--model", name]) == 0
    assert_same(checkpoint.load_checkpoint(tmp_path / "ours.pt", "cpu")["model"], expected)
    assert cli_main(["export", str(path), str(tmp_path / "w.safetensors"), "--model", name]) == 0
    assert_same(checkpoint.load_weights(tmp_path / "w.safetensors").state, expected)


def test_lightning_inspect_lists_the_layout_and_stand_ins(written, capsys):
    path, _ = written["lightning", "fastnet_small"]
    assert cli_main(["inspect", str(path), "--model", "fastnet_small"]) == 0
    out = capsys.readouterr().out
    assert "Lightning checkpoint (pytorch-lightning" in out and "weights under 'state_dict'" in out
    assert "lightning.fabric.utilities.data.AttributeDict" in out  # stood in for, never imported
    assert "aligned: removed `model.` from" in out and "strict load: would succeed" in out
    weights = checkpoint.load_weights(path)
    assert not any(k.startswith("model.") for k in checkpoint.align_prefixes(
        weights.state, build("fastnet_small").state_dict())[0])


def test_timm_ema_weights_by_checkpoint_key(written, tmp_path):
    path, expected = written["timm", "resnet18"]
    weights = checkpoint.load_weights(path)
    assert weights.chosen == "state_dict" and weights.weight_sets == ["state_dict", "state_dict_ema"]
    assert "--checkpoint-key" in weights.note
    assert_same(weights.state, expected)
    ema = checkpoint.load_weights(path, checkpoint_key="state_dict_ema").state
    assert torch.equal(ema["conv1.weight"], expected["conv1.weight"] + 1)
    model = build("resnet18")
    assert checkpoint.load_into(model, path, checkpoint_key="state_dict_ema").ok
    assert torch.equal(model.conv1.weight, expected["conv1.weight"] + 1)
    with pytest.raises(checkpoint.CheckpointFormatError, match="'state_dict', 'state_dict_ema'"):
        checkpoint.load_weights(path, checkpoint_key="teacher")


def test_teacher_student_in_one_dict_is_ambiguous(tmp_path):
    state = build("fastnet_small").state_dict()
    path = tmp_path / "distill.pt"
    torch.save({**{"teacher." + k: v for k, v in state.items()}, **{"student." + k: v + 1 for k, v in state.items()}},
               path)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"ambiguous.*--remap student\.=.*--remap teacher\.="):
        checkpoint.load_into(build("fastnet_small"), path)
    model = build("fastnet_small", seed=3)
    assert checkpoint.load_into(model, path, checkpoint_key="teacher").ok
    assert_same(model.state_dict(), state)


def test_added_prefix_is_aligned(tmp_path):
    model = build("fastnet_small")
    wrapped = nn.Sequential()
    wrapped.add_module("backbone", build("fastnet_small", seed=4))
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    diff = checkpoint.load_into(wrapped, path)
    assert diff.ok and diff.notes == [f"aligned: added `backbone.` to {len(model.state_dict())} keys"]
    assert_same(wrapped.backbone.state_dict(), model.state_dict())


def test_init_from_that_loads_nothing_refuses(written, tmp_path, tiny_cifar):
    path, _ = written["lightning", "resnet18"]
    model = build("fastnet_small")
    args = argparse.Namespace(init_from=str(path), checkpoint_key=None, remap=[], min_match=0.5)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"only 0% of .*--min-match 0"):
        resume.init_from(args, model, CPU)
    result = run_module(["ddp.train", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "32",
                         "--model", "fastnet_small", "--epochs", "1", "--init-from", str(path),
                         "--checkpoint-dir", str(tmp_path / "ck"), "--logdir", str(tmp_path / "runs")], tmp_path)
    assert result.returncode != 0 and "--min-match" in result.stdout + result.stderr
    assert not (tmp_path / "ck" / "latest.pt").exists()  # nothing trained from scratch


def test_evaluate_reads_foreign_layouts(written, tmp_path, tiny_cifar):
    for layout in ["lightning", "dcp"]:
        path, _ = written[layout, "fastnet_small"]
        result = run_module(["ddp.evaluate", "--checkpoint", str(path), "--model", "fastnet_small",
                             "--data-dir", str(tiny_cifar), "--device", "cpu"], tmp_path)
        assert result.returncode == 0, result.stderr
        assert "accuracy" in result.stdout


# ----------------------------------------------------------------------------- hostile variants: refused, nothing runs


def test_payload_in_a_lightning_callback_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    write_lightning(build("fastnet_small"), path, extra_callback_state=Payload(marker))
    for load in (checkpoint.load_weights, checkpoint.read_checkpoint):
        with pytest.raises(checkpoint.UntrustedPickleError, match=r"calls posix\.system.*nothing from the file"):
            load(path)
    assert not marker.exists()


def test_payload_beside_a_safetensors_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = build("fastnet_small").state_dict()
    # a pickle wearing a .safetensors name: recognised by content, refused
    torch.save({"model": state, "x": Payload(marker)}, tmp_path / "model.safetensors")
    with pytest.raises(checkpoint.UntrustedPickleError):
        checkpoint.load_weights(tmp_path / "model.safetensors")
    # a shard index (Hugging Face's .bin flavour) whose shard carries a payload
    shards = tmp_path / "sharded"
    shards.mkdir()
    torch.save({**state, "x": Payload(marker)}, shards / "pytorch_model-00001-of-00001.bin")
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in state}}))
    with pytest.raises(checkpoint.UntrustedPickleError):
        checkpoint.load_weights(shards)
    # an index that points outside its directory
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(checkpoint.CheckpointFormatError, match="outside its directory"):
        checkpoint.load_weights(shards / "pytorch_model.bin.index.json")
    assert not marker.exists()


def test_payload_in_a_whole_pickled_model_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    model = build("fastnet_small")
    model.hook = Payload(marker)  # an attribute of the pickled module
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(checkpoint.UntrustedPickleError, match="posix.system"):
        checkpoint.load_weights(tmp_path / "whole.pt")
    assert not marker.exists()


@pytest.mark.parametrize("callable_name", ["eval", "exec", "getattr", "__import__"])
def test_builtins_in_a_pickle_are_refused(tmp_path, callable_name):
    class Evil:
        def __reduce__(self):
            return (getattr(__builtins__, callable_name, None) or __builtins__[callable_name], ("1",))

    torch.save({"state_dict": build("fastnet_small").state_dict(), "x": Evil()}, tmp_path / "e.pt")
    with pytest.raises(checkpoint.UntrustedPickleError, match=f"builtins.{callable_name}"):
        checkpoint.load_weights(tmp_path / "e.pt")


def test_resume_from_our_checkpoint_converted_to_dcp(tmp_path):
    common = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "32", "--model", "fastnet_small",
              "--logdir", str(tmp_path / "runs")]
    first = run_module(["ddp.train", *common, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "a")], tmp_path)
    assert first.returncode == 0, first.stderr
    ours = tmp_path / "a" / "latest.pt"
    assert cli_main(["convert", str(ours), str(tmp_path / "dcp"), "--to", "dcp"]) == 0
    saved, back = checkpoint.load_checkpoint(ours, "cpu"), checkpoint.read_checkpoint(tmp_path / "dcp").obj
    assert back["format"] == checkpoint.FORMAT and back["progress"] == saved["progress"]
    assert_same(back["model"], saved["model"])
    assert torch.equal(back["rng"]["torch"], saved["rng"]["torch"])
    for index, state in saved["optimizer"]["state"].items():
        assert torch.equal(back["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    resumed = run_module(["ddp.train", *common, "--epochs", "2", "--resume", str(tmp_path / "dcp"),
                          "--checkpoint-dir", str(tmp_path / "b")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'dcp'}: epoch 1" in resumed.stdout and "epoch 2/2" in resumed.stdout
