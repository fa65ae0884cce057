"""airbench94 (PyPI `airbench==0.1.8`) trained on the CPU, its code unchanged but for where it runs.

Run from a directory holding `cifar10/train.pt` and `cifar10/test.pt` (airbench's own format, which
`benchmarks.peer` writes); prints airbench's table, then `AIRBENCH_TRAINED` the moment `train94`
returns, then (untimed) `AIRBENCH_RESULT {"none": ..., "flip": ..., "full": ...}`, the returned model's
test accuracy at airbench's TTA levels 0, 1 and 2.

    cd benchmarks/out/peer/airbench_data && PYTHONPATH=../../../.. python -m benchmarks.airbench_cpu --seed 0

What is patched, and nothing else:
- `CifarLoader` loads onto the CPU (airbench hard-codes `map_location=torch.device(0)`): the train loader is
  ours with gpu='cpu', the test loader `train()` builds is a subclass with gpu='cpu'. Images stay fp16.
- `make_net94` runs with `nn.Module.half` and `.cuda` as no-ops, so weights stay float32 on the CPU, and
  each forward runs under `torch.autocast('cpu', bfloat16)` (the CPU's counterpart of airbench's fp16),
  returning float logits. One autocast region per forward: autocast caches the bf16 weight copies until
  the outermost region exits, so a region around the whole loop would train on stale weights.
- `torch.cuda.Event` times with `time.perf_counter`, `torch.cuda.synchronize` does nothing (CPU ops are
  synchronous), so airbench's total_time_seconds column is wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator

import airbench.utils
import torch
from airbench.lib_airbench94 import hyp, make_net94, train94
from airbench.utils import CifarLoader, evaluate
from torch import nn

TRAINED = "AIRBENCH_TRAINED"  # printed the moment train94 returns: the parent's stopwatch stops here
RESULT = "AIRBENCH_RESULT"  # then this, followed by the JSON of the untimed TTA evaluations
TTA_LEVELS = {"none": 0, "flip": 1, "full": 2}


class CpuCifarLoader(CifarLoader):
    """airbench's loader with its tensors on the CPU instead of cuda:0."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["gpu"] = "cpu"
        super().__init__(*args, **kwargs)


class WallClockEvent:
    """torch.cuda.Event's timing interface on the CPU: record() notes the time, elapsed_time() in ms."""

    def __init__(self, *args, **kwargs) -> None:
        self.t = time.perf_counter()

    def record(self, *args, **kwargs) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: WallClockEvent) -> float:
        return 1e3 * (end.t - self.t)


@contextlib.contextmanager
def module_casts_disabled() -> Iterator[None]:
    """nn.Module.half and .cuda return the module unchanged while inside."""
    half, cuda = nn.Module.half, nn.Module.cuda
    nn.Module.half = nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        nn.Module.half, nn.Module.cuda = half, cuda


def make_net94_cpu() -> nn.Module:
    """make_net94's network, float32 weights on the CPU, each forward under bf16 autocast."""
    with module_casts_disabled():
        net = make_net94()
    sequential_forward = type(net).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # entered and left around each forward
            return sequential_forward(net, x).float()

    net.forward = forward
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before training")
    p.add_argument("--epochs", type=float, default=hyp["opt"]["train_epochs"], help="train94(epochs=...)")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    airbench.utils.CifarLoader = CpuCifarLoader  # the name train() looks up for its test loader
    torch.cuda.Event = WallClockEvent
    torch.cuda.synchronize = lambda *args, **kwargs: None

    torch.manual_seed(args.seed)
    train_loader = CpuCifarLoader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"],
                                  altflip=True)
    model = train94(train_loader=train_loader, epochs=args.epochs, make_net=make_net94_cpu)
    print(TRAINED, flush=True)

    test_loader = CpuCifarLoader("cifar10", train=False, batch_size=2000)
    accs = {name: evaluate(model, test_loader, tta_level=level) for name, level in TTA_LEVELS.items()}
    print(RESULT, json.dumps(accs), flush=True)


if __name__ == "__main__":
    main()
