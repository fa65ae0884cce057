"""Test accuracy of any checkpoint or export, on any device, alone or under torchrun.

    python -m ddp.evaluate --checkpoint checkpoints/best.pt --data-dir data
    torchrun --standalone --nproc_per_node=2 -m ddp.evaluate --checkpoint model.safetensors --device cpu
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ddp import checkpoint, data, models, versions
from ddp.config import DEFAULTS, TTA_CHOICES, OneLineParser
from ddp.dist import Context, all_reduce_sum, log, process_group
from ddp.optim import AMP_CHOICES, autocast, autocast_dtype

UNSURE_SHARE = 0.25  # --tta unsure: the share of the test set, least confident first, that gets all six views


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Float logits of a normalised batch, averaged over test-time views (the model is in eval mode).

    none: the image; flip: the image and its mirror; full (airbench's): half that, plus half the same
    pair for each of the 1-pixel translations up-left and down-right (reflection padding), averaged.
    (unsure is evaluate's: it needs the whole set's confidences.)
    """
    if tta == "none":
        return model(x).float()

    def with_mirror(v: torch.Tensor) -> torch.Tensor:
        return (model(v).float() + model(v.flip(3)).float()) / 2

    logits = with_mirror(x)
    if tta == "full":
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        logits = (logits + (with_mirror(padded[..., :h, :w]) + with_mirror(padded[..., 2:, 2:])) / 2) / 2
    return logits


def least_confident(logits: torch.Tensor, mine: torch.Tensor, total: int, ctx: Context) -> torch.Tensor:
    """Positions in `mine` of this rank's images among the UNSURE_SHARE of all `total` with the lowest top
    probability. Every rank sees every confidence (one all-reduce of `total` floats), so the choice is the
    same at any world size and batch size."""
    confidence = torch.zeros(total, dtype=torch.float32, device=logits.device)
    confidence[mine] = logits.softmax(1).amax(1)
    if ctx.world_size > 1:
        dist.all_reduce(confidence, op=dist.ReduceOp.SUM)
    threshold = confidence.kthvalue(math.ceil(UNSURE_SHARE * total)).values
    return torch.nonzero(confidence[mine] <= threshold).flatten()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: Context,
             amp_dtype: torch.dtype | None = None, tta: str = "flip",
             batch_size: int = 1000) -> tuple[float, float]:
    """(loss, accuracy) over the whole set; rank r scores images r, r+N, ..., so each counts once.

    Forward passes run under autocast to amp_dtype (None: float32), over the views `tta` names; unsure
    (hiverge's idea): one view, then all six for the least confident quarter of the set, where nearly all
    the errors are: 2.5 views' work instead of 6.
    """
    model.eval()
    mine = torch.arange(ctx.rank, len(images), ctx.world_size, device=images.device)

    def predict(positions: torch.Tensor, views: str) -> torch.Tensor:
        with autocast(ctx.device, amp_dtype):
            return tta_logits(model, data.normalize(images[mine[positions]]), views)

    positions = torch.arange(len(mine), device=images.device)
    logits = torch.cat([predict(part, "none" if tta == "unsure" else tta) for part in positions.split(batch_size)])
    if tta == "unsure":
        for part in least_confident(logits, mine, len(images), ctx).split(batch_size):
            logits[part] = predict(part, "full")
    loss_sum = F.cross_entropy(logits, labels[mine], reduction="sum").item()
    correct = (logits.argmax(1) == labels[mine]).sum().item()
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, len(mine)], ctx.device)
    return loss_sum / count, correct / count


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m ddp.evaluate", description=__doc__.split("\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint, an export (.pt or .safetensors), or any "
                   "file or directory `python -m ddp.checkpoint inspect` reads")
    p.add_argument("--model", default=None, help="model name, when the file does not record it (see ddp.train --help)")
    p.add_argument("--num-classes", type=int, default=None, help="when the file does not record it (default 10)")
    p.add_argument("--checkpoint-key", default=None, metavar="NAME",
                   help="the weight set to evaluate, in a file that holds several (e.g. state_dict_ema)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--dataset", default=None, choices=data.DATASET_CHOICES,
                   help=f"default: the one the checkpoint records, else {DEFAULTS['dataset']}")
    p.add_argument("--synthetic-size", type=int, default=4096, help="as given to ddp.train")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision, as for ddp.train (the same flag gives the trainer's accuracy)")
    p.add_argument("--tta", default="unsure", choices=TTA_CHOICES,
                   help="test-time augmentation, as ddp.train's --tta (none, flip, full: 6 views, unsure: 6 views "
                   "for the least confident quarter of the set)")
    return p


def main(argv: list[str] | None = None) -> None:
    versions.require("python -m ddp.evaluate")
    args = build_parser().parse_args(argv)
    with process_group(args.device) as ctx:
        try:
            # Every rank reads the file itself, straight onto its own device.
            weights = checkpoint.load_weights(args.checkpoint, map_location=ctx.device,
                                              checkpoint_key=args.checkpoint_key)
            name = args.model or weights.info.get("model_name")
            if name is None:
                raise checkpoint.CheckpointFormatError(
                    f"{args.checkpoint} does not record its model; pass --model ({', '.join(models.MODELS)})")
            dataset = args.dataset or weights.info.get("dataset") or DEFAULTS["dataset"]
            if dataset not in data.DATASET_CHOICES:
                raise checkpoint.CheckpointFormatError(f"{args.checkpoint} records dataset {str(dataset)[:40]!r}, "
                                                       f"which this code does not know; pass --dataset")
            model = models.build(name, args.num_classes or weights.info.get("num_classes") or data.num_classes(dataset),
                                 recorded=args.model is None)
            model = model.to(ctx.device, memory_format=torch.channels_last)
            diff = checkpoint.load_state_into(model, weights.state, strict=True)
            for note in [weights.note, *diff.notes]:
                if note:
                    log(note)
            images, labels = data.load_split(dataset, args.data_dir, args.synthetic_size, train=False)
        except (checkpoint.CheckpointError, data.DataError, FileNotFoundError, ValueError) as e:
            log(f"error: {e}", every_rank=True)
            sys.exit(2)
        loss, acc = evaluate(model, images.to(ctx.device), labels.to(ctx.device), ctx,
                             amp_dtype=autocast_dtype(args.amp, ctx.device), tta=args.tta)
        log(f"{args.checkpoint}: {name} on {len(images)} {dataset} test images | loss {loss:.4f} | "
            f"accuracy {100 * acc:.2f}% ({args.tta} TTA) | "
            f"{ctx.world_size} x {ctx.device.type}")


if __name__ == "__main__":
    main()
