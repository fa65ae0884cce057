"""Muon: momentum orthogonalised by Newton-Schulz for conv filter banks, in the hardware's native precision,
batched by shape and sharded across ranks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from ddp.dist import native_bf16

# Banks of one shape are orthogonalised in one batched matrix-product chain while the batch holds at most
# this many elements: small banks gain from it (2x for fastnet's 64x576 on a Xeon), large ones do not, and
# alone they are units that ranks can share out evenly.
BATCH_NUMEL = 1 << 19


@torch.no_grad()
def newton_schulz(x: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Roughly U V^T of each matrix x = U S V^T (x: (rows, cols) or a batch (n, rows, cols)), in x's dtype.

    airbench94_muon's quintic coefficients and 3 steps: the singular values end up between about 0.5 and
    1.5, not at 1, which trains as well and costs fewer matrix products.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values <= 1, where the iteration converges
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.bfloat16, steps: int = 3) -> torch.Tensor:
    """Newton-Schulz on g (a matrix or a batch of them) computed in `dtype`, returned in g's dtype."""
    return newton_schulz(g.to(dtype), steps).to(g.dtype)


def ns_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively (the rule of --amp auto), else float32.

    Emulated bf16 is 12-15x slower than float32 for these products (AMD Zen 3).
    """
    return torch.bfloat16 if native_bf16(device) else torch.float32


def shard_plan(shapes: Sequence[tuple[int, int]], world_size: int, batched: bool = True) -> list[tuple[int, list[int]]]:
    """Units of work (indices of banks orthogonalised together) and the rank that owns each: [(owner, unit)].

    Units depend only on the shapes (banks of one shape, in order, while under BATCH_NUMEL), never on the
    world size, so each unit's result has the same bits whichever rank computes it. Owners: the largest
    unit first to the least loaded rank (the lowest on a tie), by the products' cost 2 m^2 n + m^3.
    """
    units: list[list[int]] = []
    open_unit: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        unit = open_unit.get(shape)
        if batched and unit is not None and (len(unit) + 1) * shape[0] * shape[1] <= BATCH_NUMEL:
            unit.append(i)
        else:
            open_unit[shape] = [i]
            units.append(open_unit[shape])

    def cost(unit: list[int]) -> int:
        m, n = sorted(shapes[unit[0]])
        return len(unit) * (2 * m * m * n + m ** 3)

    load, owner = [0] * world_size, [0] * len(units)
    for u in sorted(range(len(units)), key=lambda u: (-cost(units[u]), u)):
        owner[u] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner[u]] += cost(units[u])
    return list(zip(owner, units))


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `orthogonalize`, SGD with Nesterov momentum for the others: one optimizer.

    One object, so that checkpoints, the LR scheduler and GradScaler see a single optimizer whose state
    is a momentum buffer per parameter. An orthogonalised tensor (a conv filter bank) is flattened to
    (out_channels, rest); before each step it is rescaled to norm sqrt(out_channels), as airbench94_muon
    does, since its update has a fixed size whatever the gradient's. Weight decay applies to SGD groups.

    Newton-Schulz runs in `ns_dtype` (default: `ns_dtype_for` the parameters' device). With a process
    group of W > 1 ranks and `sharded`, each rank orthogonalises its share of the banks (`shard_plan`) and
    one all-gather shares the results: every rank applies the same bits. Without one, all runs here.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype | None = None, batched: bool = True, sharded: bool = True):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "orthogonalize": False})
        device = self.param_groups[0]["params"][0].device
        self.ns_dtype = ns_dtype if ns_dtype is not None else ns_dtype_for(device)
        self.batched, self.sharded = batched, sharded

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        banks: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (filter bank, its update, lr)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and not group["orthogonalize"]:
                    g = g.add(p, alpha=group["weight_decay"])
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                g = g.add(buf, alpha=group["momentum"])  # Nesterov
                if group["orthogonalize"]:
                    banks.append((p, g.reshape(len(g), -1), group["lr"]))
                else:
                    p.add_(g, alpha=-group["lr"])
        for (p, _, lr), update in zip(banks, self._orthogonalize_all([g for _, g, _ in banks])):
            p.mul_(p.size(0) ** 0.5 / p.norm())
            p.add_(update.view_as(p).to(p.dtype), alpha=-lr)
        return loss

    def _orthogonalize_all(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Newton-Schulz of every matrix, in ns_dtype: this rank's units computed here, the others gathered."""
        shard = self.sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world, rank = (dist.get_world_size(), dist.get_rank()) if shard else (1, 0)
        plan = shard_plan([tuple(m.shape) for m in matrices], world, self.batched)
        out: list[torch.Tensor | None] = [None] * len(matrices)
        for owner, unit in plan:
            if owner != rank:
                continue
            x = matrices[unit[0]].to(self.ns_dtype) if len(unit) == 1 else torch.stack(
                [matrices[i] for i in unit]).to(self.ns_dtype)
            x = newton_schulz(x)
            for k, i in enumerate(unit):
                out[i] = x if len(unit) == 1 else x[k]
        if world > 1:
            self._share(matrices, plan, out, world, rank)
        return out

    def _share(self, matrices: list[torch.Tensor], plan: list[tuple[int, list[int]]],
               out: list[torch.Tensor | None], world: int, rank: int) -> None:
        """Fill `out` with the other ranks' results: one all-gather of each rank's results, flat and padded."""
        owned = [[i for owner, unit in plan if owner == r for i in unit] for r in range(world)]
        sizes = [sum(matrices[i].numel() for i in banks) for banks in owned]
        flat = torch.zeros(max(sizes), dtype=self.ns_dtype, device=matrices[0].device)
        if owned[rank]:
            torch.cat([out[i].reshape(-1) for i in owned[rank]], out=flat[:sizes[rank]])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        for r in range(world):
            if r == rank:
                continue
            offset = 0
            for i in owned[r]:
                n = matrices[i].numel()
                out[i] = gathered[r][offset:offset + n].view_as(matrices[i])
                offset += n
