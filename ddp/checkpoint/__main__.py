"""python -m ddp.checkpoint {inspect,export,convert}: look inside, export weights, convert foreign files.

Errors are one line on stderr with exit status 2; no tracebacks for problems with the files themselves.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import CheckpointError
from ddp.checkpoint.files import (
    FORMAT,
    WEIGHTS_FORMAT,
    atomic_write,
    find_model_state,
    load_checkpoint,
    save_checkpoint,
)
from ddp.checkpoint.keys import (
    WRAPPER_PREFIXES,
    detect_prefixes,
    diff_state,
    parse_remap,
    remap_prefixes,
    strip_wrapper_prefixes,
)
from ddp.checkpoint.state import plain

PROG = "python -m ddp.checkpoint"


def _load_state(path: str, args: argparse.Namespace, trust_pickle: bool = False) -> tuple[Any, str, dict, dict]:
    """(loaded object, layout, raw state, canonical state with --remap applied)."""
    obj = load_checkpoint(path, "cpu", trust_pickle=trust_pickle)
    layout, raw = find_model_state(obj)
    state = strip_wrapper_prefixes(raw)
    if getattr(args, "remap", None):
        state = remap_prefixes(state, args.remap)
    return obj, layout, dict(raw), state


def _remap_arg(text: str) -> tuple[str, str]:
    try:
        return parse_remap(text)
    except ValueError as e:  # argparse shows ArgumentTypeError's message instead of "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        return None
    return float(value) if not isinstance(value, torch.Tensor) or value.numel() == 1 else None


def _first(obj: Mapping, keys: tuple[str, ...], accept) -> Any:
    return next((obj[k] for k in keys if k in obj and accept(obj[k]) is not None), None)


TRAINING_PARTS = ("optimizer", "scheduler", "scaler", "lookahead")  # the resumable state besides the weights


def _training_state(obj: Any) -> dict[str, Any]:
    """Optimizer/scheduler/scaler/lookahead state and progress/metrics from our format, or guessed from a foreign dict."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return {k: obj.get(k) for k in (*TRAINING_PARTS, "progress", "metrics", "config", "env")}
    obj = obj if isinstance(obj, Mapping) else {}

    def state_dict(value: Any) -> Any:
        return value if isinstance(value, Mapping) else None

    optimizer = _first(obj, ("optimizer", "optimizer_state_dict", "optim", "opt"),
                       lambda v: v if isinstance(v, Mapping) and "param_groups" in v else None)
    epoch, step = _first(obj, ("epoch", "epochs"), _num), _first(obj, ("step", "global_step", "iteration"), _num)
    best = _first(obj, ("best_acc", "best_acc1", "best_prec1", "best_top1", "best_accuracy"), _num)
    config = {"model": obj["model_name"], "num_classes": obj["num_classes"]} if "model_name" in obj else {}
    return {"optimizer": optimizer,
            "scheduler": _first(obj, ("scheduler", "lr_scheduler", "scheduler_state_dict"), state_dict),
            "scaler": _first(obj, ("scaler", "grad_scaler", "scaler_state_dict"), state_dict),
            "lookahead": None,
            "progress": {"epoch": int(_num(epoch) or 0), "step": int(_num(step) or 0), "batch_in_epoch": 0},
            "metrics": {"best_acc": _num(best) or 0.0, "acc": _num(_first(obj, ("acc", "acc1", "accuracy"), _num)),
                        "loss": _num(_first(obj, ("loss", "val_loss"), _num))},
            "config": config, "env": None}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    obj, layout, raw, state = _load_state(args.path, args)
    train = _training_state(obj)
    config = train["config"] or {}
    info: dict[str, Any] = {
        "path": str(path), "file_size": path.stat().st_size, "layout": layout,
        "format": obj.get("format") if isinstance(obj, Mapping) else None,
        "progress": train["progress"], "metrics": train["metrics"], "env": train["env"], "config": config,
        "has": {k: bool(train[k]) for k in TRAINING_PARTS},
        "num_tensors": len(state), "numel": sum(t.numel() for t in state.values()),
        "prefixes": detect_prefixes(raw),
        "keys": [{"name": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                 for k, t in state.items()],
    }
    diff = None
    if args.model:
        from ddp import models  # lazily: the rest of the CLI works without the model zoo

        num_classes = args.num_classes if args.num_classes is not None else int(config.get("num_classes") or 10)
        model = models.build(args.model, num_classes)
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        for key in info["keys"]:
            param = params.get(key["name"])
            key["kind"] = ("buffer" if key["name"] in buffers else "not in model" if param is None
                           else "parameter" if param.requires_grad else "frozen parameter")  # not trained
        diff = diff_state(model.state_dict(), state)
        info["model"] = {"name": args.model, "num_classes": num_classes, "strict_load_ok": diff.ok,
                         "missing": diff.missing, "unexpected": diff.unexpected,
                         "shape_mismatch": [{"key": k, "checkpoint": list(c), "model": list(m)}
                                            for k, c, m in diff.shape_mismatch]}
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0

    def fmt(d: Mapping | None) -> str:
        return ", ".join(f"{k} {'-' if v is None else f'{v:.4g}' if isinstance(v, float) else v}"
                         for k, v in d.items()) if d else "-"

    wrappers = [p for p in info["prefixes"] if p in WRAPPER_PREFIXES]
    others = [p for p in info["prefixes"] if p not in WRAPPER_PREFIXES]
    prefixes = "; ".join([f"{' '.join(wrappers)} (stripped when loading)"] * bool(wrappers)
                         + [f"{p} (rename with --remap {p}=)" for p in others]) or "none"
    print(f"file        {path} ({_size(info['file_size'])})")
    print(f"format      {info['format'] or 'none (foreign)'}; layout: {layout}")
    print(f"progress    {fmt(info['progress'])}")
    print(f"metrics     {fmt(info['metrics'])}")
    print(f"saved with  {fmt(info['env'])}")
    print(f"config      {fmt({k: config[k] for k in ('model', 'num_classes') if k in config})}")
    print(f"contains    {', '.join(k for k, v in info['has'].items() if v) or 'model weights only'}")
    print(f"tensors     {info['num_tensors']} ({info['numel']:,} numbers)")
    print(f"prefixes    {prefixes}")
    width = max((len(k["name"]) for k in info["keys"]), default=0)
    for key in info["keys"]:
        shape = "x".join(map(str, key["shape"])) or "scalar"
        print(f"  {key['name']:<{width}}  {shape:<14} {key['dtype']:<9} {key.get('kind', '')}".rstrip())
    if diff is not None:
        print(diff.report(f"vs {args.model} ({info['model']['num_classes']} classes)"))
        print(f"strict load: {'would succeed' if diff.ok else 'would fail'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ddp.data import CIFAR10_MEAN, CIFAR10_STD  # lazily: only export needs the normalisation constants

    obj, layout, _, state = _load_state(args.path, args)
    config = _training_state(obj)["config"] or {}
    name = args.model or config.get("model")
    if not name:
        raise CheckpointError(f"{args.path} does not record which model it holds; pass --model NAME")
    num_classes = int(args.num_classes if args.num_classes is not None else config.get("num_classes") or 10)
    # contiguous CPU copies: safetensors refuses views and shared storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    mean, std = [float(x) for x in CIFAR10_MEAN], [float(x) for x in CIFAR10_STD]
    if args.safetensors:
        from safetensors.torch import save as safetensors_bytes

        meta = {"format": WEIGHTS_FORMAT, "model_name": name, "num_classes": str(num_classes),
                "mean": json.dumps(mean), "std": json.dumps(std)}
        blob = safetensors_bytes(state, metadata=meta)
        atomic_write(args.out, lambda f: f.write(blob), what="export")
    else:
        save_checkpoint({"format": WEIGHTS_FORMAT, "model": state, "model_name": name, "num_classes": num_classes,
                         "mean": mean, "std": std}, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, model {name}, {num_classes} classes (from {layout})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    obj, layout, _, state = _load_state(args.path, args, trust_pickle=args.trust_pickle)
    train = _training_state(obj)
    config = dict(train["config"] or {})
    if args.model:
        config["model"] = args.model
    if args.num_classes is not None:
        config["num_classes"] = args.num_classes
    ours = isinstance(obj, Mapping) and obj.get("format") == FORMAT
    ckpt = {"format": FORMAT, "model": state,
            **{k: train[k] for k in (*TRAINING_PARTS, "progress", "metrics")},
            "config": plain(config),
            "env": train["env"] or {"world_size": 1, "device": "cpu", "torch": str(torch.__version__)},
            "rng": obj.get("rng") if ours else None}  # a foreign file's RNG state can't be mapped to ours
    save_checkpoint(ckpt, args.out)
    try:  # a trusted foreign optimizer state may still hold custom objects; the output must load safely
        load_checkpoint(args.out, "cpu")
    except CheckpointError:
        Path(args.out).unlink(missing_ok=True)
        raise
    extras = ", ".join(k for k in TRAINING_PARTS if ckpt[k]) or "no optimizer state"
    print(f"wrote {args.out}: {len(state)} tensors from {layout}; {extras}; epoch {ckpt['progress']['epoch']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("path", help="checkpoint file (ours or a foreign layout)")
        return p

    def remap(p: argparse.ArgumentParser) -> None:
        p.add_argument("--remap", type=_remap_arg, action="append", metavar="OLD=NEW",
                       help="replace a leading OLD key prefix with NEW (repeatable; first match wins)")

    p = add("inspect", cmd_inspect, "show what a checkpoint holds and whether it fits a model")
    p.add_argument("--model", help="diff the keys against ddp.models.build(MODEL)")
    p.add_argument("--num-classes", type=int, help="for --model (default: the checkpoint's config, else 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    remap(p)

    p = add("export", cmd_export, "write a weights-only file (model state + model name + normalisation)")
    p.add_argument("out", help="output file")
    p.add_argument("--safetensors", action="store_true", help="write .safetensors with string metadata")
    p.add_argument("--model", help="model name, for checkpoints that do not record it")
    p.add_argument("--num-classes", type=int, help="default: the checkpoint's config, else 10")
    remap(p)

    p = add("convert", cmd_convert, f"turn any recognised layout into a {FORMAT} checkpoint")
    p.add_argument("out", help="output file")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow files with pickled objects (e.g. torch.save(model)); this runs code from the file")
    p.add_argument("--model", help="model name to record in the config")
    p.add_argument("--num-classes", type=int, help="number of classes to record in the config")
    remap(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, OSError, ValueError, TypeError, ImportError) as e:
        print(f"{PROG} {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
