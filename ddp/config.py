"""The trainer's flags: parsed and validated before any process group starts."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from ddp import data, models
from ddp.checkpoint import CheckpointFormatError, parse_remap
from ddp.optim import AMP_CHOICES

DEFAULTS = {"model": "fastnet", "dataset": "cifar10"}  # unless a resumed checkpoint names others
# Flags that change what is trained: on resume, those left out take the checkpoint's values (a run
# continues its own recipe, even after an upgrade changed the defaults); one given that differs is noted.
RECIPE_FLAGS = ["dataset", "model", "epochs", "batch_size", "optimizer", "muon_lr", "muon_momentum", "lr", "momentum",
                "weight_decay", "bn_bias_lr_scale", "label_smoothing", "brightness", "contrast", "warmup_epochs",
                "whiten_bias_epochs", "lookahead", "seed", "amp"]
RUN_NAME = "{model}-{dataset}-seed{seed}"

TTA_CHOICES = ["none", "flip", "full", "unsure"]  # test-time augmentation: --tta of ddp.train and ddp.evaluate


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (what is wrong, what to do) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def epoch_count(text: str) -> int | float:
    """--epochs: a whole number stays an int (8, not 8.0, in logs and checkpoints), else a float (7.5)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, such as 8 or 7.5; got {text!r}")
    return int(value) if value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m ddp.train",
        description="Train on CIFAR-10 or CIFAR-100 with DistributedDataParallel. Launch with torchrun for several "
        "processes, or run plainly for one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    inputs = p.add_argument_group("data")
    inputs.add_argument("--data-dir", default="data", help="directory holding cifar-10-batches-py/ or cifar-100-python/")
    inputs.add_argument("--dataset", default=None, choices=data.DATASET_CHOICES,
                        help=f"default: the resumed checkpoint's, else {DEFAULTS['dataset']}")
    inputs.add_argument("--download", action="store_true", help="download the dataset if missing (MD5-checked)")
    inputs.add_argument("--synthetic-size", type=int, default=4096,
                      help="training images of --dataset synthetic (test set: a fifth of that)")

    train = p.add_argument_group("training")
    train.add_argument("--model", default=None,
                       help=f"{models.NAME_HELP} (default: the resumed checkpoint's, else {DEFAULTS['model']})")
    train.add_argument("--epochs", type=epoch_count, default=8.5,
                       help="may end in a fraction: 7.5 trains the last epoch on its first half of batches "
                       "(the learning rate still reaches 0 at the last step)")
    train.add_argument("--batch-size", type=int, default=1536,
                       help="GLOBAL batch size, split evenly across all ranks; it stays the same "
                       "when the number of processes changes")
    train.add_argument("--optimizer", default="muon", choices=["muon", "sgd"],
                       help="muon: Muon for the conv filters (--muon-lr, --muon-momentum), SGD for the rest "
                       "(airbench94_muon); sgd: SGD for everything (airbench94)")
    train.add_argument("--muon-lr", type=float, default=0.205, help="Muon's peak learning rate (conv filters)")
    train.add_argument("--muon-momentum", type=float, default=0.655, help="Muon's Nesterov momentum")
    train.add_argument("--lr", type=float, default=1.03,
                       help="peak learning rate of the SGD-trained parameters (of the batch-mean loss)")
    train.add_argument("--momentum", type=float, default=0.825, help="SGD's Nesterov momentum")
    train.add_argument("--weight-decay", type=float, default=1.553e-3,
                       help="of the SGD-trained parameters (Muon keeps the filters' norm fixed instead)")
    train.add_argument("--bn-bias-lr-scale", type=float, default=85.6,
                       help="learning-rate multiplier for BatchNorm biases (their weight decay is divided by "
                       "it, so they decay as fast as the rest)")
    train.add_argument("--label-smoothing", type=float, default=0.09)
    train.add_argument("--brightness", type=float, default=0.0,
                       help="colour jitter: shift each training image by up to this much (in normalised units)")
    train.add_argument("--contrast", type=float, default=0.0,
                       help="colour jitter: scale each training image by a factor within 1 +- this")
    train.add_argument("--warmup-epochs", type=float, default=0.0,
                       help="linear warm-up from 0.2x to the peak LR, then linear decay to zero")
    train.add_argument("--whiten-bias-epochs", type=int, default=1,
                       help="train the whitening layer's bias (LR decaying to zero) for this many epochs, then "
                       "freeze it, which shortens the backward pass")
    train.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=False,
                       help="every 5 steps, pull the weights toward a slow average of them (airbench's schedule)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--amp", nargs="?", const="bf16", default="auto", choices=AMP_CHOICES,
                       help="mixed precision. auto: bf16 where the hardware computes it natively (CUDA with "
                       "bf16, CPUs with AVX512-BF16 or AMX), else none. --amp alone means bf16; fp16 is "
                       "CUDA only and adds a GradScaler")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--deterministic", action="store_true",
                       help="deterministic kernels (needed for bitwise-exact resume on GPU; slower)")

    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="auto: cuda:LOCAL_RANK when every local rank has a GPU, else cpu")
    run.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"],
                     help="auto: nccl on CUDA, gloo on CPU")
    run.add_argument("--timeout-min", type=float, default=10.0,
                     help="collective timeout: a stuck rank ends the job after this long")
    run.add_argument("--eval-every", type=int, default=0,
                     help="also evaluate every N epochs during training, with one view per image (each costs about "
                     "a tenth of an epoch); 0: only after the last epoch, which always evaluates, with --tta")
    run.add_argument("--tta", default="unsure", choices=TTA_CHOICES,
                     help="test-time augmentation of the final evaluation: none; flip (an image and its "
                     "mirror); full (airbench's 6 views: flips of the image and of its 1-pixel translations); unsure "
                     "(one view, then the 6 for the least confident quarter of the images)")
    run.add_argument("--log-every", type=int, default=50, help="log train loss every N steps")

    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-dir", default="checkpoints",
                      help="latest.pt, best.pt and epoch_NNNN.pt go here (written by global rank 0 only)")
    ckpt.add_argument("--resume", default="auto", metavar="{auto,latest,none,PATH}",
                      help="auto: continue from the newest valid checkpoint in --checkpoint-dir if there is "
                      "one, else start fresh; latest: require latest.pt; none: start fresh; or a file")
    ckpt.add_argument("--save-every", type=int, default=1, help="write latest.pt and an epoch file every N epochs "
                      "(and after the last); best.pt whenever test accuracy improves")
    ckpt.add_argument("--save-every-steps", type=int, default=0,
                      help="also write latest.pt every N optimizer steps, with the position in the epoch "
                      "(0: only at epoch ends)")
    ckpt.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                      help="save latest.pt and stop at global step N, keeping the --epochs schedule "
                      "(for time-sliced jobs; run again to continue)")
    ckpt.add_argument("--keep", type=int, default=3, help="epoch files to keep (0: keep all)")
    ckpt.add_argument("--init-from", default=None, metavar="PATH",
                      help="start from these weights only, non-strict, with a report: any file or directory "
                      "`python -m ddp.checkpoint inspect` reads (ours, torch, Lightning, timm, safetensors, "
                      "sharded, DCP); a single leading key prefix that stops the keys fitting is aligned")
    ckpt.add_argument("--remap", action="append", default=[], metavar="OLD=NEW",
                      help="with --init-from: rename a leading key prefix (repeatable), e.g. backbone.=")
    ckpt.add_argument("--checkpoint-key", default=None, metavar="NAME",
                      help="with --init-from: the weight set to take from a file that holds several, e.g. "
                      "state_dict_ema (timm) or student (default: the first of model, state_dict, "
                      "model_state_dict, net, module, network, teacher, student, model_ema, state_dict_ema, ema)")
    ckpt.add_argument("--min-match", type=float, default=0.5, metavar="FRACTION",
                      help="with --init-from: refuse when the keys that fit cover less than this fraction of "
                      "the model's parameters (by number of values), instead of training mostly from scratch; "
                      "0 accepts any partial load")
    run.add_argument("--logdir", default="runs", help="TensorBoard root directory")
    run.add_argument("--run-name", default=None,
                     help=f"TensorBoard run name of a fresh run, a template over the flags (default: {RUN_NAME!r}); "
                     "when taken, -v2, -v3, ... is added. A resumed run continues the run its checkpoint names")
    return p


