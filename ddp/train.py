"""Train CIFAR-10 with DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 -m ddp.train --dataset synthetic --epochs 2
    python -m ddp.train --help

Every rank runs this file top to bottom. Rank 0 prints, writes TensorBoard and checkpoints; the
ranks meet only in DDP's gradient all-reduce and in a few small collectives (logging, evaluation).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp import config, data, models
from ddp.dist import Context, all_reduce_sum, log, process_group, run_and_agree
from ddp.monitor import Monitor


def load_datasets(args: argparse.Namespace, ctx: Context) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels) as uint8/int64 tensors on the device."""
    if args.dataset == "synthetic":
        train = data.synthetic_cifar10(args.synthetic_size, train=True)
        test = data.synthetic_cifar10(max(args.synthetic_size // 5, 1), train=False)
    else:
        if args.download:  # one download per node: the data directory may be node-local
            run_and_agree(lambda: data.download_cifar10(args.data_dir), here=ctx.local_rank == 0,
                          device=ctx.device)
        train, test = data.load_cifar10(args.data_dir, train=True), data.load_cifar10(args.data_dir, train=False)
    # The whole data set is 180 MB of uint8: keep it on the training device, index batches from it.
    return tuple(t.to(ctx.device) for t in (*train, *test))


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no weight decay on biases and BatchNorm parameters."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Per-step schedule: linear warm-up to the peak LR, then linear decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: Context,
             batch_size: int = 1000) -> tuple[float, float]:
    """(test loss, test accuracy) over the whole test set; each rank scores every world_size-th image."""
    model.eval()
    mine = torch.arange(ctx.rank, len(images), ctx.world_size, device=images.device)
    loss_sum, correct = 0.0, 0.0
    for idx in mine.split(batch_size):
        logits = model(data.normalize(images[idx])).float()
        loss_sum += F.cross_entropy(logits, labels[idx], reduction="sum").item()
        correct += (logits.argmax(1) == labels[idx]).sum().item()
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, len(mine)], ctx.device)
    return loss_sum / count, correct / count


def train(args: argparse.Namespace, ctx: Context) -> dict[str, float]:
    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    train_x, train_y, test_x, test_y = load_datasets(args, ctx)
    if args.dataset == "synthetic":
        log("NOTE: training on SYNTHETIC data, not CIFAR-10: accuracies say nothing about CIFAR-10")

    model = models.build(args.model).to(ctx.device, memory_format=torch.channels_last)
    if hasattr(model, "init_whitening"):
        model.init_whitening(data.normalize(train_x[:5000]))
    ddp_model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    train_model = torch.compile(ddp_model) if args.compile else ddp_model

    per_rank_batch = args.batch_size // ctx.world_size
    steps_per_epoch = len(train_x) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, round(args.warmup_epochs * steps_per_epoch), total_steps)
    use_amp = args.amp != "none" and ctx.device.type == "cuda"
    amp_dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_amp and args.amp == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    log(f"world {ctx.world_size} x {ctx.device.type} ({ctx.backend}) | {args.model}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters | {args.dataset}: "
        f"{len(train_x)} train / {len(test_x)} test images | batch {args.batch_size} global = "
        f"{ctx.world_size} x {per_rank_batch} | {steps_per_epoch} steps/epoch")
    if args.amp != "none" and not use_amp:
        log(f"--amp {args.amp} applies to CUDA only; training in float32 on {ctx.device.type}")

    monitor = Monitor(ctx.is_main, args.logdir, args.run_name, config.to_dict(args),
                      note="SYNTHETIC data, not CIFAR-10" if args.dataset == "synthetic" else "")
    step, metrics = 0, {"acc": math.nan, "loss": math.nan}
    try:
        for epoch in range(args.epochs):
            order = data.shard_epoch(len(train_x), args.batch_size, ctx.world_size, ctx.rank, args.seed, epoch)
            model.train()
            monitor.start_epoch(epoch, args.epochs, steps_per_epoch)
            t0 = time.perf_counter()
            running = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, steps
            for batch_in_epoch in range(steps_per_epoch):
                idx = order[batch_in_epoch].to(ctx.device)
                generator = data.make_generator(args.seed, epoch, batch_in_epoch, ctx.rank)
                x, y = data.normalize(data.augment(train_x[idx], generator)), train_y[idx]
                with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = criterion(train_model(x), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # DDP all-reduces gradients here, overlapped with backward
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                running += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64,
                                                                           device=ctx.device)])
                monitor.advance()
                if step % args.log_every == 0 or batch_in_epoch == steps_per_epoch - 1:
                    loss_sum, count = all_reduce_sum(running.tolist(), ctx.device)
                    running.zero_()
                    train_loss = loss_sum / count
                    monitor.scalars(step, {"train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0]})
            train_time = time.perf_counter() - t0
            monitor.end_epoch()

            line = f"epoch {epoch + 1}/{args.epochs} | train loss {train_loss:.4f}"
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                metrics["loss"], metrics["acc"] = evaluate(model, test_x, test_y, ctx)
                monitor.scalars(step, {"test/loss": metrics["loss"], "test/acc": metrics["acc"]})
                line += f" | test loss {metrics['loss']:.4f} acc {100 * metrics['acc']:.2f}%"
            epoch_time = time.perf_counter() - t0
            images_per_sec = steps_per_epoch * args.batch_size / train_time
            monitor.scalars(step, {"perf/images_per_sec": images_per_sec, "perf/epoch_time_s": epoch_time})
            log(f"{line} | {images_per_sec:.0f} img/s | {epoch_time:.1f}s")
    finally:
        monitor.close()
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = config.parse_args(argv)  # bad flags exit here, before any process group exists
    with process_group(args.device, args.backend, args.timeout_min) as ctx:
        train(args, ctx)


if __name__ == "__main__":
    main()
