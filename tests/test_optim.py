"""ddp.optim: Muon and SGD parameter groups, the LR schedules, mixed precision choice and lookahead (with checkpointing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddp import config, models
from ddp.checkpoint import load_checkpoint, make_checkpoint, restore_checkpoint, save_checkpoint
from ddp.optim import (
    Lookahead,
    Muon,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    freeze_whiten_bias,
    orthogonalize,
)


def groups_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


@pytest.mark.parametrize("optimizer", ["muon", "sgd"])
def test_optimizer_trains_unfrozen_parameters_once_in_named_groups(optimizer):
    model = models.build("fastnet")
    args = config.parse_args(["--optimizer", optimizer, "--lr", "0.5", "--weight-decay", "0.01",
                              "--bn-bias-lr-scale", "10", "--muon-lr", "0.3", "--muon-momentum", "0.5"])
    groups = groups_by_name(build_optimizer(model, args))
    bn_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    assert {id(p) for p in groups["bn_biases"]["params"]} == {id(p) for p in bn_biases}
    assert [id(p) for p in groups["whiten_bias"]["params"]] == [id(model.whiten.bias)]
    for name in ("bn_biases", "whiten_bias"):  # 10x the LR, a tenth of the decay: the same decay per step
        assert groups[name]["lr"] == 5.0 and groups[name]["weight_decay"] == pytest.approx(0.001)
    assert groups["other"]["lr"] == 0.5 and groups["other"]["weight_decay"] == 0.01
    if optimizer == "muon":
        assert {id(p) for p in groups["filters"]["params"]} == {id(p) for p in filters}
        assert groups["filters"]["orthogonalize"] and not groups["other"]["orthogonalize"]
        assert (groups["filters"]["lr"], groups["filters"]["momentum"], groups["filters"]["weight_decay"]) == (0.3, 0.5, 0)
        assert [id(p) for p in groups["other"]["params"]] == [id(model.head.weight)]
    else:
        assert "filters" not in groups and groups["other"]["nesterov"]
    trained = [id(p) for group in groups.values() for p in group["params"]]
    assert sorted(trained) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    frozen = {id(model.whiten.weight), *(id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d))}
    assert not frozen & set(trained) and len(trained) == len(list(model.parameters())) - len(frozen)


@pytest.mark.parametrize("shape", [(64, 216), (300, 40)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, -1, shape[1]) * 1e-3
    assert torch.linalg.svdvals(g)[0] / torch.linalg.svdvals(g)[-1] > 5  # a spread of scales in, ...
    u = orthogonalize(g)
    assert u.shape == g.shape and u.dtype == g.dtype
    s = torch.linalg.svdvals(u)
    assert 0.5 < s.min() and s.max() < 1.5, s  # ... all near 1 out (3 quintic steps: not exactly 1)


def test_muon_sgd_groups_step_exactly_as_torch_sgd_and_filters_keep_their_norm():
    torch.manual_seed(0)
    conv, head = nn.Parameter(torch.randn(8, 4, 3, 3)), nn.Parameter(torch.randn(10, 8))
    twin = nn.Parameter(head.detach().clone())
    muon = Muon([{"params": [conv], "orthogonalize": True, "lr": 0.1, "momentum": 0.6, "weight_decay": 0.0},
                 {"params": [head]}], lr=0.5, momentum=0.85, weight_decay=0.01)
    sgd = torch.optim.SGD([twin], lr=0.5, momentum=0.85, nesterov=True, weight_decay=0.01, foreach=False)
    for step in range(4):
        grads = torch.randn(8, 4, 3, 3), torch.randn(10, 8)
        conv.grad, head.grad, twin.grad = grads[0], grads[1], grads[1].clone()
        before = conv.detach().clone()
        muon.step()
        sgd.step()
        assert torch.equal(head, twin)  # the SGD groups: torch's SGD, Nesterov, coupled weight decay
        # The filters: rescaled to norm sqrt(8), then moved by an orthogonalised step of size ~lr per direction.
        rescaled = before * 8 ** 0.5 / before.norm()
        update = (rescaled - conv.detach()).reshape(8, -1) / 0.1
        assert 0.3 < torch.linalg.svdvals(update).min() and torch.linalg.svdvals(update).max() < 1.6
    assert set(muon.state_dict()["state"][0]) == {"momentum_buffer"}


def test_muon_state_resumes_bitwise_through_a_checkpoint_file(tmp_path):
    def steps(model, optimizer, first, last):
        for step in range(first, last):
            x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()

    def build(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 2))
        return model, build_optimizer(model, config.parse_args(["--lr", "0.01"]))  # Muon for the conv

    model, optimizer = build()
    steps(model, optimizer, 0, 3)
    save_checkpoint(make_checkpoint(model, optimizer, None, None, None, progress={}, metrics={}, config={},
                                    world_size=1, device_type="cpu"), tmp_path / "latest.pt")
    steps(model, optimizer, 3, 6)
    resumed, resumed_optimizer = build(seed=1)  # other initial weights: everything must come from the file
    restore_checkpoint(load_checkpoint(tmp_path / "latest.pt", "cpu"), resumed, resumed_optimizer)
    steps(resumed, resumed_optimizer, 3, 6)
    assert model[0].weight.isfinite().all() and not torch.equal(model[0].weight, build()[0][0].weight)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


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


def test_whitening_bias_lr_reaches_zero_when_it_is_frozen():
    model = models.build("fastnet_small")
    args = config.parse_args(["--warmup-epochs", "0"])
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=40, whiten_bias_steps=10)
    groups = groups_by_name(optimizer)
    lrs = []
    for _ in range(41):
        lrs.append((groups["whiten_bias"]["lr"] / args.bn_bias_lr_scale, groups["other"]["lr"]))
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx((args.lr, args.lr)) and lrs[5][0] == pytest.approx(args.lr / 2)
    assert lrs[10][0] == 0 and lrs[20] == (0, pytest.approx(args.lr / 2)) and lrs[40] == (0, 0)
    # The trainer freezes the bias at that epoch boundary (and rebuilds DDP); no-op for nets without one.
    assert not freeze_whiten_bias(model, 0, 3) and model.whiten.bias.requires_grad
    assert freeze_whiten_bias(model, 3, 3) and not model.whiten.bias.requires_grad
    assert not freeze_whiten_bias(model, 4, 3)
    assert freeze_whiten_bias(model, 2, 3) and model.whiten.bias.requires_grad  # a resume before the boundary
    assert not freeze_whiten_bias(models.build("resnet18"), 5, 3)


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