def validate(args: argparse.Namespace, world_size: int) -> str | None:
    """The first problem with the flags, as a sentence that says what to do, or None."""
    try:
        models.find_builder(args.model or DEFAULTS["model"])
    except ValueError as e:
        return str(e)
    if not args.epochs > 0:  # the parser checks these three; a resumed checkpoint's values come this way
        return f"--epochs must be positive, got {args.epochs!r}"
    if args.optimizer not in ("muon", "sgd") or args.amp not in AMP_CHOICES:
        return f"--optimizer must be muon or sgd and --amp one of {', '.join(AMP_CHOICES)}"
    if not -2**63 <= args.seed < 2**64:  # torch.manual_seed's range
        return f"--seed must fit in 64 bits, got {args.seed}"
    for name in ["batch_size", "log_every", "synthetic_size", "save_every"]:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    for name in ["lr", "muon_lr", "bn_bias_lr_scale", "timeout_min"]:
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    for name in ["momentum", "muon_momentum", "label_smoothing"]:
        if not 0 <= getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(args, name)}"
    if min(args.weight_decay, args.warmup_epochs, args.whiten_bias_epochs, args.brightness, args.contrast) < 0:
        return "--weight-decay, --warmup-epochs, --whiten-bias-epochs, --brightness and --contrast must not be negative"
    if args.batch_size < world_size:
        return f"--batch-size {args.batch_size} is smaller than the {world_size} processes; raise it"
    if args.batch_size % world_size:
        return (f"--batch-size {args.batch_size} does not split evenly across {world_size} processes; "
                f"use a multiple of {world_size}")
    train_size = args.synthetic_size if args.dataset == "synthetic" else data.TRAIN_SIZE
    if args.batch_size > train_size:
        return f"--batch-size {args.batch_size} is larger than the {train_size} training images"
    if args.eval_every < 0:
        return f"--eval-every must be 0 (only after the last epoch) or more, got {args.eval_every}"
    if args.save_every_steps < 0 or (args.stop_at_step is not None and args.stop_at_step < 1):
        return "--save-every-steps must be 0 or more, and --stop-at-step at least 1"
    if args.keep < 0:
        return f"--keep must be 0 (keep all) or more, got {args.keep}"
    for flag, path in [("--resume", args.resume), ("--init-from", args.init_from)]:
        if path not in (None, "auto", "latest", "none") and not Path(path).exists():
            return f"{flag} {path}: no such file or directory; give a checkpoint, or --resume auto/latest/none"
    for rule in args.remap:
        try:
            parse_remap(rule)
        except ValueError as e:
            return str(e)
    if (args.remap or args.checkpoint_key) and not args.init_from:
        return "--remap and --checkpoint-key apply to --init-from weights; give --init-from PATH too"
    if not 0 <= args.min_match <= 1:
        return f"--min-match must lie in [0, 1], got {args.min_match}"
    if args.backend == "nccl" and args.device == "cpu":
        return "--backend nccl needs CUDA; use --backend gloo (or auto) with --device cpu"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; exit with a one-line message on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = build_parser()  # the same flags, every default suppressed: what the command line itself set
    for action in given._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(given.parse_args(argv)))  # a set: neither saved in checkpoints nor logged
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun before we start
    problem = validate(args, world_size)
    if problem:
        parser.error(problem)
    try:
        (args.run_name or RUN_NAME).format(**{**vars(args), **DEFAULTS})
    except (KeyError, IndexError, ValueError) as e:
        parser.error(f"--run-name {args.run_name!r} is not a valid template over the flags ({e!r})")
    return args


