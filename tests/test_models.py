from __future__ import annotations

import pytest
import torch

from conftest import run_module, write_cifar_dir
from ddp import data, models


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("num_classes", [10, 7])
def test_models_map_cifar_batches_to_logits(name, num_classes):
    model = models.build(name, num_classes=num_classes)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (4, num_classes)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in model.state_dict())


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet50'; one of: fastnet.*torchvision:NAME"):
        models.build("resnet50")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_any_torchvision_classification_model_by_name(name):
    model = models.build(f"torchvision:{name}", num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="'fcn_resnet50' is not a torchvision classification model"):
        models.build("torchvision:fcn_resnet50")  # a segmentation model


def test_register_decorator_and_module_colon_name(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(MY_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))  # registrations stay inside this test
    model = models.build("my_models:tinynet", num_classes=7)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7) and "tinynet" in models.MODELS
    with pytest.raises(ValueError, match="'tinynet' is already registered"):
        models.register("tinynet")(lambda num_classes=10: None)
    with pytest.raises(ValueError, match="module 'my_models' registers no model 'other'.*register\\('other'\\)"):
        models.build("my_models:other")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'.*PYTHONPATH"):
        models.build("no_such_module:net")


# The README's example of bringing your own model, verbatim in spirit: a file beside the repository.
MY_MODELS = """
from torch import nn

from ddp.models import register


@register("tinynet")
def tinynet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
"""


def test_your_own_model_on_cifar100_trains_evaluates_inspects_and_resumes_with_only_its_model_flag(tmp_path):
    """`--model my_models:tinynet --dataset cifar100` once; later commands take the data set and class count from
    the checkpoint, and the model only from the user: a name in a file never imports its module."""
    (tmp_path / "my_models.py").write_text(MY_MODELS)
    write_cifar_dir(tmp_path / "data", per_batch=40, dataset="cifar100")
    common = ["--data-dir", "data", "--batch-size", "40", "--optimizer", "sgd", "--lr", "0.05", "--bn-bias-lr-scale", "1"]
    first = run_module(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "ddp.train", "--model", "my_models:tinynet",
                        "--dataset", "cifar100", "--epochs", "1", *common], cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert "my_models:tinynet" in first.stdout and "cifar100: 200 train / 40 test images" in first.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["config"]["model"] == "my_models:tinynet" and ckpt["config"]["num_classes"] == 100
    assert ckpt["model"]["9.weight"].shape == (100, 32)

    # the module is importable from here, yet the recorded name alone imports nothing: each command says what to pass
    for command in (["ddp.evaluate", "--checkpoint", "checkpoints/latest.pt", "--data-dir", "data"],
                    ["ddp.checkpoint", "inspect", "checkpoints/latest.pt", "--model"],
                    ["ddp.checkpoint", "export", "checkpoints/latest.pt", "tinynet.safetensors"],
                    ["ddp.train", "--epochs", "2", *common]):
        refused = run_module(command, cwd=tmp_path)
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "pass --model my_models:tinynet if you trust that module" in out, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    mine = ["--model", "my_models:tinynet"]
    evaluated = run_module(["ddp.evaluate", "--checkpoint", "checkpoints/latest.pt", "--data-dir", "data", *mine],
                           cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "my_models:tinynet on 40 cifar100 test images" in evaluated.stdout
    inspected = run_module(["ddp.checkpoint", "inspect", "checkpoints/latest.pt", *mine], cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert "vs my_models:tinynet (100 classes)" in inspected.stdout
    exported = run_module(["ddp.checkpoint", "export", "checkpoints/latest.pt", "tinynet.safetensors", *mine],
                          cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    evaluated = run_module(["ddp.evaluate", "--checkpoint", "tinynet.safetensors", "--data-dir", "data", *mine],
                           cwd=tmp_path)
    assert "my_models:tinynet on 40 cifar100 test images" in evaluated.stdout, evaluated.stderr[-2000:]
    resumed = run_module(["ddp.train", "--epochs", "2", *mine, *common], cwd=tmp_path)  # no --dataset
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "resumed from checkpoints/latest.pt: epoch 1" in resumed.stdout and "epoch 2/2" in resumed.stdout
    assert "--dataset" not in resumed.stdout  # only --epochs is noted as changed
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["my_models_tinynet-cifar100-seed0"]


def test_whitening_init_decorrelates_patches():
    model = models.build("fastnet")
    images = data.normalize(data.synthetic_cifar10(256, train=True)[0])
    model.init_whitening(images)
    with torch.no_grad():
        out = model.whiten(images)[:, :12]  # the first half: eigenvectors; the second: negatives
    feats = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(feats.T)
    assert torch.allclose(cov.diagonal(), torch.ones(12), atol=0.05)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.05
