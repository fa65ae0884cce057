"""Scaling: 2 processes x 1 thread vs 1 process x 1 thread, images/s of the trainer; the cost of the all-reduce.

Throughput: the trainer itself under torchrun (OMP_NUM_THREADS=1), 1 and 2 processes alternating, on
synthetic data (the compute is that of CIFAR-10: same shapes), the same GLOBAL batch (512: 1 x 512 vs
2 x 256, the trainer's semantics), the img/s of the second epoch. All-reduce: a worker in 2 processes
times `dist.all_reduce` of a flat float32 tensor the size of the model's gradients, and DDP steps
against `no_sync()` steps (the same step without gradient communication), alternating.

    python -m benchmarks.scaling                 # 2 repetitions of each world size, ~3 minutes
    python -m benchmarks.scaling --quick         # smaller epochs, 1 repetition
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.common import (
    FLOAT32_SMALL,
    OUT,
    Row,
    fmt_seconds,
    interleave,
    median,
    report,
    spread,
    torchrun,
    train_step,
    training_parts,
)
from ddp.dist import process_group


def worker(model_name: str, batch_size: int, steps: int) -> None:
    """Under torchrun: time the gradient all-reduce; rank 0 prints one JSON line."""
    with process_group("cpu", "gloo") as ctx:
        model, optimizer, criterion, batches = training_parts(model_name, batch_size // ctx.world_size)
        ddp_model = DDP(model)
        grads = torch.zeros(sum(p.numel() for p in model.parameters()))

        def all_reduce() -> None:
            dist.all_reduce(grads)

        def no_sync_step() -> None:
            with ddp_model.no_sync():
                train_step(ddp_model, optimizer, criterion, next(feed))

        feed = itertools.cycle(batches)
        flat = interleave({"all_reduce": all_reduce}, reps=50, warmup=5)["all_reduce"]
        dist.barrier()
        steps_t = interleave({"ddp": lambda: train_step(ddp_model, optimizer, criterion, next(feed)),
                              "no_sync": no_sync_step}, reps=steps, warmup=2)
        if ctx.is_main:
            print("RESULT " + json.dumps({"numel": grads.numel(), "world_size": ctx.world_size, "all_reduce": flat,
                                          **steps_t}), flush=True)


def trainer_ips(nproc: int, size: int) -> float:
    """img/s of the last epoch of a 2-epoch synthetic run of the trainer with `nproc` processes x 1 thread."""
    scratch = os.path.join(OUT, "scaling")
    out = torchrun(nproc, "ddp.train", [*FLOAT32_SMALL, "--dataset", "synthetic", "--synthetic-size", str(size), "--epochs", "2",
                                        "--eval-every", "2", "--resume", "none", "--checkpoint-dir", scratch,
                                        "--logdir", scratch], threads=1)
    return float(re.findall(r"\| (\d+) img/s \|", out)[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fastnet_small")
    p.add_argument("--size", type=int, default=10240, help="synthetic training images per epoch (20 steps of 512)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="DDP and no_sync steps each in the all-reduce worker")
    p.add_argument("--quick", action="store_true", help="5,120 images per epoch, 1 repetition, 8 worker steps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.model, 512, args.steps)
    if args.quick:
        args.size, args.reps, args.steps = 5120, 1, 8

    ips: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.reps):
        for nproc in (1, 2):
            ips[nproc].append(trainer_ips(nproc, args.size))
        print(f"rep {rep + 1}/{args.reps}: 1 process {ips[1][-1]:.0f} img/s, 2 processes {ips[2][-1]:.0f} img/s",
              flush=True)
    t0 = time.perf_counter()
    out = torchrun(2, "benchmarks.scaling", ["--worker", "--model", args.model, "--steps", str(args.steps)], threads=1)
    r = json.loads(out.split("RESULT ", 1)[1])
    worker_s = time.perf_counter() - t0

    one, two = median(ips[1]), median(ips[2])
    reduce_s, ddp_s, no_sync_s = median(r["all_reduce"]), median(r["ddp"]), median(r["no_sync"])
    report("Scaling (1 thread per process)", [
        Row("train images/s, 2 processes vs 1 (global batch 512)", f"{two:,.0f} img/s", f"{one:,.0f} img/s",
            two / one, ">= 1.85x", two / one >= 1.85),
        Row(f"all_reduce of {r['numel']:,} float32 (gloo, 2 processes) vs DDP step", fmt_seconds(reduce_s),
            fmt_seconds(ddp_s), reduce_s / ddp_s, percent=True),
        Row("DDP step vs no_sync() step (2 processes, batch 2 x 256)", fmt_seconds(ddp_s), fmt_seconds(no_sync_s),
            ddp_s / no_sync_s),
    ], [
        f"throughput: {args.reps} repetitions of each world size, alternating; medians of the 2nd epoch's img/s "
        f"(python -m ddp.train --dataset synthetic --synthetic-size {args.size} --epochs 2, OMP_NUM_THREADS=1). "
        "Per repetition (1 / 2 processes): " + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(ips[1], ips[2])) + ".",
        (f"all-reduce worker ({worker_s:.0f} s): all_reduce {spread(r['all_reduce'])} over 50 calls; "
        f"{args.steps} DDP steps {spread(r['ddp'])} and {args.steps} no_sync steps {spread(r['no_sync'])}, "
        "alternating; the difference is the communication DDP does not hide behind the backward pass."),
    ])


if __name__ == "__main__":
    main()
