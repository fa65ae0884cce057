"""The textbook DDP training loop (the pytorch/examples pattern), the baseline of benchmarks.trainer_throughput.

DistributedSampler + DataLoader with worker processes + torchvision transforms, DDP around the same
model, SGD; no evaluation, no checkpoints. Rank 0 prints the training images per second of each epoch
(from the start of the epoch's loop to its last optimizer step), like the trainer's epoch line.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.textbook_ddp --data-dir ../shared/data --epochs 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

from benchmarks.textbook import InMemoryCIFAR10, train_loader, train_transform
from ddp import data, models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    p.add_argument("--synthetic-size", type=int, default=4096)
    p.add_argument("--model", default="fastnet_small")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512, help="global batch, split across the processes")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per training process")
    p.add_argument("--lr", type=float, default=0.2)
    args = p.parse_args()

    dist.init_process_group("gloo")  # env:// from torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if args.dataset == "synthetic":
        images, labels = data.synthetic_cifar10(args.synthetic_size, train=True)
    else:
        images, labels = data.load_cifar("cifar10", args.data_dir, train=True)
    sampler = DistributedSampler(InMemoryCIFAR10(images, labels, train_transform()), shuffle=True, drop_last=True)
    loader = train_loader(images, labels, args.batch_size // world_size, args.workers, sampler)

    model = DDP(models.build(args.model, data.num_classes("cifar10")))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.2)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0, steps = time.perf_counter(), 0
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        seconds = time.perf_counter() - t0
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs} | train loss {loss.item():.4f} | {steps} steps | "
                  f"{steps * args.batch_size / seconds:.0f} img/s | {seconds:.1f}s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
