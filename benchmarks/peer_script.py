"""A peer's training script from its own checkout, run once on the CPU (or on a GPU as published).

    airbench94_muon.py   from github.com/KellerJordan/cifar10-airbench (its main(run, model))
    cifar10_speedrun.py  from github.com/hiverge/cifar10-speedrun (the same structure)

Run from a directory holding `cifar10/train.pt` and `cifar10/test.pt` (written by `benchmarks.peer`):

    cd benchmarks/out/peer/peer_data && PYTHONPATH=../../../.. \
        python -m benchmarks.peer_script --script ~/cifar10-airbench/airbench94_muon.py --seed 0

The script is imported as a module (its `__main__` block, 200 runs, does not run) and its `main` called
once. On the CPU, what is patched is listed in benchmarks/peer_cpu.py: CUDA timing, `torch.compile` off,
float32 weights with a bf16 autocast forward, the data loader on the CPU. Besides, for hiverge's script:
its batched Newton-Schulz gets bf16 inputs where the CPU computes bf16 natively (on the GPU its weights
and so its inputs are fp16), and `evaluate` calls after its timed final TTA return NaN at once (its
untimed train-set and no-TTA scoring; the final model is scored at every TTA level afterwards anyway).
With `--device cuda`: as its `__main__` runs it (compiled, one warm-up run), but one timed run.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import peer_cpu
from ddp.muon import ns_dtype_for


def load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_newton_schulz(zeropower):
    """hiverge's batched Newton-Schulz on a list of gradients, computed in the CPU's native precision."""
    dtype = ns_dtype_for(torch.device("cpu"))

    def wrapped(gradients, *args, **kwargs):
        out = zeropower([g.to(dtype) for g in gradients], *args, **kwargs)
        return [o.to(g.dtype) for o, g in zip(out, gradients)]

    return wrapped


def nan_after_final_tta(evaluate):
    """evaluate(model, loader, tta_level) that, once a tta_level=2 call has returned, returns NaN at once."""
    done = [False]

    def wrapped(model, loader, tta_level=0):
        if done[0]:
            return float("nan")
        acc = evaluate(model, loader, tta_level)
        done[0] = tta_level == 2
        return acc

    return wrapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--script", type=Path, required=True, help="airbench94_muon.py or cifar10_speedrun.py")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before training")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the script unpatched")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if not args.script.is_file():
        sys.exit(f"error: --script {args.script}: no such file (give the path to the peer's checkout's script)")

    cpu = args.device == "cpu"
    if cpu:
        peer_cpu.no_compile()  # before the import: the script compiles at import time
        peer_cpu.cuda_timing_on_cpu()
    module = load_script(args.script)
    evaluate = module.evaluate
    peer_cpu.counting(module.CifarLoader)
    hiverge = hasattr(module, "_zeropower_via_newtonschulz5")
    if cpu:
        peer_cpu.init_on_cpu(module.CifarLoader)
        if hiverge:
            module._zeropower_via_newtonschulz5 = native_newton_schulz(module._zeropower_via_newtonschulz5)
        with peer_cpu.module_casts_disabled():
            model = peer_cpu.autocast_forward(module.CifarNet().to(memory_format=torch.channels_last))
    else:
        model = module.CifarNet().cuda().to(memory_format=torch.channels_last)
        model.compile(mode="max-autotune")
        module.main("warmup", model)  # before the PEER_* lines: the parent sees only the timed run

    if hiverge:
        module.evaluate = nan_after_final_tta(evaluate)
    module.print_training_details = peer_cpu.reporting(module.print_training_details)
    torch.manual_seed(args.seed)
    peer_cpu.TRAINED_IMAGES[0] = 0
    module.main(1, model)
    test_loader = module.CifarLoader("cifar10", train=False, batch_size=2000)
    peer_cpu.print_result(lambda level: evaluate(model, test_loader, tta_level=level))


if __name__ == "__main__":
    main()
