"""Time-to-accuracy: test accuracy against wall time on real CIFAR-10, tabulated and plotted.

Runs the trainer as a subprocess (default recipe, any extra flags after `--` passed through), then
reads the run's TensorBoard events back: the wall time of each `test/acc` point, counted from the
launch (process start-up, data loading and evaluation included), gives accuracy vs wall time.

    python -m benchmarks.time_to_accuracy                                  # 2 processes, default recipe
    python -m benchmarks.time_to_accuracy -- --epochs 12 --lr 0.3          # flags for the trainer
    python -m benchmarks.time_to_accuracy --quick                          # smoke run: synthetic, 2 epochs
    python -m benchmarks.time_to_accuracy --from-runs benchmarks/out/tta/A benchmarks/out/tta/B   # re-plot
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, REPO, conditions, markdown_table, save_accuracy_plot, split_passthrough

META = "benchmark.json"  # written next to the TensorBoard events: launch time, command, conditions


def run_trainer(run_dir: Path, nproc: int, data_dir: str, extra: list[str]) -> None:
    """Train under torchrun into `run_dir` (TensorBoard events + META), streaming the trainer's output."""
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "ddp.train", "--data-dir", data_dir,
           "--logdir", str(run_dir.parent), "--run-name", run_dir.name,
           "--checkpoint-dir", str(run_dir / "checkpoints"), "--resume", "none", *extra]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: read_run would merge an earlier run's events
    run_dir.mkdir(parents=True)
    print("$", " ".join(cmd), flush=True)
    meta = {"command": cmd, "conditions_before": conditions(), "launch": time.time()}
    subprocess.run(cmd, cwd=REPO, check=True)
    meta.update(end=time.time(), conditions_after=conditions())
    (run_dir / META).write_text(json.dumps(meta, indent=1))


def read_run(run_dir: Path) -> dict:
    """Per-epoch rows (accuracy, wall time since launch, epoch time, img/s) from a run's events and META."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    meta = json.loads((run_dir / META).read_text())
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    series = {tag: events.Scalars(tag) for tag in ("test/acc", "perf/epoch_time_s", "perf/images_per_sec")}
    by_step = {tag: {e.step: e.value for e in points} for tag, points in series.items()}
    rows = []
    for epoch, acc in enumerate(series["test/acc"], start=1):
        rows.append({"epoch": epoch, "acc": acc.value, "wall_s": acc.wall_time - meta["launch"],
                     "epoch_s": by_step["perf/epoch_time_s"].get(acc.step, float("nan")),
                     "img_s": by_step["perf/images_per_sec"].get(acc.step, float("nan"))})
    return {"name": run_dir.name, "meta": meta, "rows": rows, "total_s": meta["end"] - meta["launch"]}


def first_reaching(rows: list[dict], acc: float) -> float | None:
    return next((r["wall_s"] for r in rows if r["acc"] >= acc), None)


def mmss(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def print_run(run: dict) -> None:
    rows = run["rows"]
    print(f"\n## Time to accuracy: {run['name']}\n")
    print(f"$ {' '.join(run['meta']['command'])}")
    print(f"before: {run['meta']['conditions_before']}\nafter:  {run['meta']['conditions_after']}\n")
    table = [[str(r["epoch"]), f"{100 * r['acc']:.2f}", mmss(r["wall_s"]), f"{r['epoch_s']:.1f}", f"{r['img_s']:.0f}"]
             for r in rows]
    print(markdown_table(["epoch", "test acc %", "wall time (m:ss)", "epoch time (s)", "train img/s"], table))
    print(f"\ntotal wall time {mmss(run['total_s'])} (launch to exit), best test accuracy "
          f"{100 * max(r['acc'] for r in rows):.2f}%\n")


def plot(runs: list[dict], png: Path) -> None:
    """Accuracy vs wall time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    for run in runs:
        rows = run["rows"]
        cmd = run["meta"]["command"]
        flags = " ".join(cmd[cmd.index("--resume") + 2:]) or "default recipe"  # what came after `--`
        ax.plot([r["wall_s"] / 60 for r in rows], [100 * r["acc"] for r in rows], marker="o", ms=4,
                label=f"{run['name']}: {flags}")
    xmax = max(r["wall_s"] for run in runs for r in run["rows"]) / 60 * 1.05
    ax.set_xlim(0, xmax)
    accs = [100 * r["acc"] for run in runs for r in run["rows"]]
    ax.set_ylim(min(50, min(accs) - 2), max(95, max(accs) + 1))
    save_accuracy_plot(fig, ax, f"CIFAR-10 time to accuracy, {os.cpu_count()} CPU cores", png)


def main() -> None:
    argv, extra = split_passthrough(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (torchrun --nproc_per_node)")
    p.add_argument("--data-dir", default="../shared/data", help="directory holding cifar-10-batches-py/")
    p.add_argument("--name", default="default", help="run name under --root")
    p.add_argument("--root", default=os.path.join(OUT, "tta"), help="TensorBoard root for the runs")
    p.add_argument("--png", default=os.path.join(REPO, "benchmarks", "time_to_accuracy.png"))
    p.add_argument("--quick", action="store_true", help="smoke run: synthetic data, 2 epochs")
    p.add_argument("--from-runs", nargs="+", metavar="RUN_DIR", help="no training: tabulate and plot these runs")
    args = p.parse_args(argv)

    if args.from_runs:
        run_dirs = [Path(d) for d in args.from_runs]
    else:
        if args.quick:
            extra = ["--dataset", "synthetic", "--synthetic-size", "4096", "--epochs", "2", *extra]
            args.name += "-quick"
        run_dirs = [Path(args.root) / args.name]
        run_trainer(run_dirs[0], args.nproc, args.data_dir, extra)
    runs = [read_run(d) for d in run_dirs]
    for run in runs:
        print_run(run)
    plot(runs, Path(args.png))


if __name__ == "__main__":
    main()
