"""airbench94 (PyPI `airbench==0.1.8`) trained on the CPU, its code unchanged but for where it runs.

Run from a directory holding `cifar10/train.pt` and `cifar10/test.pt` (airbench's own format, which
`benchmarks.peer` writes); prints airbench's table with the PEER_* lines of `benchmarks/peer_cpu.py`.

    cd benchmarks/out/peer/peer_data && PYTHONPATH=../../../.. python -m benchmarks.airbench_cpu --seed 0

What is patched, and nothing else (see benchmarks/peer_cpu.py):
- `CifarLoader` loads onto the CPU (airbench hard-codes `map_location=torch.device(0)`): the train loader is
  ours with gpu='cpu', the test loader `train()` builds is a subclass with gpu='cpu'. Images stay fp16.
- `make_net94` runs with `nn.Module.half` and `.cuda` as no-ops, so weights stay float32 on the CPU, and
  each forward runs under `torch.autocast('cpu', bfloat16)`, returning float logits.
- `torch.cuda.Event` and `torch.cuda.synchronize` time wall clock on the CPU.
With `--device cuda` nothing is patched: airbench94 as published, after one warm-up run as its README does.
"""

from __future__ import annotations

import argparse
import sys

import airbench.utils
import torch
from airbench.lib_airbench94 import hyp, make_net94, train94
from airbench.utils import CifarLoader, evaluate
from torch import nn

from benchmarks import peer_cpu


class CpuCifarLoader(CifarLoader):
    """airbench's loader with its tensors on the CPU instead of cuda:0."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["gpu"] = "cpu"
        super().__init__(*args, **kwargs)


def make_net94_cpu() -> nn.Module:
    """make_net94's network, float32 weights on the CPU, each forward under bf16 autocast."""
    with peer_cpu.module_casts_disabled():
        return peer_cpu.autocast_forward(make_net94())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before training")
    p.add_argument("--epochs", type=float, default=hyp["opt"]["train_epochs"], help="train94(epochs=...)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: airbench94 unpatched")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    cpu = args.device == "cpu"
    loader_class = CpuCifarLoader if cpu else CifarLoader
    if cpu:
        airbench.utils.CifarLoader = CpuCifarLoader  # the name train() looks up for its test loader
        peer_cpu.cuda_timing_on_cpu()
    peer_cpu.counting(CifarLoader)
    airbench.utils.print_training_details = peer_cpu.reporting(airbench.utils.print_training_details)

    train_loader = loader_class("cifar10", train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"],
                                altflip=True)
    make_net = make_net94_cpu if cpu else make_net94
    if not cpu:
        train94(train_loader=train_loader, epochs=args.epochs, make_net=make_net, run="warmup")
    torch.manual_seed(args.seed)
    peer_cpu.TRAINED_IMAGES[0] = 0
    model = train94(train_loader=train_loader, epochs=args.epochs, make_net=make_net)
    test_loader = loader_class("cifar10", train=False, batch_size=2000)
    peer_cpu.print_result(lambda level: evaluate(model, test_loader, tta_level=level))


if __name__ == "__main__":
    main()
