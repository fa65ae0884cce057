"""ddp.optim: Muon and SGD parameter groups, the LR schedules, mixed precision choice and lookahead (with checkpointing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ddp import config, models
from ddp.checkpoint import load_checkpoint, make_checkpoint, restore_checkpoint, save_checkpoint
from ddp.dist import native_bf16
from ddp.muon import BATCH_NUMEL, Muon, ns_dtype_for, orthogonalize, shard_plan
from ddp.optim import Lookahead, autocast_dtype, build_optimizer, build_scheduler, freeze_whiten_bias


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 216), (300, 40)])
def test_orthogonalize_brings_every_singular_value_near_one(shape, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, -1, shape[1]) * 1e-3
    assert torch.linalg.svdvals(g)[0] / torch.linalg.svdvals(g)[-1] > 5  # a spread of scales in, ...
    u = orthogonalize(g, dtype)
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


FASTNET_BANKS = [(64, 216), (64, 576), (256, 576), (256, 2304), (256, 2304), (256, 2304)]


def test_newton_schulz_runs_in_bf16_only_where_the_hardware_computes_it_natively():
    cpu = torch.device("cpu")
    native = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert native_bf16(cpu) == native and ns_dtype_for(cpu) is (torch.bfloat16 if native else torch.float32)
    assert ns_dtype_for(cpu) is (autocast_dtype("auto", cpu) or torch.float32)  # one rule for both
    model = models.build("fastnet_small")
    assert build_optimizer(model, config.parse_args([])).ns_dtype is ns_dtype_for(cpu)
    explicit = Muon([nn.Parameter(torch.zeros(2, 2))], lr=0.1, momentum=0.5, ns_dtype=torch.float32)
    assert explicit.ns_dtype is torch.float32


def test_kernels_held_to_avx2_count_as_no_native_bf16():
    """ATEN_CPU_CAPABILITY=avx2 makes any CPU compute like an AVX2-only one: float32 Newton-Schulz, no autocast."""
    probe = ("import torch; from ddp.dist import native_bf16; from ddp.muon import ns_dtype_for; "
             "from ddp.optim import autocast_dtype; cpu = torch.device('cpu'); "
             "print(torch.backends.cpu.get_cpu_capability(), native_bf16(cpu), ns_dtype_for(cpu), "
             "autocast_dtype('auto', cpu))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["AVX2", "False", "torch.float32", "None"]


def test_shard_plan_batches_small_banks_of_a_shape_and_balances_ranks_independently_of_the_world_size():
    shapes = [(64, 576)] * 5 + [(128, 1152)] * 4 + FASTNET_BANKS
    units = {w: sorted(unit for _, unit in shard_plan(shapes, w)) for w in (1, 2, 3)}
    assert units[1] == units[2] == units[3]  # the same batches whichever rank computes them
    assert sorted(i for unit in units[1] for i in unit) == list(range(len(shapes)))
    assert [0, 1, 2, 3, 4, 10] in units[1] and [5, 6, 7] in units[1] and [8] in units[1]  # batched up to BATCH_NUMEL
    assert [12] in units[1] and [13] in units[1]  # a big bank alone
    assert all(len(u) * shapes[u[0]][0] * shapes[u[0]][1] <= BATCH_NUMEL or len(u) == 1 for u in units[1])
    assert [[i] for i in range(len(shapes))] == sorted(unit for _, unit in shard_plan(shapes, 1, batched=False))
    for world in (2, 3):
        def cost(i):
            m, n = sorted(shapes[i])
            return 2 * m * m * n + m ** 3
        load = [sum(cost(i) for owner, unit in shard_plan(shapes, world) if owner == r for i in unit)
                for r in range(world)]
        assert min(load) > 0 and max(load) < 0.7 * sum(load), load
    fastnet = [sum(1 for owner, unit in shard_plan(FASTNET_BANKS, 2) if owner == r for _ in unit) for r in (0, 1)]
    assert fastnet == [2, 4]  # two big banks on rank 0; the third big one and the three small ones on rank 1


def muon_steps(shapes, ns_dtype, batched=True, steps=3):
    """Filter banks (out, in, 3, 3) after `steps` Muon steps with gradients that depend only on the step."""
    params = [nn.Parameter(torch.randn(m, n // 9, 3, 3, generator=torch.Generator().manual_seed(i)))
              for i, (m, n) in enumerate(shapes)]
    optimizer = Muon([{"params": params, "orthogonalize": True}], lr=0.1, momentum=0.6, ns_dtype=ns_dtype,
                     batched=batched)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        optimizer.step()
    return [p.detach() for p in params]


BANKS = [(64, 216), (64, 576), (64, 576), (64, 576), (128, 576), (128, 1152), (32, 288)]


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_batched_newton_schulz_matches_one_bank_at_a_time(ns_dtype):
    batched, alone = muon_steps(BANKS, ns_dtype), muon_steps(BANKS, ns_dtype, batched=False)
    tol = 2e-2 if ns_dtype is torch.bfloat16 else 1e-4
    assert all(torch.allclose(a, b, atol=tol) for a, b in zip(batched, alone))
    assert not torch.equal(batched[0], muon_steps(BANKS, ns_dtype, steps=2)[0])  # the steps did move it


def sharded_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save({str(d): muon_steps(BANKS, d) for d in (torch.bfloat16, torch.float32)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sharded_muon_gives_every_rank_the_bits_of_the_single_process_step(tmp_path):
    mp.spawn(sharded_worker, args=(str(tmp_path / "store"), str(tmp_path / "params")), nprocs=2)
    ranks = [torch.load(tmp_path / f"params.{r}") for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for d in (torch.bfloat16, torch.float32):
            alone = muon_steps(BANKS, d)  # no process group: unsharded
            assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(alone, ranks[0][str(d)],
                                                                                  ranks[1][str(d)])), d
    finally:
        torch.set_num_threads(threads)
    assert {owner for owner, _ in shard_plan(BANKS, 2)} == {0, 1}  # both ranks did a share of the work


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
