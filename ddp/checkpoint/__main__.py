"""python -m ddp.checkpoint {inspect,export,convert}: look inside, export weights, convert foreign files.

Errors are one line on stderr with exit status 2; no tracebacks for problems with the files themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddp import versions
from ddp.checkpoint.errors import CheckpointError, printable
from ddp.checkpoint.files import FORMAT, WEIGHTS_FORMAT, atomic_write, save_checkpoint
from ddp.checkpoint.keys import (
    WRAPPER_PREFIXES,
    WRAPPER_SEGMENTS,
    align_prefixes,
    detect_prefixes,
    diff_state,
    load_state_into,
    parse_remap,
    remap_prefixes,
)
from ddp.checkpoint.readers import Loaded, read_checkpoint
from ddp.checkpoint.state import TRAINING_PARTS, plain, training_state
from ddp.checkpoint.weights import MAX_CLASSES, Weights, extract_weights

PROG = "python -m ddp.checkpoint"


def _load_state(args: argparse.Namespace, trust_pickle: bool = False) -> tuple[Loaded, Weights, dict]:
    """(what the file holds, the chosen weight set, its canonical state with --remap applied)."""
    loaded = read_checkpoint(args.path, "cpu", trust_pickle=trust_pickle)
    weights = extract_weights(loaded, args.checkpoint_key)
    return loaded, weights, remap_prefixes(weights.state, args.remap) if args.remap else weights.state


def _remap_arg(text: str) -> tuple[str, str]:
    try:
        return parse_remap(text)
    except ValueError as e:  # argparse shows ArgumentTypeError's message instead of "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None


def _say(text: str) -> None:
    """Print a report line by line, control characters escaped: keys and class names come from the file."""
    for line in str(text).split("\n"):
        print(printable(line))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _file_size(path: Path) -> int:
    """Bytes of a file, or of the regular files directly in a directory (what the readers read)."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))


RECORDED = "<recorded>"  # inspect --model without a name


def _build_model(name: str, num_classes: int, recorded: bool = False):
    """The model to check the weights against; `recorded`: the name came from the file, so it imports nothing."""
    from ddp import models  # lazily: the rest of the CLI works without the model zoo

    try:
        return models.build(name, num_classes, recorded=recorded)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _key_rows(state: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in state.items()]


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    loaded, weights, state = _load_state(args)
    obj, train = loaded.obj, training_state(loaded.obj)
    config = train["config"] or {}
    info: dict[str, Any] = {
        "path": str(path), "file_size": _file_size(path), "container": loaded.container, "layout": weights.layout,
        "format": obj.get("format") if isinstance(obj, Mapping) else None,
        "weight_sets": weights.weight_sets, "weight_set": weights.chosen, "stand_ins": loaded.stand_ins,
        "progress": train["progress"], "metrics": train["metrics"], "env": train["env"], "config": config,
        "has": {k: bool(train[k]) for k in TRAINING_PARTS},
        "num_tensors": len(state), "numel": sum(t.numel() for t in state.values()),
        "prefixes": detect_prefixes(weights.raw_keys),
        "keys": _key_rows(state),
    }
    diff = None
    if args.model == RECORDED:
        args.model = None
        args.model, _, recorded = _model_of(args, weights, config)  # the name the file records, or an error
    else:
        recorded = False
    if args.model:
        _, num_classes, _ = _model_of(args, weights, config)
        model = _build_model(args.model, num_classes, recorded)
        state, aligned = align_prefixes(state, model.state_dict())
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        info["keys"] = _key_rows(state)  # as the model will see them
        for key in info["keys"]:
            param = params.get(key["name"])
            key["kind"] = ("buffer" if key["name"] in buffers else "not in model" if param is None
                           else "parameter" if param.requires_grad else "frozen parameter")  # not trained
        diff = diff_state(model.state_dict(), state)
        info["model"] = {"name": args.model, "num_classes": num_classes, "strict_load_ok": diff.ok,
                         "aligned": aligned, "missing": diff.missing, "unexpected": diff.unexpected,
                         "shape_mismatch": [{"key": k, "checkpoint": list(c), "model": list(m)}
                                            for k, c, m in diff.shape_mismatch]}
        diff.notes += [aligned] if aligned else []
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0

    def fmt(d: Mapping | None) -> str:
        return ", ".join(f"{k} {'-' if v is None else f'{v:.4g}' if isinstance(v, float) else v}"
                         for k, v in d.items()) if d else "-"

    wrappers = [p for p in info["prefixes"] if p in WRAPPER_PREFIXES + WRAPPER_SEGMENTS]
    others = [p for p in info["prefixes"] if p not in WRAPPER_PREFIXES + WRAPPER_SEGMENTS]
    prefixes = "; ".join([f"{' '.join(wrappers)} (stripped when loading)"] * bool(wrappers)
                         + [f"{p} (aligned to a model when it is the one that fits; or --remap {p}=)"
                            for p in others]) or "none"
    sets = ", ".join(f"{n} (loaded)" if n == weights.chosen else n for n in weights.weight_sets)
    _say(f"file        {path} ({_size(info['file_size'])}), read as {loaded.container}")
    _say(f"format      {info['format'] or 'none (foreign)'}; layout: {weights.layout}")
    if len(weights.weight_sets) > 1:
        _say(f"weight sets {sets}; pick one with --checkpoint-key")
    if loaded.stand_ins:
        _say(f"stand-ins   {len(loaded.stand_ins)} pickled classes, recorded but never imported or run:")
        _say("\n".join(f"  {name}" for name in loaded.stand_ins))
    _say(f"progress    {fmt(info['progress'])}")
    _say(f"metrics     {fmt(info['metrics'])}")
    _say(f"saved with  {fmt(info['env'])}")
    _say(f"config      {fmt({k: config[k] for k in ('model', 'dataset', 'num_classes') if k in config})}")
    _say(f"contains    {', '.join(k for k, v in info['has'].items() if v) or 'model weights only'}")
    _say(f"tensors     {info['num_tensors']} ({info['numel']:,} numbers)")
    _say(f"prefixes    {prefixes}")
    width = max((len(k["name"]) for k in info["keys"]), default=0)
    for key in info["keys"]:
        shape = "x".join(map(str, key["shape"])) or "scalar"
        _say(f"  {key['name']:<{width}}  {shape:<14} {key['dtype']:<9} {key.get('kind', '')}".rstrip())
    if diff is not None:
        _say(diff.report(f"vs {args.model} ({info['model']['num_classes']} classes)"))
        _say(f"strict load: {'would succeed' if diff.ok else 'would fail'}")
    return 0