def resolve(args: argparse.Namespace, recorded: dict[str, Any] | None) -> None:
    """Fill in what depends on a resumed checkpoint's config (`recorded`; None when starting fresh).

    --model and --dataset left out: the checkpoint's, else the defaults. The TensorBoard run: the
    checkpoint's, whatever --run-name says (a resumed, restarted or requeued run continues its own run),
    else --run-name (default RUN_NAME) formatted over the flags.
    """
    recorded = recorded if isinstance(recorded, dict) else {}
    for name in RECIPE_FLAGS:
        value = recorded.get(name)
        if name not in DEFAULTS and name not in getattr(args, "given", ()) and _same_kind(name, value, getattr(args, name)):
            setattr(args, name, value)
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, recorded.get(name) or default)
            if recorded.get(name):  # what a file says is checked like a flag, and never imports anything
                _check_recorded(name, recorded[name])
    problem = validate(args, int(os.environ.get("WORLD_SIZE", "1")))
    if problem:  # a recorded value this code refuses, or a batch this world size cannot split
        raise CheckpointFormatError(f"the resumed checkpoint's recipe does not fit: {problem}; give that flag")
    run_name = recorded.get("run_name")
    name = run_name if isinstance(run_name, str) and run_name else (args.run_name or RUN_NAME).format(**vars(args))
    args.run_name = name.replace(":", "_")  # from torchvision:NAME; ':' in a path trips up some tools


def _same_kind(name: str, value: Any, current: Any) -> bool:
    """A recorded value may stand in for a flag's only if it is a plain value of the flag's type."""
    if isinstance(current, bool) or isinstance(value, bool):
        return type(value) is type(current)
    if isinstance(current, int) and name != "epochs":  # --epochs may be an int or a float
        return type(value) is int
    if isinstance(current, (int, float)):
        return type(value) in (int, float) and math.isfinite(value)
    return isinstance(value, str) and isinstance(current, str)


def _check_recorded(flag: str, value: Any) -> None:
    try:
        if flag == "model":
            models.find_builder(value, recorded=True)
        elif value not in data.DATASET_CHOICES:
            raise ValueError(f"the checkpoint records dataset {str(value)[:40]!r}, which this code does not know; "
                             f"pass --dataset ({', '.join(data.DATASET_CHOICES)})")
    except (ValueError, TypeError) as e:
        raise CheckpointFormatError(str(e)) from None


def to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as plain types, for checkpoints and TensorBoard."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool, list))}
