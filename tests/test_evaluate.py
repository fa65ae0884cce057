"""Test-time augmentation: which views each --tta level averages, on a real model."""

from __future__ import annotations

import torch

from ddp import models
from ddp.evaluate import tta_logits


@torch.no_grad()
def test_unsure_gives_the_least_confident_quarter_all_six_views_and_the_rest_one():
    torch.manual_seed(0)
    model = models.build("fastnet_small", 10).eval()
    x = torch.randn(40, 3, 32, 32)
    one, six, unsure = (tta_logits(model, x, tta) for tta in ("none", "full", "unsure"))
    confidence = one.softmax(1).amax(1)
    doubtful = confidence.argsort()[:10]  # ceil(0.25 * 40)
    assert set(torch.nonzero((unsure != one).any(1)).flatten().tolist()) == set(doubtful.tolist())
    torch.testing.assert_close(unsure[doubtful], six[doubtful])
    sure = confidence.argsort()[10:]
    assert torch.equal(unsure[sure], one[sure])
    assert not torch.allclose(six[doubtful], one[doubtful])  # the views do change those images' logits
