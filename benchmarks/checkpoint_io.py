"""Checkpoint I/O: our save and load of the full training state vs raw writes and reads of as many bytes.

For each model: the trainer's checkpoint (weights, SGD momentum, scheduler, flags, RNG) is saved with
`ddp.checkpoint.save_checkpoint` (torch.save straight into a temporary file, fsync, rename, fsync of the
directory) and loaded with `load_checkpoint` (CRC32 of every record checked on a memory map of the file,
which torch.load(mmap=True) then shares), alternating with `open().write()` + fsync and `open().read()`
of the same number of bytes, on the same disk. Cold reads first evict the file from the page cache
(posix_fadvise DONTNEED; the pages are clean after fsync).

"Blocked" is what the training loop waits for at an epoch end: train.py's save() on rank 0 builds the
state dict and copies it to the CPU, then a writer thread writes latest.pt, the epoch file and best.pt
(one write, two hard links) while training goes on. Its baseline is the CPU copy of the state alone.

    python -m benchmarks.checkpoint_io                      # fastnet_small and resnet18, 10 repetitions
    python -m benchmarks.checkpoint_io --quick              # 2 repetitions
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import OUT, Row, fmt_seconds, interleave, median, report, train_step, training_parts
from ddp import checkpoint, config, data
from ddp.optim import Lookahead, build_scheduler


def training_state(model_name: str) -> Callable[[], dict]:
    """A function that builds the trainer's checkpoint dict of a model trained one step (so momentum exists)."""
    model, optimizer, criterion, batches = training_parts(model_name, batch_size=8, n_batches=1)
    scheduler = build_scheduler(optimizer, 97, 970)
    train_step(model, optimizer, criterion, batches[0])
    scheduler.step()
    flags = {**config.to_dict(config.parse_args(["--model", model_name])), "num_classes": data.num_classes("cifar10")}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    lookahead = Lookahead(model, 970)  # its slow copy of the weights is part of the state, as in the trainer
    return lambda: checkpoint.make_checkpoint(
        model, optimizer, scheduler, scaler, lookahead, progress={"epoch": 1, "step": 97},
        metrics={"best_acc": 0.5, "acc": 0.5, "loss": 1.0}, config=flags, world_size=2, device_type="cpu")


def raw_write(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def raw_read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def evict(path: Path) -> None:
    """Drop the file's (clean) pages from the page cache, so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold(fn: Callable[[], object], path: Path) -> Callable[[], object]:
    """`fn`, preceded by evicting `path` from the page cache."""
    def run() -> object:
        evict(path)
        return fn()
    return run


def bench_model(model_name: str, directory: Path, reps: int) -> list[Row]:
    make = training_state(model_name)
    state = make()
    ours, raw = directory / f"{model_name}.pt", directory / f"{model_name}.raw"
    checkpoint.save_checkpoint(state, ours)
    size = ours.stat().st_size
    payload = os.urandom(size)
    raw_write(raw, payload)
    epoch_files = [directory / f"{model_name}_{name}" for name in ("best.pt", "epoch_0001.pt", "latest.pt")]
    writer = checkpoint.BackgroundWriter()
    blocked: list[float] = []

    def epoch_end() -> None:
        """What train.py's save() does on rank 0 at an epoch end (minus the collective), then waiting for the write."""
        t0 = time.perf_counter()
        writer.wait()
        ckpt = checkpoint.cpu_copy(make())
        writer.submit(lambda: checkpoint.save_checkpoint(ckpt, *epoch_files))
        blocked.append(time.perf_counter() - t0)  # training goes on from here
        writer.wait()

    times = interleave({
        "save": lambda: checkpoint.save_checkpoint(state, ours),
        "raw_write": lambda: raw_write(raw, payload),
        "load_cold": cold(lambda: checkpoint.load_checkpoint(ours, map_location="cpu"), ours),
        "raw_read_cold": cold(lambda: raw_read(raw), raw),
        "load_warm": lambda: checkpoint.load_checkpoint(ours, map_location="cpu"),
        "raw_read_warm": lambda: raw_read(raw),
        # the mapped tensors' pages are only touched when used: a resume copies them into the model
        "load_copy_warm": lambda: checkpoint.cpu_copy(checkpoint.load_checkpoint(ours, map_location="cpu")),
        "cpu_copy": lambda: checkpoint.cpu_copy(state),
        "epoch_end": epoch_end,
        "raw_write_x3": lambda: [raw_write(raw, payload) for _ in epoch_files],
    }, reps=reps)
    times["blocked"] = blocked[-reps:]  # the untimed warm-up round appended one too
    m = {k: median(v) for k, v in times.items()}

    def row(figure: str, a: str, b: str, target: float | None = None) -> Row:
        ratio = m[a] / m[b]
        return Row(f"{model_name} ({size / 1e6:.1f} MB): {figure}", fmt_seconds(m[a]), fmt_seconds(m[b]), ratio,
                   f"<= {target}x" if target else "-", None if target is None else ratio <= target)

    return [
        row("save vs raw write + fsync", "save", "raw_write", 1.25),
        row("load vs raw read, cold cache", "load_cold", "raw_read_cold", 1.25),
        row("load vs raw read, page cache", "load_warm", "raw_read_warm"),
        row("load + a copy of every tensor vs raw read, page cache", "load_copy_warm", "raw_read_warm"),
        row("training blocked at an epoch end vs a CPU copy of the state", "blocked", "cpu_copy", 1.2),
        row("epoch-end save until on disk (3 files) vs 3 raw writes", "epoch_end", "raw_write_x3"),
    ]


def file_system(path: Path) -> str:
    """'device type' of the mount that holds `path`, from /proc/mounts."""
    path, best = os.path.realpath(path), ("?", "", "?")
    with open("/proc/mounts") as f:
        for device, mount, fs_type, *_ in (line.split() for line in f):
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[1]):
                best = (device, mount, fs_type)
    return f"{best[0]} {best[2]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["fastnet_small", "resnet18"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dir", default=os.path.join(OUT, "checkpoint_io"), help="where to write (the disk measured)")
    p.add_argument("--quick", action="store_true", help="2 repetitions")
    args = p.parse_args()
    if args.quick:
        args.reps = 2
    torch.set_num_threads(1)  # as in each trainer process
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        rows = [row for name in args.models for row in bench_model(name, directory, args.reps)]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    report("Checkpoint I/O", rows, [
        (f"{args.reps} repetitions, all ten operations alternating; medians; all files in {directory} "
         f"({file_system(directory)}), 1 torch thread."),
        "Cold reads: the file's pages evicted with posix_fadvise(DONTNEED) before each read.",
        ("Loads map the file: the CRC32 pass reads every byte once, and the tensors share those pages "
         "(copy-on-write); the 'copy of every tensor' row adds what a resume then does with them."),
        ("Epoch end: 'blocked' is what the training loop waits for (make_checkpoint + a CPU copy of every "
         "tensor + handing the write to a thread); the write itself (one torch.save, fsync, two hard links, "
         "renames) then runs beside training, on the CPU and disk that training shares."),
    ])

if __name__ == "__main__":
    main()
