"""End-to-end trainer throughput: our trainer vs the textbook DDP loop, 2 gloo processes, same model and batch.

Each repetition launches both under torchrun, alternating (ours, textbook, ours, ...), for one epoch of
real CIFAR-10, and reads the training images per second each prints for the epoch (start of the
epoch's loop to its last step; ours leaves out its evaluation and checkpoint save, which follow).

    python -m benchmarks.trainer_throughput                  # 1 epoch each, 2 repetitions
    python -m benchmarks.trainer_throughput --quick          # synthetic 12,800 images, 1 repetition
    python -m benchmarks.trainer_throughput --workers 1      # the textbook loop with 1 worker per process
"""

from __future__ import annotations

import argparse
import os
import re

from benchmarks.common import FLOAT32_SMALL, OUT, Row, median, report, torchrun


def images_per_sec(stdout: str) -> float:
    """The img/s of the last epoch line ("... | 1234 img/s | ...")."""
    return float(re.findall(r"\| (\d+) img/s \|", stdout)[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="textbook DataLoader workers per process")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="synthetic data, 12,800 images (25 steps), 1 repetition")
    args = p.parse_args()

    source = ["--data-dir", args.data_dir]
    if args.quick:
        source, args.reps = ["--dataset", "synthetic", "--synthetic-size", "12800"], 1
    scratch = os.path.join(OUT, "trainer_throughput")
    ours_args = [*FLOAT32_SMALL, *source, "--epochs", "1", "--resume", "none", "--checkpoint-dir", scratch, "--logdir", scratch]
    textbook_args = [*source, "--epochs", "1", "--workers", str(args.workers)]
    ips: dict[str, list[float]] = {"ours": [], "textbook": []}
    for rep in range(args.reps):
        ips["ours"].append(images_per_sec(torchrun(args.nproc, "ddp.train", ours_args)))
        ips["textbook"].append(images_per_sec(torchrun(args.nproc, "benchmarks.textbook_ddp", textbook_args)))
        print(f"rep {rep + 1}/{args.reps}: ours {ips['ours'][-1]:.0f} img/s, textbook {ips['textbook'][-1]:.0f} img/s",
              flush=True)
    ours, textbook = median(ips["ours"]), median(ips["textbook"])
    report("Trainer throughput", [
        Row(f"train images/s, {args.nproc} processes, fastnet_small, batch 512, float32", f"{ours:,.0f} img/s",
            f"{textbook:,.0f} img/s", ours / textbook, ">= 1.5x", ours / textbook >= 1.5),
    ], [
        f"{args.reps} repetitions of one epoch each, alternating; medians. Per repetition: "
        + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(ips["ours"], ips["textbook"])) + " (ours/textbook img/s).",
        f"ours: python -m ddp.train {' '.join(ours_args)} (torchrun, {args.nproc} processes, 1 thread each).",
        (f"textbook: python -m benchmarks.textbook_ddp {' '.join(textbook_args)}: DistributedSampler + DataLoader("
         f"num_workers={args.workers}) + torchvision transforms, DDP(fastnet_small), SGD; its {args.nproc * args.workers} "
         f"workers share the {os.cpu_count()} cores with the {args.nproc} training processes."),
    ])


if __name__ == "__main__":
    main()
