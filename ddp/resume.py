"""What a run starts from: the checkpoint it resumes (per --resume), or the weights of --init-from."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from torch import nn

from ddp import checkpoint
from ddp.dist import Context, log


def find_resume_checkpoint(args: argparse.Namespace, ctx: Context) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, loaded onto this rank's device and checked part by part, per --resume;
    None to start fresh."""
    found = _find(args, ctx)
    if found is not None:
        checkpoint.check_resumable(found[1], str(found[0]))
    return found


def _find(args: argparse.Namespace, ctx: Context) -> tuple[Path, dict] | None:
    if args.resume == "none":
        return None
    if args.resume not in ("auto", "latest"):  # any file or directory the one reader knows (a DCP copy, say)
        return Path(args.resume), checkpoint.read_checkpoint(args.resume, map_location=ctx.device).obj
    latest = Path(args.checkpoint_dir) / checkpoint.LATEST_NAME
    if args.resume == "latest":
        return latest, checkpoint.load_checkpoint(latest, map_location=ctx.device)
    with warnings.catch_warnings(record=True) as caught:  # damaged files: say so once, on rank 0
        warnings.simplefilter("always", checkpoint.DamagedCheckpointWarning)
        found = checkpoint.newest_valid_checkpoint(args.checkpoint_dir, map_location=ctx.device)
    skipped = [w for w in caught if issubclass(w.category, checkpoint.DamagedCheckpointWarning)]
    for warning in skipped:
        log(f"warning: {warning.message}")
    if found is None and skipped:  # never silently throw away a run's progress
        raise checkpoint.CheckpointCorruptError(
            f"no valid checkpoint in {args.checkpoint_dir}/ ({len(skipped)} damaged files, see above); "
            "restore one, or pass --resume none to start fresh")
    if found is None:
        log(f"no checkpoint in {args.checkpoint_dir}/: starting fresh")
    return found


def init_from(args: argparse.Namespace, model: nn.Module, ctx: Context) -> None:
    """--init-from: one weight set, prefixes remapped and aligned, loaded non-strictly, with a report.

    Refuses (on every rank: each reads the file itself) when less than --min-match of the parameters fit.
    """
    weights = checkpoint.load_weights(args.init_from, map_location=ctx.device, checkpoint_key=args.checkpoint_key)
    state = checkpoint.remap_prefixes(weights.state, [checkpoint.parse_remap(rule) for rule in args.remap])
    diff = checkpoint.load_state_into(model, state, strict=False, min_match=args.min_match)
    log(f"--init-from {args.init_from}: {weights.layout}" + (f"; {weights.note}" if weights.note else ""))
    log(diff.report(f"--init-from {args.init_from}"))
