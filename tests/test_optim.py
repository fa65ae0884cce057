"""ddp.optim: parameter groups, the LR schedule, mixed precision choice and lookahead (with its checkpointing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddp import config, models
from ddp.checkpoint import load_checkpoint, make_checkpoint, restore_checkpoint, save_checkpoint
from ddp.optim import Lookahead, autocast_dtype, build_optimizer, build_scheduler


def test_optimizer_trains_unfrozen_parameters_once_and_boosts_batchnorm_biases():
    model = models.build("fastnet")
    args = config.parse_args(["--lr", "0.5", "--weight-decay", "0.01", "--bn-bias-lr-scale", "10"])
    plain_group, bias_group = build_optimizer(model, args).param_groups
    bn_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in bias_group["params"]} == {id(p) for p in bn_biases}
    assert bias_group["lr"] == 5.0 and bias_group["weight_decay"] == pytest.approx(0.001)
    assert plain_group["lr"] == 0.5 and plain_group["weight_decay"] == 0.01
    trained = [id(p) for group in (plain_group, bias_group) for p in group["params"]]
    assert sorted(trained) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    frozen = {id(model.whiten.weight), *(id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d))}
    assert not frozen & set(trained) and len(trained) == len(list(model.parameters())) - len(frozen)


def test_schedule_warms_up_from_a_fifth_then_decays_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=10, total_steps=50)
    lrs = []
    for _ in range(51):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[5] == pytest.approx(0.6) and lrs[10] == pytest.approx(1.0)
    assert lrs[30] == pytest.approx(0.5) and lrs[50] == 0.0


def test_autocast_dtype_follows_the_flag_and_the_hardware(capsys):
    cpu = torch.device("cpu")
    assert autocast_dtype("none", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cpu) is None
    assert "--amp fp16 needs CUDA" in capsys.readouterr().out
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if native else None)


def tiny_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def sgd_steps(model, optimizer, lookahead, first, last):
    """Steps first+1 .. last; the batch of each step depends only on its number."""
    for step in range(first + 1, last + 1):
        loss = model(torch.randn(16, 4, generator=torch.Generator().manual_seed(step))).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lookahead.step(step)


def test_lookahead_pulls_weights_and_batchnorm_statistics_toward_the_slow_copy():
    model = tiny_bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lookahead = Lookahead(model, total_steps=12, every=5, max_decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sgd_steps(model, optimizer, lookahead, 0, 4)
    assert not torch.equal(lookahead.slow["0.weight"], model[0].weight)  # no pull between every-th steps
    assert torch.equal(lookahead.slow["0.weight"], before["0.weight"])
    fast = {k: v.clone() for k, v in model.state_dict().items()}
    sgd_steps(model, optimizer, lookahead, 4, 5)  # step 5: slow += (1 - decay) (fast - slow), fast = slow
    decay = 0.5 * (5 / 12) ** 3
    no_pull = tiny_bn_model()  # the same run without lookahead: the fast weights at step 5
    sgd_steps(no_pull, torch.optim.SGD(no_pull.parameters(), lr=0.1), Lookahead(no_pull, 99, every=99), 0, 5)
    for name in ["0.weight", "1.running_mean", "1.running_var", "2.bias"]:
        expected = before[name] + (1 - decay) * (no_pull.state_dict()[name] - before[name])
        assert torch.allclose(model.state_dict()[name], expected, atol=1e-6), name
        assert torch.equal(model.state_dict()[name], lookahead.slow[name])
    assert not torch.equal(model.state_dict()["0.weight"], fast["0.weight"])
    sgd_steps(model, optimizer, lookahead, 5, 12)  # the last step sets the weights to the slow copy
    assert all(torch.equal(model.state_dict()[k], lookahead.slow[k]) for k in lookahead.slow)


def test_lookahead_state_resumes_bitwise_through_a_checkpoint_file(tmp_path):
    model = tiny_bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lookahead = Lookahead(model, total_steps=20, every=5)
    sgd_steps(model, optimizer, lookahead, 0, 7)  # stop between two pulls: the slow copy differs from the weights
    ckpt = make_checkpoint(model, optimizer, None, None, lookahead, progress={}, metrics={}, config={},
                           world_size=1, device_type="cpu")
    save_checkpoint(ckpt, tmp_path / "latest.pt")
    sgd_steps(model, optimizer, lookahead, 7, 20)
    straight = model.state_dict()

    model = tiny_bn_model(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lookahead = Lookahead(model, total_steps=20, every=5)
    restore_checkpoint(load_checkpoint(tmp_path / "latest.pt", "cpu"), model, optimizer, lookahead=lookahead)
    sgd_steps(model, optimizer, lookahead, 7, 20)
    assert all(torch.equal(v, straight[k]) for k, v in model.state_dict().items())


def test_checkpoint_without_lookahead_state_starts_the_slow_copy_from_the_loaded_weights():
    saved = tiny_bn_model(seed=1)
    ckpt = make_checkpoint(saved, None, None, None, progress={}, metrics={}, config={}, world_size=1,
                           device_type="cpu")
    model = tiny_bn_model()
    lookahead = Lookahead(model, total_steps=10)
    restore_checkpoint(ckpt, model, lookahead=lookahead)
    assert all(torch.equal(lookahead.slow[k], saved.state_dict()[k]) for k in lookahead.slow)
