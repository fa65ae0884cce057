"""State-dict keys: unwrap models, strip or remap prefixes, diff against a model, load with a report."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddp.checkpoint.errors import CheckpointFormatError, CheckpointMismatchError, first_line

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DataParallel and torch.compile, in front of every key
# Wrappers that put their segment at any depth, as named_parameters() and EMA helpers show them: FSDP1,
# activation checkpointing, torch.compile of a submodule, FSDP1's flatten-params wrapper (torch < 1.13).
# `module.` is not among them: DDP only adds it in front, and inside a model it is often a real name.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_fpw_module.")
COMMON_PREFIXES = ("backbone.", "model.", "net.", "encoder.", "base_model.")  # reported by inspect only


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers, nested in any order."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # OptimizedModule, without importing dynamo
            model = model._orig_mod
        else:
            return model


def _strip_key(key: str) -> str:
    while True:
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            break
    *path, leaf = key.split(".")  # a leaf is a tensor's own name, never a wrapper
    segments = {s[:-1] for s in WRAPPER_SEGMENTS}
    return ".".join([p for p in path if p not in segments] + [leaf])


def wrapper_segments(keys: Iterable[str]) -> list[str]:
    """The wrapper segments (`module.` in front, WRAPPER_SEGMENTS anywhere) that stripping removes from `keys`."""
    found: list[str] = []
    for key in keys:
        rest = key
        while prefix := next((p for p in WRAPPER_PREFIXES if rest.startswith(p)), None):
            found.append(prefix)
            rest = rest[len(prefix):]
        found += [s for s in WRAPPER_SEGMENTS if f".{s}" in f".{rest.rpartition('.')[0]}."]
    return list(dict.fromkeys(found))


def _rename(state: Mapping[str, Any], rename: Callable[[str], str], why: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = rename(key)
        if new in out:  # silently keeping one of the two would load the wrong weights
            raise CheckpointFormatError(f"keys {origin[new]!r} and {key!r} both become {new!r} {why}")
        out[new], origin[new] = value, key
    return out


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove any leading run of `module.` / `_orig_mod.`, and WRAPPER_SEGMENTS at any depth, from every key."""
    return _rename(state, _strip_key, "after stripping wrapper prefixes")


def remap_prefixes(state: Mapping[str, Any], rules: list[tuple[str, str]]) -> dict[str, Any]:
    """Replace a leading OLD with NEW on each key; the first matching rule wins."""
    def rename(key: str) -> str:
        for old, new in rules:
            if key.startswith(old):
                return new + key[len(old):]
        return key
    return _rename(state, rename, "after --remap")


def parse_remap(text: str) -> tuple[str, str]:
    """Parse `OLD=NEW` (either side may be empty: `backbone.=` strips, `=backbone.` adds)."""
    old, sep, new = text.partition("=")
    if not sep or not (old or new):
        raise ValueError(f"--remap expects OLD=NEW, e.g. 'backbone.=' to drop a prefix; got {text!r}")
    return old, new


