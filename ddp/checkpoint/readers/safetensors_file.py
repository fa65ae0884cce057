"""safetensors (Hugging Face): an 8-byte little-endian header length, a JSON header, then raw tensor bytes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import CheckpointCorruptError, first_line
from ddp.checkpoint.readers.loaded import Loaded


def claims(path: Path, head: bytes) -> bool:
    """Recognised by content, whatever the file is called."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_len <= path.stat().st_size


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    from safetensors import SafetensorError, safe_open

    device = str(torch.device(map_location)) if map_location is not None else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a Mapping
            return Loaded(state, "safetensors", metadata=dict(f.metadata() or {}))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointCorruptError(f"{path} is a damaged safetensors file ({first_line(e, 120)}); delete it "
                                     "or pick another file") from e
