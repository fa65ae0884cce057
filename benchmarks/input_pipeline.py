"""Input pipeline: augmented training images per second, our batched tensor loader vs the textbook DataLoader;
and what our input path costs as a share of a training step of the default recipe.

Both produce the same thing from the same uint8 CIFAR-10 arrays: shuffled batches, random crop with
reflection padding 2, horizontal flips of half the images, normalised float tensors. One repetition is one pass over the
images (a fresh DataLoader iterator, as in a training epoch); ours and the textbook alternate.

    python -m benchmarks.input_pipeline                 # real CIFAR-10 from ../shared/data, 3 passes each
    python -m benchmarks.input_pipeline --quick         # 10,000 images, 2 passes each

The share: one rank's batch of the default recipe (batch 2000 over 2 processes: 1000 images, 1 thread)
through shuffle, gather, augment and normalise, vs a training step of the default model and optimizer on
that batch (forward, backward, update; bf16 autocast where native), interleaved.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.common import Row, interleave, median, report
from benchmarks.textbook import train_loader
from ddp import config, data, models
from ddp.optim import autocast, autocast_dtype, build_optimizer


def ours_epoch(images: torch.Tensor, labels: torch.Tensor, batch_size: int, epoch: int, threads: int) -> None:
    """One epoch of the trainer's input path (shuffle, gather, augment, normalise) in this process."""
    torch.set_num_threads(threads)
    order = data.shard_epoch(len(images), batch_size, 1, 0, seed=0, epoch=epoch)
    flips = data.epoch_flips(len(images), seed=0, epoch=epoch)
    for step, idx in enumerate(order):
        x = data.normalize(data.augment(images[idx], data.make_generator(0, epoch, step, 0), flips[idx]))
        y = labels[idx]
    assert x.shape == (batch_size, 3, 32, 32) and y.shape == (batch_size,)


def share_of_a_step(images: torch.Tensor, labels: torch.Tensor, reps: int) -> tuple[float, float]:
    """(input path, training step) seconds for one rank's batch of the default recipe, 1 thread, medians."""
    torch.set_num_threads(1)
    args = config.parse_args([])
    batch = args.batch_size // 2  # per rank, 2 processes
    model = models.build(args.model, data.num_classes("cifar10")).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    cpu = torch.device("cpu")
    dtype = autocast_dtype(args.amp, cpu)
    order = data.shard_epoch(len(images), args.batch_size, 2, 0, seed=0, epoch=0)
    flips = data.epoch_flips(len(images), seed=0, epoch=0)
    x = data.normalize(data.augment(images[order[0]], data.make_generator(0, 0, 0, 0), flips[order[0]]))
    y = labels[order[0]]
    assert len(x) == batch

    def input_path() -> None:
        idx = order[1]
        data.normalize(data.augment(images[idx], data.make_generator(0, 0, 1, 0), flips[idx]))

    def step() -> None:
        with autocast(cpu, dtype):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = interleave({"input": input_path, "step": step}, reps=reps)
    return median(times["input"]), median(times["step"])


def textbook_epoch(loader: torch.utils.data.DataLoader) -> None:
    """One epoch of the textbook DataLoader."""
    for _ in loader:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="directory holding cifar-10-batches-py/")
    p.add_argument("--images", type=int, default=50_000, help="images per pass (a prefix of the train set)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=2, help="textbook DataLoader worker processes")
    p.add_argument("--reps", type=int, default=3, help="timed passes of each pipeline")
    p.add_argument("--quick", action="store_true", help="10,000 images, 2 passes each")
    args = p.parse_args()
    if args.quick:
        args.images, args.reps = 10_000, 2

    images, labels = data.load_cifar("cifar10", args.data_dir, train=True)
    images, labels = images[:args.images], labels[:args.images]
    loader = train_loader(images, labels, args.batch_size, args.workers)
    per_pass = len(images) // args.batch_size * args.batch_size  # both drop the last partial batch
    threads_before = torch.get_num_threads()
    epoch = iter(range(10**6))
    times = interleave({
        "ours1": lambda: ours_epoch(images, labels, args.batch_size, next(epoch), 1),
        "ours2": lambda: ours_epoch(images, labels, args.batch_size, next(epoch), 2),
        "textbook": lambda: textbook_epoch(loader),
    }, reps=args.reps)
    input_s, step_s = share_of_a_step(images, labels, args.reps)
    torch.set_num_threads(threads_before)

    ips = {name: per_pass / median(ts) for name, ts in times.items()}
    base = f"{ips['textbook']:,.0f} img/s"
    rows = [
        Row("augmented images/s, ours 1 thread vs textbook", f"{ips['ours1']:,.0f} img/s", base,
            ips["ours1"] / ips["textbook"]),
        Row("augmented images/s, ours 2 threads vs textbook", f"{ips['ours2']:,.0f} img/s", base,
            ips["ours2"] / ips["textbook"]),
        Row("one rank's batch of the default recipe: input path vs training step (1 thread)",
            f"{1e3 * input_s:.1f} ms", f"{1e3 * step_s:.0f} ms", input_s / step_s, percent=True),
    ]
    report("Input pipeline", rows, [
        f"{args.images} images per pass, batch {args.batch_size}, {args.reps} passes each, interleaved; medians.",
        ("textbook: torchvision CIFAR10 + RandomCrop(32, padding=2, padding_mode=\"reflect\") + RandomHorizontalFlip + ToTensor + Normalize, "
         f"DataLoader(num_workers={args.workers}, shuffle, drop_last), a fresh iterator per pass (worker start-up "
         "included, as in every epoch of a training loop); each worker uses one core."),
        ("ours: ddp.data.shard_epoch + epoch_flips + augment + normalize in the calling process, torch.set_num_threads(1 or 2); "
         "the trainer runs it with 1 thread per process."),
    ])


if __name__ == "__main__":
    main()