def detect_prefixes(keys: Iterable[str]) -> list[str]:
    """Wrapper prefixes and other common whole-model prefixes (e.g. `backbone.`) present on the keys."""
    found: list[str] = []
    for key in keys:
        while True:
            prefix = next((p for p in WRAPPER_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                break
            found.append(prefix)
            key = key[len(prefix):]
        found += [p for p in COMMON_PREFIXES if key.startswith(p)]
        found += [s for s in WRAPPER_SEGMENTS if f".{s}" in f".{key.rpartition('.')[0]}."]  # deeper wrappers
    return list(dict.fromkeys(found))


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "scalar"


@dataclass
class KeyDiff:
    """How a checkpoint's keys differ from a model's state dict."""

    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, ckpt shape, model shape)
    matched: int = 0  # keys present in both with the same shape: what a non-strict load takes
    notes: list[str] = field(default_factory=list)  # what was done to make the keys fit (prefix alignment)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def _sections(self) -> list[tuple[str, list[str]]]:
        mism = [f"{k} {_shape(c)} in checkpoint vs {_shape(m)} in model" for k, c, m in self.shape_mismatch]
        return [("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", mism)]

    def report(self, title: str = "checkpoint vs model", limit: int = 20) -> str:
        """Multi-line human-readable summary, at most `limit` keys per section."""
        if self.ok:
            return "\n".join([*self.notes, f"{title}: all {self.matched} keys and shapes match"])
        lines = [*self.notes, f"{title}: {self.matched} keys match; {self.one_line(first=0)}"]
        for name, items in self._sections():
            if items:
                lines.append(f"  {name} ({len(items)}):")
                lines += [f"    {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)

    def one_line(self, first: int = 3) -> str:
        """Counts plus the first few keys of each kind, for error messages."""
        parts = []
        for name, items in self._sections():
            if items:
                shown = ", ".join(items[:first]) + (", ..." if len(items) > first else "")
                parts.append(f"{len(items)} {name}" + (f" ({shown})" if first else ""))
        return "; ".join(parts) or "all keys and shapes match"


def diff_state(model_state: Mapping[str, Any], ckpt_state: Mapping[str, Any]) -> KeyDiff:
    """Compare key sets and shapes (checkpoint against model)."""
    mismatch = []
    for key, value in model_state.items():
        if key in ckpt_state:
            ckpt_shape, model_shape = tuple(ckpt_state[key].shape), tuple(value.shape)
            if ckpt_shape != model_shape:
                mismatch.append((key, ckpt_shape, model_shape))
    return KeyDiff(missing=[k for k in model_state if k not in ckpt_state],
                   unexpected=[k for k in ckpt_state if k not in model_state],
                   shape_mismatch=mismatch,
                   matched=sum(k in ckpt_state for k in model_state) - len(mismatch))


def _dotted_prefixes(keys: Iterable[str]) -> set[str]:
    """Every leading run of whole components that some key has: 'a.b.c' gives 'a.' and 'a.b.'."""
    found = set()
    for key in keys:
        parts = key.split(".")[:-1]
        found.update(".".join(parts[:i]) + "." for i in range(1, len(parts) + 1))
    return found


def _fitting(state: Mapping[str, Any], model_state: Mapping[str, Any]) -> int:
    return sum(k in model_state and tuple(v.shape) == tuple(model_state[k].shape) for k, v in state.items())


def align_prefixes(state: Mapping[str, Any], model_state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove or add the one leading prefix that makes the keys fit the model, if exactly one does best.

    Prefixes come from the keys themselves (Lightning's `model.`, `backbone.`, `student.`, ...). Removing a
    prefix takes the keys under it and leaves the others out. Returns (state, one-line note, "" if unchanged);
    raises CheckpointMismatchError when two prefixes fit equally well.
    """
    state = dict(state)
    current = _fitting(state, model_state)
    if current == len(model_state):
        return state, ""
    candidates: dict[tuple[str, str], dict[str, Any]] = {}  # (how, prefix) -> renamed state
    for prefix in _dotted_prefixes(state):
        candidates["remove", prefix] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for prefix in _dotted_prefixes(model_state):
        candidates["add", prefix] = {prefix + k: v for k, v in state.items()}
    scores = {op: _fitting(renamed, model_state) for op, renamed in candidates.items()}
    top = max(scores.values(), default=0)
    if top <= current:
        return state, ""
    winners = sorted(op for op, score in scores.items() if score == top)
    if len(winners) > 1:
        options = " or ".join(f"`--remap {p}=`" if how == "remove" else f"`--remap ={p}`" for how, p in winners)
        raise CheckpointMismatchError(
            f"the checkpoint's keys fit the model after {' or after '.join(f'{h} `{p}`' for h, p in winners)} "
            f"({top} of {len(model_state)} keys each): ambiguous, so nothing was loaded; choose with {options}, or "
            "pick a weight set with --checkpoint-key")
    how, prefix = winners[0]
    aligned = candidates[how, prefix]
    left_out = len(state) - len(aligned)
    note = (f"aligned: {'removed' if how == 'remove' else 'added'} `{prefix}` {'from' if how == 'remove' else 'to'} "
            f"{len(aligned)} keys" + (f" ({left_out} keys outside `{prefix}` left out)" if left_out else ""))
    return aligned, note


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True, *,
                    min_match: float = 0.0) -> KeyDiff:
    """Load `state` into the unwrapped model, aligning a leading prefix if that makes it fit.

    strict raises CheckpointMismatchError unless every key and shape fits. Otherwise what fits is loaded,
    unless it covers less than `min_match` of the model's parameters (by number of values).
    """
    target = unwrap_model(model)
    model_state = target.state_dict()
    state, note = align_prefixes(strip_wrapper_prefixes(state), model_state)
    diff = diff_state(model_state, state)
    diff.notes += [note] if note else []
    name = type(target).__name__
    if strict and not diff.ok:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {name}: {diff.one_line()}{f' ({note})' if note else ''}. Check that the model "
            "matches the run that saved it (`python -m ddp.checkpoint inspect FILE --model NAME` shows the diff), "
            "or use --init-from for a partial load", diff)
    skip = {key for key, _, _ in diff.shape_mismatch}  # load_state_dict(strict=False) still fails on shapes
    params = dict(target.named_parameters())
    fitting = sum(p.numel() for k, p in params.items() if k in state and k not in skip)
    total = sum(p.numel() for p in params.values())
    if not strict and total and fitting < min_match * total:
        raise CheckpointMismatchError(
            f"only {100 * fitting / total:.0f}% of {name}'s parameters ({diff.matched} of {len(model_state)} keys) "
            f"fit the checkpoint, below the {100 * min_match:.0f}% a partial load needs ({diff.one_line()}); wrong "
            "model or prefix? `python -m ddp.checkpoint inspect FILE --model NAME` shows the keys, --remap OLD=NEW "
            "renames them, --min-match 0 loads it anyway", diff)
    try:
        target.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=strict)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"loading into {name} failed: {first_line(e)}", diff) from e
    return diff
