"""The optimisation recipe: Muon or SGD over parameter groups, the LR schedule, mixed precision and lookahead."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from ddp.dist import log, native_bf16
from ddp.muon import Muon


def whiten_bias(model: nn.Module) -> nn.Parameter | None:
    """The bias of fastnet's whitening layer (a conv named `whiten`), or None for models without one."""
    whiten = getattr(model, "whiten", None)
    return whiten.bias if isinstance(whiten, nn.Conv2d) else None


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """--optimizer over named parameter groups: conv filters (Muon's), BatchNorm biases, the whitening bias, the rest.

    BatchNorm biases and the whitening bias train at --bn-bias-lr-scale times the LR, with the weight decay
    divided by it (the decay per step stays the same). With SGD the filters are part of "other". Frozen
    parameters (requires_grad False, like fastnet's BatchNorm scales) are left out.
    """
    muon = args.optimizer == "muon"
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    bias = whiten_bias(model)
    whiten_bias_ids = {id(bias)} if bias is not None else set()
    trained = [p for p in model.parameters() if p.requires_grad]
    scale = args.bn_bias_lr_scale
    biases = {"lr": args.lr * scale, "weight_decay": args.weight_decay / scale}
    groups = [
        {"name": "filters", "params": [p for p in trained if muon and p.ndim == 4], "orthogonalize": True,
         "lr": args.muon_lr, "momentum": args.muon_momentum, "weight_decay": 0.0},
        {"name": "other", "params": [p for p in trained if not (muon and p.ndim == 4)
                                     and id(p) not in bn_biases | whiten_bias_ids]},
        {"name": "bn_biases", "params": [p for p in trained if id(p) in bn_biases], **biases},
        {"name": "whiten_bias", "params": [p for p in trained if id(p) in whiten_bias_ids], **biases},
    ]
    groups = [g for g in groups if g["params"]]  # with SGD, "filters" is empty
    if muon:
        return Muon(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0,
                           weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    whiten_bias_steps: int | None = None):
    """Per-step schedule: linear warm-up from 0.2x to the peak LR, then linear decay to zero.

    The group named "whiten_bias" instead decays linearly to zero over its first `whiten_bias_steps`
    (after which the trainer freezes it, see `freeze_whiten_bias`).
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.2 + 0.8 * step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    def whiten_factor(step: int) -> float:
        return max(0.0, 1 - step / max(1, whiten_bias_steps))

    use_whiten = whiten_bias_steps is not None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        whiten_factor if use_whiten and g.get("name") == "whiten_bias" else factor for g in optimizer.param_groups])


def freeze_whiten_bias(model: nn.Module, epoch: int, whiten_bias_epochs: int) -> bool:
    """Train the whitening layer's bias for the first `whiten_bias_epochs` only; True if this call changed it.

    Its LR has decayed to zero by then; frozen, it needs no gradient, so the backward pass stops at the
    first conv group (a few percent of a step). DDP hooks the parameters that train when it is built:
    rebuild it when this returns True.
    """
    bias = whiten_bias(model)
    if bias is None:
        return False
    trains = epoch < whiten_bias_epochs
    changed = bias.requires_grad != trains
    bias.requires_grad_(trains)
    return changed


AMP_CHOICES = ["auto", "none", "bf16", "fp16"]  # --amp of ddp.train and ddp.evaluate


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The --amp choice as an autocast dtype on this device, or None for float32."""
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "none"
    if amp == "fp16" and device.type != "cuda":
        log(f"--amp fp16 needs CUDA; training in float32 on {device.type} (bf16 works on CPUs)")
        amp = "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on this device; no-op for None (float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class Lookahead:
    """Every `every` steps, pull the weights back toward a slow copy, and set the slow copy as the weights.

    airbench's schedule: the pull (decay) grows as max_decay * (step / total)^3, so early training is
    plain SGD and late training averages away the noise of the high learning rate; at the last step the
    weights become the slow copy. Every float tensor of the state dict takes part, BatchNorm's running
    statistics included, so they stay consistent with the weights.
    """

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5, max_decay: float = 0.95 ** 5):
        self.fast = {k: t for k, t in model.state_dict().items() if t.is_floating_point()}  # live views
        self.slow = {k: t.detach().clone() for k, t in self.fast.items()}
        self.total_steps, self.every, self.max_decay = total_steps, every, max_decay

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Call after each optimizer step with the number of steps taken so far."""
        if step == self.total_steps:
            decay = 1.0
        elif step % self.every == 0:
            decay = self.max_decay * (step / self.total_steps) ** 3
        else:
            return
        for name, fast in self.fast.items():
            self.slow[name].lerp_(fast, 1 - decay)
            fast.copy_(self.slow[name])

    @torch.no_grad()
    def reset(self) -> None:
        """Make the slow copy equal to the current weights (e.g. after loading weights saved without it)."""
        for name, fast in self.fast.items():
            self.slow[name].copy_(fast)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.slow

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.slow.keys():
            raise ValueError(f"lookahead state has keys {sorted(state)[:3]}..., expected {sorted(self.slow)[:3]}...")
        for name, tensor in state.items():
            self.slow[name].copy_(tensor)
