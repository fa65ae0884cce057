from __future__ import annotations

import pytest
import torch

from ddp import data, models


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("num_classes", [10, 7])
def test_models_map_cifar_batches_to_logits(name, num_classes):
    model = models.build(name, num_classes=num_classes)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (4, num_classes)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in model.state_dict())


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet50'; choose one of fastnet"):
        models.build("resnet50")


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
