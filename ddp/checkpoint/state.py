"""Training state: the full checkpoint dict, RNG capture, and the checkpoint directory's files."""

from __future__ import annotations

import argparse
import os
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddp.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointMismatchError,
    DamagedCheckpointWarning,
    first_line,
)
from ddp.checkpoint.files import FORMAT, LATEST_NAME
from ddp.checkpoint.keys import load_state_into, unwrap_model
from ddp.checkpoint.readers.torch_file import load_checkpoint

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def plain(x: Any, where: str = "config") -> Any:
    """Convert to what weights_only loading accepts: tuples->lists, paths->str, numpy scalars/arrays->Python."""
    if x is None or isinstance(x, torch.Tensor) or type(x) in (bool, int, float, str):
        return x
    for base in (int, float, str):  # subclasses (np.float64, TorchVersion) would pickle as foreign globals
        if isinstance(x, base):
            return base(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, Mapping):
        return {k if isinstance(k, (str, int)) else str(k): plain(v, f"{where}.{k}") for k, v in x.items()}
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return plain(x.tolist(), where)
    raise TypeError(f"{where}: {type(x).__name__} cannot go into a checkpoint; use str/int/float/bool/None/list/dict")


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


OPTIONAL = (Mapping, type(None))
RESUMED_PARTS = {"model": Mapping, "progress": Mapping, "config": Mapping, "metrics": Mapping, "env": Mapping,
                 "optimizer": OPTIONAL, "scheduler": OPTIONAL, "scaler": OPTIONAL, "lookahead": OPTIONAL, "rng": OPTIONAL}


def capture_rng() -> dict:
    """Python, numpy, torch CPU and (if available) every CUDA device's RNG state, as plain types/tensors."""
    s = np.random.get_state(legacy=False)
    numpy_state = {"bit_generator": s["bit_generator"], "pos": int(s["state"]["pos"]),
                   "key": torch.from_numpy(s["state"]["key"].astype(np.int64)),  # uint32 -> int64, lossless
                   "has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}
    return {"python": plain(random.getstate()),  # (version, tuple of 625 ints, gauss) -> lists
            "numpy": numpy_state,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: Mapping[str, Any] | None) -> None:
    """Inverse of capture_rng; missing parts (e.g. converted checkpoints) and absent CUDA devices are skipped."""
    if not state:
        return
    try:
        _restore_rng(state)
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError, IndexError) as e:
        raise CheckpointFormatError(f"the checkpoint's RNG state does not restore ({first_line(e, 100)}): damaged or "
                                    "crafted; pick another checkpoint") from None


def _restore_rng(state: Mapping[str, Any]) -> None:
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        s = state["numpy"]
        np.random.set_state({"bit_generator": s["bit_generator"], "has_gauss": s["has_gauss"], "gauss": s["gauss"],
                             "state": {"key": s["key"].cpu().numpy().astype(np.uint32), "pos": s["pos"]}})
    # map_location may have moved these tensors to a GPU, but the generators only take CPU byte tensors
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():  # restore what overlaps if the GPU count changed
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def make_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any,
                    lookahead: Any = None, *,
                    progress: Mapping[str, int], metrics: Mapping[str, Any], config: Mapping[str, Any] | Any,
                    world_size: int, device_type: str) -> dict:
    """Everything needed to resume, in our format. `config` may be a dict or an argparse.Namespace.

    Tensors are views of the live weights/optimizer state (no copy): save right away, or deepcopy to keep.
    """
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    return {
        "format": FORMAT,
        # unwrapped, so keys carry no module./_orig_mod. and the weights load into a bare model
        "model": {k: v.detach() for k, v in unwrap_model(model).state_dict().items()},
        # optimizer state is keyed by parameter index (the order of model.parameters()), not by name, so it is
        # the same with or without DDP/compile wrappers
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "lookahead": lookahead.state_dict() if lookahead is not None else None,  # the slow weights, if used
        "progress": {k: int(v) for k, v in {"epoch": 0, "step": 0, "batch_in_epoch": 0, **progress}.items()},
        "metrics": {k: _opt_float(v) for k, v in {"best_acc": 0.0, "acc": None, "loss": None, **metrics}.items()},
        "config": plain(dict(config)),
        "env": {"world_size": int(world_size), "device": str(device_type), "torch": str(torch.__version__)},
        "rng": capture_rng(),
    }


def check_resumable(ckpt: Any, where: str = "the checkpoint") -> None:
    """Refuse, in one line, a file that is not a training checkpoint of ours in every part resume reads.

    A latest.pt can come from anywhere (--resume PATH): its parts are checked before any is used.
    """
    fmt = ckpt.get("format") if isinstance(ckpt, Mapping) else None
    if fmt != FORMAT:
        raise CheckpointFormatError(f"cannot resume from a checkpoint of format {str(fmt)[:40]!r} (need {FORMAT!r}); "
                                    "for weights from elsewhere use --init-from, or `python -m ddp.checkpoint convert`")
    bad = [key for key, kinds in RESUMED_PARTS.items() if not isinstance(ckpt.get(key), kinds)]
    model, progress = ckpt.get("model"), ckpt.get("progress") or {}
    if not bad and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        bad = ["model"]
    if not bad and not all(type(progress.get(k)) is int and progress[k] >= 0 for k in ("epoch", "batch_in_epoch", "step")):
        bad = ["progress"]
    if bad:
        raise CheckpointFormatError(f"{where} is not a {FORMAT} training checkpoint as this code writes it (its "
                                    f"{bad[0]!r} is {type(ckpt.get(bad[0])).__name__}): damaged or crafted; pick "
                                    "another checkpoint, or --resume none")


