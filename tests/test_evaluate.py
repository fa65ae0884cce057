"""Test-time augmentation: which views each --tta level averages, on a real model and real process groups."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ddp import data, models
from ddp.dist import Context
from ddp.evaluate import UNSURE_SHARE, evaluate, tta_logits

IMAGES = 90  # 23 get all six views; neither world size nor batch size divides it


def model_and_set() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (IMAGES, 3, 32, 32), dtype=torch.uint8)
    model = models.build("fastnet_small", 10).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # an untrained net is equally unsure of everything: spread its confidences
    return model, images, torch.randint(0, 10, (IMAGES,))


def unsure_on_ranks(rank: int, world_size: int, store: str, batch_size: int, out: str) -> None:
    """One rank of `evaluate(..., tta="unsure")`; rank 0 saves (loss, accuracy)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model, images, labels = model_and_set()
        ctx = Context(rank, rank, world_size, torch.device("cpu"), "gloo")
        result = evaluate(model, images, labels, ctx, tta="unsure", batch_size=batch_size)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def test_unsure_gives_the_least_confident_quarter_of_the_set_all_six_views_at_any_world_size(tmp_path):
    torch.set_num_threads(1)
    model, images, labels = model_and_set()
    x = data.normalize(images)
    one, six = tta_logits(model, x, "none"), tta_logits(model, x, "full")
    doubtful = one.softmax(1).amax(1).argsort()[:math.ceil(UNSURE_SHARE * IMAGES)]
    expected = one.clone()
    expected[doubtful] = six[doubtful]
    assert not torch.allclose(six[doubtful], one[doubtful])  # the views do change those images' logits
    loss, acc = F.cross_entropy(expected, labels).item(), (expected.argmax(1) == labels).float().mean().item()
    assert not math.isclose(loss, F.cross_entropy(one, labels).item(), rel_tol=1e-3)  # and the loss, here

    for world_size, batch_size in [(1, 7), (2, 1000), (2, 5)]:
        out = tmp_path / f"w{world_size}b{batch_size}.pt"
        mp.spawn(unsure_on_ranks, args=(world_size, str(tmp_path / f"store{world_size}{batch_size}"), batch_size,
                                        str(out)), nprocs=world_size)
        got_loss, got_acc = torch.load(out)
        assert math.isclose(got_loss, loss, rel_tol=1e-4) and math.isclose(got_acc, acc, rel_tol=1e-6), (world_size, batch_size)
