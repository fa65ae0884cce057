"""What moving a peer's CUDA training code to the CPU takes, at run time, and how a peer run reports to benchmarks.peer.

The peers (airbench94, airbench94_muon, hiverge's cifar10-speedrun) are run with their own code; nothing
of theirs is copied here. These patches change only where it runs:
- `cuda_timing_on_cpu`: `torch.cuda.Event` times with `time.perf_counter`, `torch.cuda.synchronize` does
  nothing (CPU ops are synchronous), so their own timers measure wall time.
- `module_casts_disabled`: `nn.Module.half` and `.cuda` return the module unchanged, so weights stay float32
  on the CPU; `autocast_forward` runs each forward under bf16 autocast (the CPU's counterpart of their fp16)
  and returns float logits. One autocast region per forward: autocast caches the bf16 weight copies until
  the outermost region exits, so a region around the whole loop would train on stale weights.
- `on_cpu`: tensors they create on "cuda" (factory functions, `torch.load(map_location=cuda)`) are created
  on the CPU instead; `pin_memory` is a no-op.
- `no_compile`: `torch.compile` returns the function or module as it is (inductor's CPU compile would
  take minutes on 2 cores; our trainer does not compile by default either).

Protocol, on stdout: `PEER_EPOCH {...}` after each epoch the peer logs (its test accuracy without TTA and
its own timer), `PEER_TRAINED {...}` the moment training and its own final TTA are done (the parent's
stopwatch stops here), then, untimed, `PEER_RESULT {"none": ..., "flip": ..., "full": ...}`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

EPOCH, TRAINED, RESULT = "PEER_EPOCH", "PEER_TRAINED", "PEER_RESULT"
TTA_LEVELS = {"none": 0, "flip": 1, "full": 2}  # airbench's tta_level: one view, + mirror, + mirror and shifts


class WallClockEvent:
    """torch.cuda.Event's timing interface on the CPU: record() notes the time, elapsed_time() in ms."""

    def __init__(self, *args, **kwargs) -> None:
        self.t = time.perf_counter()

    def record(self, *args, **kwargs) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: WallClockEvent) -> float:
        return 1e3 * (end.t - self.t)


def cuda_timing_on_cpu() -> None:
    torch.cuda.Event = WallClockEvent
    torch.cuda.synchronize = lambda *args, **kwargs: None


def no_compile() -> None:
    """torch.compile(fn), torch.compile(**options)(fn) and @torch.compile all return fn unchanged."""
    torch.compile = lambda fn=None, *args, **kwargs: fn if fn is not None else (lambda f: f)


@contextlib.contextmanager
def module_casts_disabled() -> Iterator[None]:
    """nn.Module.half and .cuda return the module unchanged while inside."""
    half, cuda = nn.Module.half, nn.Module.cuda
    nn.Module.half = nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        nn.Module.half, nn.Module.cuda = half, cuda


def autocast_forward(net: nn.Module) -> nn.Module:
    """Each forward of `net` under bf16 autocast on the CPU, returning float32 (its weights stay float32)."""
    forward = net.forward

    def cpu_forward(*args, **kwargs) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # entered and left around each forward
            return forward(*args, **kwargs).float()

    net.forward = cpu_forward
    return net


def _cpu(device: object) -> object:
    return "cpu" if device is not None and torch.device(device).type == "cuda" else device


class _OnCpu(TorchFunctionMode):
    """device="cuda" of any torch function becomes "cpu"; Tensor.pin_memory returns the tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """Inside: what the code creates on CUDA is created on the CPU (factories, torch.load, pin_memory)."""
    load = torch.load

    def cpu_load(*args, **kwargs):
        kwargs["map_location"] = "cpu"
        return load(*args, **kwargs)

    torch.load = cpu_load
    try:
        with _OnCpu():
            yield
    finally:
        torch.load = load


def init_on_cpu(cls: type) -> None:
    """Run `cls.__init__` (a peer's data loader) inside on_cpu()."""
    init = cls.__init__

    def cpu_init(self, *args, **kwargs) -> None:
        with on_cpu():
            init(self, *args, **kwargs)

    cls.__init__ = cpu_init


TRAINED_IMAGES = [0]  # training images the loaders have handed out so far (counted by `counting`)


def counting(cls: type) -> None:
    """Count the images a peer's training loader (drop_last: its train split) hands out, in TRAINED_IMAGES."""
    iterate = cls.__iter__

    def counted(self):
        for inputs, labels in iterate(self):
            if getattr(self, "drop_last", False):
                TRAINED_IMAGES[0] += len(inputs)
            yield inputs, labels

    cls.__iter__ = counted


def reporting(print_training_details: Callable) -> Callable:
    """airbench's print_training_details(variables, is_final_entry), which every peer has, also printing
    PEER_EPOCH / PEER_TRAINED lines from the same variables."""

    def report(variables: dict, is_final_entry: bool) -> None:
        print_training_details(variables, is_final_entry)
        seconds = variables.get("total_time_seconds", variables.get("time_seconds"))
        if is_final_entry:
            print(TRAINED, json.dumps({"acc": variables["tta_val_acc"], "train_s": seconds,
                                       "images": TRAINED_IMAGES[0]}), flush=True)
        elif isinstance(variables.get("val_acc"), float):
            print(EPOCH, json.dumps({"epoch": variables["epoch"], "acc": variables["val_acc"], "train_s": seconds}),
                  flush=True)

    return report


def print_result(evaluate: Callable[[int], float]) -> None:
    """PEER_RESULT: the final model's test accuracy at each TTA level, `evaluate(tta_level)`."""
    print(RESULT, json.dumps({name: evaluate(level) for name, level in TTA_LEVELS.items()}), flush=True)
