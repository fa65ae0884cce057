"""Model weights from any checkpoint: find the weight sets a file holds, pick one, load it into a model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddp.checkpoint.errors import CheckpointFormatError
from ddp.checkpoint.files import FORMAT, WEIGHTS_FORMAT
from ddp.checkpoint.keys import (
    KeyDiff,
    load_state_into,
    remap_prefixes,
    strip_wrapper_prefixes,
    unwrap_model,
    wrapper_segments,
)
from ddp.checkpoint.readers import Loaded, read_checkpoint
from ddp.checkpoint.readers.loaded import MAX_TENSORS
from ddp.checkpoint.standins import StandIn, module_state

# Where other projects put weights; when a file holds several weight sets, the first of these present is
# loaded (timm: state_dict before state_dict_ema; DINO: teacher before student) unless checkpoint_key says.
STATE_KEYS = ("model", "state_dict", "model_state_dict", "net", "module", "network", "teacher", "student",
              "model_ema", "state_dict_ema", "ema")
DEFAULT_MIN_MATCH = 0.5  # a partial load must cover at least this fraction of the model's parameters
MAX_CLASSES = 100_000  # a recorded class count above this is ignored: the head alone would be gigabytes
COMPILED_MODULE = "torch._dynamo.eval_frame.OptimizedModule"  # what torch.save(torch.compile(model)) pickles


@dataclass
class Weights:
    """One weight set read from a checkpoint, with canonical keys and what the file says about it."""

    state: dict[str, torch.Tensor]
    layout: str  # e.g. "Lightning checkpoint (pytorch-lightning 2.5.0), weights under 'state_dict'"
    info: dict[str, Any] = field(default_factory=dict)  # model_name, num_classes, dataset where the file records them
    stand_ins: list[str] = field(default_factory=list)  # pickled classes that were not imported
    weight_sets: list[str] = field(default_factory=list)  # every weight set in the file (for checkpoint_key)
    chosen: str | None = None  # the one in `state`
    raw_keys: list[str] = field(default_factory=list)  # its keys as the file has them (module. etc. included)
    unwrapped: list[str] = field(default_factory=list)  # the wrapper segments removed from them

    @property
    def note(self) -> str:
        """One line when the file held several weight sets, or classes that were stood in for; else ""."""
        notes = []
        if any(s != "module." for s in self.unwrapped):  # DDP's leading `module.` is too common to mention
            notes.append(f"removed wrapper segments {', '.join(f'`{s}`' for s in self.unwrapped)} from the keys")
        if len(self.weight_sets) > 1:
            notes.append(f"{len(self.weight_sets)} weight sets ({', '.join(self.weight_sets)}): loaded "
                         f"{self.chosen!r}; pick another with --checkpoint-key (checkpoint_key=)")
        if self.stand_ins:
            notes.append(f"{len(self.stand_ins)} pickled classes not imported, only recorded: "
                         f"{', '.join(self.stand_ins[:4])}{', ...' if len(self.stand_ins) > 4 else ''}")
        return "; ".join(notes)


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in obj.items())


def _as_state(value: Any) -> Mapping[str, torch.Tensor] | None:
    if isinstance(value, nn.Module):
        return unwrap_model(value).state_dict()
    if isinstance(value, StandIn):
        if value.name == COMPILED_MODULE and value.args:  # pickled as OptimizedModule(model, dynamo context)
            value = value.args[0]
        return module_state(value)
    return value if is_state_dict(value) else None


MAX_SET_DEPTH = 4  # {"ema": {"module": sd}}, {"model": {"state_dict": sd}}: weight sets a few dicts down


def weight_sets(obj: Any, depth: int = MAX_SET_DEPTH) -> dict[str, Mapping[str, torch.Tensor]]:
    """Every state dict (or pickled model) a checkpoint holds, by its dotted path of keys; "" for the whole object."""
    whole = _as_state(obj)
    if whole is not None or not isinstance(obj, Mapping):
        return {"": whole} if whole is not None else {}
    found: dict[str, Mapping[str, torch.Tensor]] = {}
    for key, value in obj.items():
        if not isinstance(key, str):  # optimizer state is keyed by parameter index: never a weight set
            continue
        if (state := _as_state(value)) is not None:
            found[key] = state
        elif depth > 1 and isinstance(value, Mapping):
            found.update({f"{key}.{path}": s for path, s in weight_sets(value, depth - 1).items() if path})
    if not found and depth == MAX_SET_DEPTH:  # torchtitan-style DCP: the model's tensors at the top level
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        found = {"": tensors} if tensors else {}
    return found


def _rank(path: str) -> tuple[int, ...]:
    """Order of preference of a dotted weight-set path: by STATE_KEYS at each level, shallower first."""
    return tuple(STATE_KEYS.index(p) if p in STATE_KEYS else len(STATE_KEYS) for p in path.split("."))


def _layout(loaded: Loaded, chosen: str) -> str:
    obj = loaded.obj
    where = f", weights under {chosen!r}" if chosen else ""
    if isinstance(obj, Mapping):
        if "pytorch-lightning_version" in obj:
            return f"Lightning checkpoint (pytorch-lightning {obj['pytorch-lightning_version']}){where}"
        if "state_dict_ema" in obj or ("arch" in obj and "args" in obj and "state_dict" in obj):
            return f"timm training checkpoint{where}"
        if "arch" in obj and any(isinstance(k, str) and k.startswith("best_acc") for k in obj):
            return f"pytorch/examples ImageNet checkpoint{where}"
    if isinstance(obj, (nn.Module, StandIn)):
        compiled = " compiled with torch.compile" if getattr(obj, "name", "") == COMPILED_MODULE else ""
        return f"pickled nn.Module{compiled}" + (" (read inertly)" if isinstance(obj, StandIn) else "")
    if not chosen and loaded.container not in ("torch zip", "torch legacy"):
        return loaded.container
    return f"{loaded.container}, " + (f"state dict under {chosen!r}" if chosen else "bare state dict")


def _recorded(model_name: Any, num_classes: Any, dataset: Any) -> dict[str, Any]:
    """What a file says about its model, keeping only values of the right kind and size (a file may say anything)."""
    if isinstance(num_classes, str):  # safetensors metadata holds strings
        num_classes = int(num_classes) if num_classes.isdigit() and len(num_classes) < 7 else None
    return {"model_name": model_name if isinstance(model_name, str) and 0 < len(model_name) <= 200 else None,
            "num_classes": num_classes if type(num_classes) is int and 0 < num_classes <= MAX_CLASSES else None,
            "dataset": dataset if isinstance(dataset, str) and len(dataset) <= 40 else None}


def _info(loaded: Loaded) -> dict[str, Any]:
    obj, meta = loaded.obj, loaded.metadata
    if meta.get("model_name"):  # our .safetensors exports
        return _recorded(meta["model_name"], meta.get("num_classes"), meta.get("dataset"))
    if isinstance(obj, Mapping) and obj.get("format") == WEIGHTS_FORMAT:
        return _recorded(obj.get("model_name"), obj.get("num_classes"), obj.get("dataset"))
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        config = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
        return _recorded(config.get("model"), config.get("num_classes", 10), config.get("dataset"))
    return {}


def extract_weights(loaded: Loaded, checkpoint_key: str | None = None) -> Weights:
    """Pick one weight set from what a file holds: ours, the chosen key, else the first of STATE_KEYS."""
    obj = loaded.obj
    if isinstance(obj, Mapping) and "format" in obj:
        if not isinstance(obj["format"], str) or obj["format"] not in (FORMAT, WEIGHTS_FORMAT):
            raise CheckpointFormatError(f"unknown checkpoint format {str(obj['format'])[:40]!r}; this code reads {FORMAT} and "
                                        f"{WEIGHTS_FORMAT} (a newer ddp-cifar may have written it)")
        if not is_state_dict(obj.get("model")):
            raise CheckpointFormatError(f"a {obj['format']} file whose 'model' is {type(obj.get('model')).__name__}, "
                                        "not a state dict of tensors: damaged or crafted")
        sets = {"model": obj["model"]}
    else:
        sets = weight_sets(obj)
    if not sets:
        keys = ", ".join(repr(k) for k in list(obj)[:20]) + (", ..." if len(obj) > 20 else "") \
            if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointFormatError(f"no model weights found; top-level keys are: {keys or '(none)'}. Expected a "
                                    f"state dict of tensors, or one under {', '.join(STATE_KEYS)}")
    names = list(sets)
    if checkpoint_key is None:
        chosen = min(names, key=_rank)
        if len(sets) > 1 and not all(p in STATE_KEYS for p in chosen.split(".")):
            raise CheckpointFormatError(f"the file holds {len(sets)} weight sets ({', '.join(names)}) and none is a "
                                        "usual default; pick one with --checkpoint-key NAME")
        state = sets[chosen]
    elif checkpoint_key in sets:
        chosen, state = checkpoint_key, sets[checkpoint_key]
    elif under := [n for n in names if n.startswith(checkpoint_key.rstrip(".") + ".")]:  # "ema" for ema.module
        chosen = min(under, key=_rank)
        state = sets[chosen]
    else:  # a prefix inside a flat state dict (teacher./student. in one dict)
        prefix = checkpoint_key.rstrip(".") + "."
        flat = sets[min(names, key=_rank)]
        state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointFormatError(f"--checkpoint-key {checkpoint_key!r}: no such weight set; the file holds "
                                        f"{', '.join(repr(n) for n in names)}")
        chosen = checkpoint_key
    if len(state) > MAX_TENSORS:
        raise CheckpointFormatError(f"the weight set holds {len(state):,} tensors, more than any model this reads "
                                    f"({MAX_TENSORS:,}); refused")
    return Weights(strip_wrapper_prefixes(state), _layout(loaded, chosen), _info(loaded), loaded.stand_ins,
                   [n for n in names if n], chosen or None, list(state), wrapper_segments(state))


def extract_model_state(obj: Any, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """The model state dict (wrapper prefixes stripped) from any loaded object."""
    return extract_weights(Loaded(obj, "object"), checkpoint_key).state


def load_weights(path: str | os.PathLike, map_location: Any = "cpu", *, checkpoint_key: str | None = None,
                 trust_pickle: bool = False) -> Weights:
    """One weight set from any checkpoint file or directory, with what the file says about the model."""
    return extract_weights(read_checkpoint(path, map_location, trust_pickle=trust_pickle), checkpoint_key)


def load_model_state(path: str | os.PathLike, map_location: Any = "cpu", *, checkpoint_key: str | None = None,
                     trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Canonical model state dict from any checkpoint: what torch.load(...)["state_dict"] is in most code."""
    return load_weights(path, map_location, checkpoint_key=checkpoint_key, trust_pickle=trust_pickle).state


def load_into(model: nn.Module, path: str | os.PathLike, strict: bool = True, *, map_location: Any = None,
              checkpoint_key: str | None = None, remap: list[tuple[str, str]] | None = None,
              min_match: float = DEFAULT_MIN_MATCH) -> KeyDiff:
    """Load a checkpoint's weights into `model` (by default onto the device of its first parameter).

    Keys are remapped, then aligned by one leading prefix if that makes them fit (see `diff.notes`). A
    non-strict load refuses when less than `min_match` of the model's parameters would be loaded.
    """
    if map_location is None:
        param = next(unwrap_model(model).parameters(), None)
        map_location = param.device if param is not None else "cpu"
    weights = load_weights(path, map_location, checkpoint_key=checkpoint_key)
    state = remap_prefixes(weights.state, remap) if remap else weights.state
    diff = load_state_into(model, state, strict=strict, min_match=min_match)
    diff.notes[:0] = [weights.note] if weights.note else []
    return diff
