"""What every benchmark shares: interleaved timing, medians, the machine's conditions, a results table.

The machines we run on are shared and noisy, so a figure is never timed alone: its baseline is timed
in the same run, interleaved with it (A, B, A, B, ...), and the table shows medians and their ratio.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "out")  # scratch space for runs and files, ignored by git
# The throughput benchmarks compare like with like: the small net in float32 at batch 512, as the
# textbook baselines run it (the trainer's default on this CPU would be bf16 autocast).
FLOAT32_SMALL = ["--model", "fastnet_small", "--amp", "none", "--batch-size", "512"]


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, those after `--`, which go to the trainer)."""
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def save_accuracy_plot(fig, ax, title: str, png: str | os.PathLike) -> None:
    """Label an accuracy-vs-wall-time plot, add its legend and write it to `png`."""
    ax.set_xlabel("wall time since launch (min)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png)
    print(f"\nwrote {png}")


def untimed_epoch_curve(run_dir: str | os.PathLike, launch: float, score: Callable[[str], float]) -> list[list[float]]:
    """Our accuracy against wall time from evaluations that the timed run did not pay for.

    The run evaluates only at its end (the default) but keeps every epoch's checkpoint (`--keep 0`); each
    `epoch_NNNN.pt` is scored afterwards by `score(path)` (a fraction) and placed at the wall time, since
    `launch`, at which its epoch ended (the perf/epoch_time_s event). [] when the files are not there.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.fspath(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    ends = events.Scalars("perf/epoch_time_s") if "perf/epoch_time_s" in events.Tags()["scalars"] else []
    files = [os.path.join(run_dir, "checkpoints", f"epoch_{epoch:04d}.pt") for epoch in range(1, len(ends) + 1)]
    if not ends or not all(os.path.isfile(f) for f in files):
        return []
    return [[end.wall_time - launch, score(f)] for end, f in zip(ends, files)]


def conditions() -> str:
    """One line about the machine and how busy it is, to print next to every result."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"nproc {os.cpu_count()} | loadavg {load} (1/5/15 min) | torch {torch.__version__} | "
            f"torch threads {torch.get_num_threads()} | {platform.processor() or platform.machine()}")


def interleave(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function `reps` times in turn (A, B, A, B, ...) after `warmup` untimed rounds: seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of a[i] / b[i]: timings taken side by side, so slow phases of the machine cancel out."""
    return statistics.median(x / y for x, y in zip(a, b))


def spread(xs: list[float]) -> str:
    """Median and the interquartile range in percent of it, e.g. '12.3 ms +-4%'."""
    if len(xs) < 4:
        return fmt_seconds(median(xs))
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return f"{fmt_seconds(median(xs))} (IQR {100 * (q3 - q1) / median(xs):.0f}%)"


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


@dataclass
class Row:
    """One figure, its baseline measured in the same run, their ratio, and the target for it."""

    figure: str
    ours: str
    baseline: str
    ratio: float  # ours / baseline
    target: str = "-"
    met: bool | None = None  # None: no target
    percent: bool = False  # show the ratio as a percentage (e.g. a cost as a share of a step)

    def cells(self) -> list[str]:
        met = "-" if self.met is None else ("yes" if self.met else "no")
        ratio = f"{100 * self.ratio:.1f}%" if self.percent else f"{self.ratio:.2f}x"
        return [self.figure, self.ours, self.baseline, ratio, self.target, met]


HEADER = ["figure", "ours", "baseline", "ratio", "target", "met"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (pastes into the README as is), columns padded for the terminal."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def report(title: str, rows: list[Row], notes: list[str] = ()) -> None:
    """Print a benchmark's results: title, conditions, the table, notes."""
    print(f"\n## {title}\n")
    print(conditions() + "\n")
    print(markdown_table(HEADER, [r.cells() for r in rows]))
    for note in notes:
        print(f"\n{note}")
    print(flush=True)


def torchrun(nproc: int, module: str, args: list[str], threads: int | None = None) -> str:
    """Run `python -m module` under torchrun (OMP_NUM_THREADS=threads if given); its stdout, or raise with both streams."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    result = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def training_parts(model_name: str = "fastnet_small", batch_size: int = 256, n_batches: int = 4, seed: int = 0):
    """(model, optimizer, criterion, batches) as the trainer builds them with its default flags.

    The model is bare (wrap it yourself), channels_last; the batches are augmented, normalised synthetic
    images (compute does not depend on pixel values), made once so that timing covers only the step.
    """
    from ddp import config, data, models

    args = config.parse_args(["--model", model_name])
    torch.manual_seed(seed)
    model = models.build(model_name, data.num_classes("cifar10")).to(memory_format=torch.channels_last)
    images, labels = data.synthetic_cifar10(batch_size * n_batches, train=True)
    batches = [(data.normalize(data.augment(x, data.make_generator(seed, i))), y)
               for i, (x, y) in enumerate(zip(images.split(batch_size), labels.split(batch_size)))]
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    return model, make_optimizer(model), criterion, batches


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The trainer's optimizer with its default flags (SGD, Nesterov, BatchNorm biases at a higher LR)."""
    from ddp import config
    from ddp.optim import build_optimizer

    return build_optimizer(model, config.parse_args([]))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One SGD step as the trainer takes it: forward, loss, backward (DDP all-reduces here), update."""
    x, y = batch
    loss = criterion(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
