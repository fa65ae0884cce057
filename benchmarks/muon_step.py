"""Muon's optimizer step: Newton-Schulz in bf16 vs float32, batched vs one bank at a time, sharded vs replicated.

The baseline is the old way, timed in the same run: every bank alone, in bf16, on every rank
(`Muon(ns_dtype=torch.bfloat16, batched=False, sharded=False)`). Workloads: fastnet's six filter banks,
a ResNet-18 512x4608 bank and all twenty of ResNet-18's banks in one process; fastnet's and all twenty of ResNet-18's banks with 2
processes (gloo, 1 thread each), where each rank's step is timed after a barrier.

    python -m benchmarks.muon_step            # 10 timed steps of each
    python -m benchmarks.muon_step --quick    # 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.common import Row, fmt_seconds, interleave, median, report
from ddp import models
from ddp.muon import Muon, ns_dtype_for, shard_plan

BF16, F32 = torch.bfloat16, torch.float32
VARIANTS = {  # name: (ns_dtype, batched); the first is the baseline
    "bf16, one at a time (old)": (BF16, False),
    "bf16, batched": (BF16, True),
    "float32, one at a time": (F32, False),
    "float32, batched": (F32, True),
}


def filter_banks(workload: str) -> list[torch.Size]:
    if workload == "resnet18 512x4608 bank":
        return [torch.Size([512, 512, 3, 3])]
    model = models.build(workload)
    return [p.shape for p in model.parameters() if p.ndim == 4 and p.requires_grad]


def make_muon(shapes: list[torch.Size], ns_dtype: torch.dtype, batched: bool, sharded: bool = True) -> Muon:
    """Muon over fresh banks of these shapes, each with a fixed random gradient (the time does not depend on it)."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return Muon([{"params": params, "orthogonalize": True}], lr=0.1, momentum=0.6, ns_dtype=ns_dtype,
                batched=batched, sharded=sharded)


def one_process(workloads: list[str], reps: int) -> list[Row]:
    rows = []
    for workload in workloads:
        shapes = filter_banks(workload)
        steps = {name: make_muon(shapes, *v).step for name, v in VARIANTS.items()}
        times = interleave(steps, reps=reps)
        old = median(times["bf16, one at a time (old)"])
        rows += [Row(f"{workload}: {name}, 1 process", fmt_seconds(median(t)), fmt_seconds(old), median(t) / old)
                 for name, t in times.items()]
    return rows


def two_ranks(rank: int, store: str, workloads: list[str], reps: int, out: str) -> None:
    """A rank of the 2-process run: sharded vs replicated steps, each after a barrier; rank 0 saves its times."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        dtype = ns_dtype_for(torch.device("cpu"))
        results = {}
        for workload in workloads:
            shapes = filter_banks(workload)
            steps = {"sharded": make_muon(shapes, dtype, True).step,
                     "replicated": make_muon(shapes, dtype, True, sharded=False).step,
                     "old": make_muon(shapes, BF16, False, sharded=False).step}
            times: dict[str, list[float]] = {name: [] for name in steps}
            for rep in range(reps + 1):  # the first round warms up
                for name, step in steps.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    step()
                    if rep:
                        times[name].append(time.perf_counter() - t0)
            results[workload] = times
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def cpu_name() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "unknown CPU")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="timed steps of each variant")
    p.add_argument("--quick", action="store_true", help="3 timed steps of each")
    args = p.parse_args()
    reps = 3 if args.quick else args.reps
    torch.set_num_threads(1)  # the trainer's: one thread per process

    one = ["fastnet", "resnet18 512x4608 bank", "resnet18"]
    rows = one_process(one, reps)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        workloads = ["fastnet", "resnet18"]
        mp.spawn(two_ranks, args=(os.path.join(tmp, "store"), workloads, reps, out), nprocs=2)
        results = torch.load(out)
    dtype = str(ns_dtype_for(torch.device("cpu"))).removeprefix("torch.")
    for workload, times in results.items():
        old = median(times["old"])
        rows += [Row(f"{workload}: {dtype} batched, {name}, 2 processes", fmt_seconds(median(times[name])),
                     fmt_seconds(old), median(times[name]) / old) for name in ("replicated", "sharded")]
        rows.append(Row(f"{workload}: sharded vs replicated, 2 processes", fmt_seconds(median(times["sharded"])),
                        fmt_seconds(median(times["replicated"])), median(times["sharded"]) / median(times["replicated"])))
    batches = "; ".join(f"{w}: {len(shard_plan([(s[0], s[1:].numel()) for s in filter_banks(w)], 1))} units "
                        f"for {len(filter_banks(w))} banks" for w in one)
    report("Muon optimizer step", rows, [
        (f"Batched: banks of one shape orthogonalised together while under BATCH_NUMEL ({batches}; where units == "
        "banks, batched and one at a time run the same code and differ by noise)."),
        (f"CPU: {cpu_name()}; native bf16 here: {dtype == 'bfloat16'} (what the trainer picks: {dtype}). "
        f"Baseline: the old way (bf16, one bank at a time, every rank), except the last row of each 2-process "
        f"workload (sharded vs replicated). {reps} timed steps each, interleaved; medians; 1 thread per process; "
        f"2-process times are rank 0's, each step after a barrier."),
    ])


if __name__ == "__main__":
    main()