def restore_checkpoint(ckpt: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None, scaler: Any = None, lookahead: Any = None) -> None:
    """Load model (strict), then optimizer/scheduler/scaler/lookahead state; RNG is left to the caller (restore_rng)."""
    check_resumable(ckpt)
    load_state_into(model, ckpt["model"], strict=True)
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            warnings.warn("checkpoint has no optimizer state; the optimizer starts fresh", stacklevel=2)
        else:
            try:  # load_state_dict casts/moves the state to each parameter's device and dtype
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
                groups = ckpt["optimizer"].get("param_groups") if isinstance(ckpt["optimizer"], Mapping) else None
                groups = groups if isinstance(groups, list) and all(isinstance(g, Mapping) for g in groups) else None
                if groups and not any("name" in group for group in groups):  # tests/fixtures/checkpoints/48d373d-*
                    raise CheckpointMismatchError(
                        "this checkpoint predates the Muon recipe (its optimizer's parameter groups have no names), "
                        "so its optimizer state cannot continue today's; start from its weights instead: "
                        "--init-from FILE --resume none") from e
                raise CheckpointMismatchError(f"optimizer state does not fit: {first_line(e)}; was the checkpoint "
                                              "saved with a different optimizer or model?") from e
    if scheduler is not None:
        if ckpt.get("scheduler") is None:
            warnings.warn("checkpoint has no scheduler state; the LR schedule restarts", stacklevel=2)
        else:
            _load_part("scheduler", scheduler, ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):  # {} means saved without AMP: keep the fresh scaler
        _load_part("scaler", scaler, ckpt["scaler"])
    if lookahead is not None:
        if ckpt.get("lookahead") is None:  # saved without lookahead: the slow weights start as the loaded ones
            lookahead.reset()
        else:
            _load_part("lookahead", lookahead, ckpt["lookahead"])


def _load_part(name: str, target: Any, state: Any) -> None:
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointMismatchError(f"{name} state does not fit: {first_line(e)}; was the checkpoint saved with "
                                      "another recipe, or damaged?") from e


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        return None
    return float(value) if not isinstance(value, torch.Tensor) or value.numel() == 1 else None


def _first(obj: Mapping, keys: tuple[str, ...], accept) -> Any:
    return next((obj[k] for k in keys if k in obj and accept(obj[k]) is not None), None)


TRAINING_PARTS = ("optimizer", "scheduler", "scaler", "lookahead")  # the resumable state besides the weights


def training_state(obj: Any) -> dict[str, Any]:
    """Optimizer/scheduler/scaler/lookahead state and progress/metrics from our format, or guessed from a foreign
    dict (what `inspect` shows and `convert` keeps)."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        parts = {k: obj.get(k) for k in (*TRAINING_PARTS, "progress", "metrics", "config", "env")}
        # a file's word on these is shown, not trusted: a list where a dict belongs is shown as nothing
        return {k: v if k in TRAINING_PARTS or isinstance(v, Mapping) else None for k, v in parts.items()}
    obj = obj if isinstance(obj, Mapping) else {}

    def state_dict(value: Any) -> Any:
        return value if isinstance(value, Mapping) else None

    def single(key: str) -> dict:  # Lightning keeps lists: optimizer_states, lr_schedulers
        value = obj.get(key)
        return {key: value[0]} if isinstance(value, list) and len(value) == 1 else {}

    obj = {**obj, **single("optimizer_states"), **single("lr_schedulers")}
    optimizer = _first(obj, ("optimizer", "optimizer_state_dict", "optim", "opt", "optimizer_states"),
                       lambda v: v if isinstance(v, Mapping) and "param_groups" in v else None)
    epoch, step = _first(obj, ("epoch", "epochs"), _num), _first(obj, ("step", "global_step", "iteration"), _num)
    best = _first(obj, ("best_acc", "best_acc1", "best_prec1", "best_top1", "best_accuracy"), _num)
    config = {"model": obj["model_name"], "num_classes": obj["num_classes"]} if "model_name" in obj else {}
    return {"optimizer": optimizer,
            "scheduler": _first(obj, ("scheduler", "lr_scheduler", "scheduler_state_dict", "lr_schedulers"), state_dict),
            "scaler": _first(obj, ("scaler", "grad_scaler", "scaler_state_dict"), state_dict),
            "lookahead": None,
            "progress": {"epoch": int(_num(epoch) or 0), "step": int(_num(step) or 0), "batch_in_epoch": 0},
            "metrics": {"best_acc": _num(best) or 0.0, "acc": _num(_first(obj, ("acc", "acc1", "accuracy"), _num)),
                        "loss": _num(_first(obj, ("loss", "val_loss"), _num))},
            "config": config, "env": None}


def epoch_checkpoint_name(epoch: int) -> str:
    """File name for the checkpoint written after `epoch` epochs, e.g. epoch_0003.pt."""
    return f"epoch_{epoch:04d}.pt"


def _epoch_files(directory: str | os.PathLike) -> list[Path]:
    """Epoch checkpoints, oldest first (by number, not mtime; temp files start with '.' and never match)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_epoch_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` epoch checkpoints (keep <= 0 keeps all); returns what was removed."""
    if keep <= 0:
        return []
    doomed = _epoch_files(directory)[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def newest_valid_checkpoint(directory: str | os.PathLike, map_location: Any) -> tuple[Path, dict] | None:
    """(path, checkpoint) for latest.pt, else the newest loadable epoch file; corrupt files are skipped with a warning."""
    for path in [Path(directory) / LATEST_NAME, *reversed(_epoch_files(directory))]:
        if not path.is_file():
            continue
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointCorruptError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", DamagedCheckpointWarning, stacklevel=2)
    return None
