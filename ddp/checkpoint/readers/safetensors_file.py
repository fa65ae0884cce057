"""safetensors (Hugging Face): an 8-byte little-endian header length, a JSON header, then raw tensor bytes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import CheckpointCorruptError, CheckpointFormatError, first_line
from ddp.checkpoint.readers.loaded import MAX_TENSORS, Loaded, open_regular


def claims(path: Path, head: bytes) -> bool:
    """Recognised by content, whatever the file is called."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_len <= path.stat().st_size


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    from safetensors import SafetensorError, safe_open

    open_regular(path).close()  # a FIFO or device under this name would block or never end
    device = str(torch.device(map_location)) if map_location is not None else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            keys = f.keys()  # safetensors checks every offset against the file before handing out tensors
            if len(keys) > MAX_TENSORS:
                raise CheckpointFormatError(f"{path} holds {len(keys):,} tensors, more than any model this reads "
                                            f"({MAX_TENSORS:,}); refused")
            state = {k: f.get_tensor(k) for k in keys}
            return Loaded(state, "safetensors", metadata=dict(f.metadata() or {}))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointCorruptError(f"{path} is a damaged safetensors file ({first_line(e, 120)}); delete it "
                                     "or pick another file") from e
