"""DeepSpeed checkpoints: `save_dir/latest` names a tag, `save_dir/<tag>/` holds the model states file.

engine.save_checkpoint(save_dir) writes `<tag>/mp_rank_00_model_states.pt` (a torch.save dict: the weights
under "module", plus param_shapes, ds_config, ds_version, ...), the optimizer's partitions beside it, and
`latest`. Under ZeRO-3 the model states file is `zero_pp_rank_<r>_mp_rank_00_model_states.pt` and its
parameters are 0-element placeholders: the weights exist only as optimizer partitions, which DeepSpeed's
`zero_to_fp32.py` (copied into save_dir) gathers. Those placeholders are named as such, never loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import CheckpointFormatError
from ddp.checkpoint.readers import torch_file
from ddp.checkpoint.readers.loaded import Loaded, open_regular

MODEL_STATES = re.compile(r"(zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt")
TAG = re.compile(r"[\w.-]{1,200}")  # a tag is one plain directory name (global_step100)
MAX_TAG_BYTES = 256


def _states_file(directory: Path) -> Path | None:
    """The model states of model-parallel rank 0: mp_rank_00, else ZeRO-3's data-parallel rank 0."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (directory / name).is_file():
            return directory / name
    return None


def _tag_directory(parent: Path) -> Path | None:
    """The directory `parent/latest` names, checked to be one plain directory inside `parent`."""
    latest = parent / "latest"
    if not latest.is_file() or latest.stat().st_size > MAX_TAG_BYTES:
        return None
    with open_regular(latest, parent) as f:
        tag = f.read(MAX_TAG_BYTES).decode("utf-8", "replace").strip()
    if not TAG.fullmatch(tag) or tag in (".", ".."):
        raise CheckpointFormatError(f"{latest} names {tag[:60]!r}, not a tag directory beside it; refused")
    found = (parent / tag).resolve()
    if found.parent != parent.resolve():  # a symlink out of the checkpoint directory
        raise CheckpointFormatError(f"{latest} names {tag!r}, which leads outside {parent}; refused")
    if not found.is_dir():
        raise CheckpointFormatError(f"{latest} names {tag!r}, which is not in {parent}: copy that directory too, "
                                    "or pass one of the global_step* directories")
    return found


def claims(path: Path, head: bytes) -> bool:
    if path.is_dir():
        return _states_file(path) is not None or \
            ((path / "latest").is_file() and any(_states_file(d) for d in path.iterdir() if d.is_dir()))
    return MODEL_STATES.fullmatch(path.name) is not None and head.startswith((b"PK\x03\x04", b"\x80"))


def _placeholders(module: Any, shapes: Any) -> list[str]:
    """Parameters saved as ZeRO-3 partition placeholders: 0 elements where param_shapes says more."""
    expected = {}
    for group in shapes if isinstance(shapes, list) else []:
        expected.update(group if isinstance(group, dict) else {})
    def recorded_empty(key: Any) -> bool:
        shape = expected.get(key)
        return isinstance(shape, tuple) and 0 in shape  # torch.Size: a parameter that really has no elements

    return [k for k, v in module.items() if isinstance(v, torch.Tensor) and v.numel() == 0 and not recorded_empty(k)]


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    if path.is_dir():
        directory = path if _states_file(path) else _tag_directory(path)
        if directory is None:
            raise CheckpointFormatError(f"{path} has no 'latest' tag file; pass one of its global_step* directories")
        path = _states_file(directory)
        if path is None:
            raise CheckpointFormatError(f"{directory} holds no mp_rank_00_model_states.pt: not a DeepSpeed tag "
                                        "directory (or the save did not finish)")
        open_regular(path, directory).close()  # a symlink out of the tag directory, or a FIFO, is refused
    loaded = torch_file.read(path, map_location, trust_pickle=trust_pickle)
    obj = loaded.obj
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        raise CheckpointFormatError(f"{path} is named like DeepSpeed model states but holds no 'module' weights")
    empty = _placeholders(obj["module"], obj.get("param_shapes"))
    stage = (obj.get("ds_config") or {}).get("zero_optimization", {}).get("stage") \
        if isinstance(obj.get("ds_config"), dict) else None
    if empty or path.name.startswith("zero_pp_rank_"):
        raise CheckpointFormatError(
            f"{path} is a DeepSpeed ZeRO-3 checkpoint: its model states hold partition placeholders "
            f"({len(empty)} parameters with 0 elements, e.g. {', '.join(empty[:2]) or '-'}), the weights are split "
            f"across the zero_pp_rank_*_optim_states.pt files; run `python zero_to_fp32.py . fp32` in "
            f"{path.parent.parent} (DeepSpeed writes that script there) and load what it writes")
    version = f" {obj['ds_version']}" if isinstance(obj.get("ds_version"), str) else ""
    loaded.container = f"DeepSpeed{version} model states" + (f" (ZeRO stage {stage})" if stage is not None else "")
    return loaded
