"""DDP overhead: one process, our DDP-wrapped training step vs the bare model's step.

The trainer always wraps the model in DDP, even alone (a process group of one on an in-memory
store), so that one code path serves every topology. This measures what that costs: the same
batches go through a DDP-wrapped model and an identical bare one, steps alternating, and the
medians of the per-step times are compared.

    python -m benchmarks.ddp_overhead                    # fastnet_small, batch 256, 60 steps each, 1 thread
    python -m benchmarks.ddp_overhead --quick            # 20 steps each
"""

from __future__ import annotations

import argparse
import copy
import itertools

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.common import (
    Row,
    fmt_seconds,
    interleave,
    make_optimizer,
    median,
    paired_ratio,
    report,
    spread,
    train_step,
    training_parts,
)
from ddp.dist import process_group


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fastnet_small")
    p.add_argument("--batch-size", type=int, default=256, help="the per-process batch of the default 2-process run")
    p.add_argument("--steps", type=int, default=60, help="timed steps of each")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the trainer: 1 per process)")
    p.add_argument("--quick", action="store_true", help="20 steps each")
    args = p.parse_args()
    if args.quick:
        args.steps = 20
    torch.set_num_threads(args.threads)

    with process_group("cpu", "gloo"):  # the trainer's own: without torchrun, a group of one on a HashStore
        bare, bare_opt, criterion, batches = training_parts(args.model, args.batch_size)
        inner = copy.deepcopy(bare)
        wrapped = DDP(inner)
        wrapped_opt = make_optimizer(inner)
        feed = {"ddp": itertools.cycle(batches), "bare": itertools.cycle(batches)}
        times = interleave({
            "ddp": lambda: train_step(wrapped, wrapped_opt, criterion, next(feed["ddp"])),
            "bare": lambda: train_step(bare, bare_opt, criterion, next(feed["bare"])),
        }, reps=args.steps, warmup=3)

    ddp_s, bare_s = median(times["ddp"]), median(times["bare"])
    report("DDP overhead (1 process)", [
        Row(f"{args.model} training step, batch {args.batch_size}, DDP vs bare", fmt_seconds(ddp_s),
            fmt_seconds(bare_s), ddp_s / bare_s, "<= 1.03x", ddp_s / bare_s <= 1.03),
    ], [
        (f"{args.steps} steps each, alternating DDP and bare, after 3 warm-up rounds; medians. "
        f"DDP {spread(times['ddp'])}, bare {spread(times['bare'])}; median of the step-by-step ratios "
        f"{paired_ratio(times['ddp'], times['bare']):.3f}x; torch threads {args.threads}."),
    ])


if __name__ == "__main__":
    main()