def _model_of(args: argparse.Namespace, weights: Weights, config: Mapping) -> tuple[str, int, bool]:
    """(model name, number of classes, whether the name came from the file rather than --model)."""
    name = args.model or weights.info.get("model_name") or config.get("model")
    if not name or not isinstance(name, str):
        raise CheckpointError(f"{args.path} does not record which model it holds; pass --model NAME")
    recorded_classes = weights.info.get("num_classes") or config.get("num_classes") or 10
    if args.num_classes is None and not (type(recorded_classes) is int and 0 < recorded_classes <= MAX_CLASSES):
        raise CheckpointError(f"{args.path} records {str(recorded_classes)[:20]!r} classes; pass --num-classes")
    return name, args.num_classes if args.num_classes is not None else recorded_classes, not args.model


def _write_safetensors(state: Mapping[str, torch.Tensor], out: str, meta: dict[str, str]) -> None:
    from safetensors.torch import save as safetensors_bytes

    # contiguous CPU copies: safetensors refuses views and shared storage
    blob = safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, metadata=meta)
    atomic_write(out, lambda f: f.write(blob), what="safetensors file")


def cmd_export(args: argparse.Namespace) -> int:
    from ddp.data import CIFAR10_MEAN, CIFAR10_STD  # lazily: only export needs the normalisation constants

    _, weights, state = _load_state(args)
    name, num_classes, recorded = _model_of(args, weights, {})
    model = _build_model(name, num_classes, recorded)
    diff = load_state_into(model, state, strict=True)  # as evaluate does: the weights must fit the model named
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    mean, std = [float(x) for x in CIFAR10_MEAN], [float(x) for x in CIFAR10_STD]
    dataset = {"dataset": weights.info["dataset"]} if weights.info.get("dataset") else {}  # what it was trained on
    if args.safetensors or args.out.endswith(".safetensors"):
        _write_safetensors(state, args.out, {"format": WEIGHTS_FORMAT, "model_name": name,
                                             "num_classes": str(num_classes), "mean": json.dumps(mean),
                                             "std": json.dumps(std), **dataset})
    else:
        save_checkpoint({"format": WEIGHTS_FORMAT, "model": state, "model_name": name, "num_classes": num_classes,
                         "mean": mean, "std": std, **dataset}, args.out)
    notes = "".join(f"; {n}" for n in [weights.note, *diff.notes] if n)
    _say(f"wrote {args.out}: {len(state)} tensors, model {name}, {num_classes} classes (from {weights.layout}{notes})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    loaded, weights, state = _load_state(args, trust_pickle=args.trust_pickle)
    obj, train = loaded.obj, training_state(loaded.obj)
    config = dict(train["config"] or {})
    if weights.info.get("model_name"):
        config.setdefault("model", weights.info["model_name"])
    if args.model:
        config["model"] = args.model
    if args.num_classes is not None:
        config["num_classes"] = args.num_classes
    from ddp import models

    if config.get("model") in models.MODELS:  # keys as that model has them (Lightning's `model.` removed), checked
        model = _build_model(config["model"], int(config.get("num_classes") or 10))
        load_state_into(model, state, strict=True)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    to = args.to or ("safetensors" if args.out.endswith(".safetensors") else "ddp")
    if to == "safetensors":
        meta = {"format": WEIGHTS_FORMAT, **({"model_name": config["model"]} if "model" in config else {}),
                **({"num_classes": str(config["num_classes"])} if "num_classes" in config else {})}
        _write_safetensors(state, args.out, meta)
        _say(f"wrote {args.out}: {len(state)} tensors from {weights.layout} (weights only)")
        return 0
    ours = isinstance(obj, Mapping) and obj.get("format") == FORMAT
    ckpt = {"format": FORMAT, "model": state,
            **{k: train[k] for k in (*TRAINING_PARTS, "progress", "metrics")},
            "config": plain(config),
            "env": train["env"] or {"world_size": 1, "device": "cpu", "torch": str(torch.__version__)},
            "rng": obj.get("rng") if ours else None}  # a foreign file's RNG state can't be mapped to ours
    if to == "dcp":
        from ddp.checkpoint.dcp_writer import write_dcp

        write_dcp({k: v for k, v in ckpt.items() if v is not None}, args.out)
    else:
        save_checkpoint(ckpt, args.out)
    try:  # a trusted foreign optimizer state may still hold custom objects; the output must load safely
        read_checkpoint(args.out, "cpu")
    except CheckpointError:
        if to != "dcp":
            Path(args.out).unlink(missing_ok=True)
        raise
    extras = ", ".join(k for k in TRAINING_PARTS if ckpt[k]) or "no optimizer state"
    _say(f"wrote {args.out}{' (DCP directory)' if to == 'dcp' else ''}: {len(state)} tensors from "
          f"{weights.layout}; {extras}; epoch {ckpt['progress']['epoch']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("path", help="checkpoint file or directory: ours, torch (zip or legacy), Lightning, timm, "
                       ".safetensors, a shard index, a DCP directory, TorchScript, torch.export .pt2, gzip'd "
                       "(.pt.gz), DeepSpeed, accelerate save_state, a Hugging Face folder (docs/checkpoints.md)")
        p.add_argument("--remap", type=_remap_arg, action="append", metavar="OLD=NEW",
                       help="replace a leading OLD key prefix with NEW (repeatable; first match wins)")
        p.add_argument("--checkpoint-key", metavar="NAME",
                       help="the weight set to use when the file holds several (e.g. state_dict_ema, student; "
                            "dotted for nested ones: ema.module)")
        p.add_argument("--num-classes", type=int, help="default: what the checkpoint records, else 10")
        return p

    p = add("inspect", cmd_inspect, "show what a checkpoint holds and whether it fits a model")
    p.add_argument("--model", nargs="?", const=RECORDED, metavar="NAME",
                   help="diff the keys against ddp.models.build(NAME); --model alone: the model the file records")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = add("export", cmd_export, "write a weights-only file (model state + model name + normalisation), "
            "after checking that the weights fit the model")
    p.add_argument("out", help="output file (.safetensors writes safetensors)")
    p.add_argument("--safetensors", action="store_true", help="write safetensors with string metadata")
    p.add_argument("--model", help="model name, for checkpoints that do not record it")

    p = add("convert", cmd_convert, f"turn any readable layout into a {FORMAT} checkpoint, a .safetensors file, "
            "or a torch.distributed.checkpoint (DCP) directory that N ranks load")
    p.add_argument("out", help="output file, or directory with --to dcp")
    p.add_argument("--to", choices=["ddp", "safetensors", "dcp"],
                   help=f"output format (default: safetensors for *.safetensors, else {FORMAT})")
    p.add_argument("--trust-pickle", action="store_true",
                   help="import the classes a pickle names (e.g. torch.save(model)) instead of standing in for "
                   "them; this runs code from the file")
    p.add_argument("--model", help="model name to record in the config")
    return parser


def main(argv: list[str] | None = None) -> int:
    versions.require(PROG)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, OSError, ValueError, TypeError, ImportError) as e:
        print(printable(f"{PROG} {args.command}: error: {' '.join(str(e).split())}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
