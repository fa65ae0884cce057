"""One dispatcher behind every entry point: ask each reader "is this mine?", then let it read.

Each module here reads one family of formats and answers two questions: `claims(path, head)` (is this
file or directory mine? from its first bytes or its entries) and `read(path, map_location, trust_pickle)`
(the tensors, and what the file says about itself, as a `Loaded`). Readers are asked in order; the first
that claims a path reads it.

    safetensors_file  .safetensors: 8-byte header length, then a JSON header
    sharded           Hugging Face shard indexes (*.safetensors.index.json, *.bin.index.json)
    gzip_file         gzip-compressed files (.pt.gz): decompressed with a bound, then dispatched again
    torchscript       torch.jit.save archives: data.pkl read inertly, code/ never compiled
    export_pt2        torch.export.save programs (.pt2): the JSON weight map and raw weight records
    deepspeed         DeepSpeed model states, a global_step* directory, or its parent with `latest`
    dcp               torch.distributed.checkpoint directories (.metadata)
    model_dir         a directory holding one model file or shard index
    bin_dir           a directory holding pytorch_model.bin (Hugging Face, accelerate save_state)
    named             recognised, not read: ONNX, Keras/HDF5, TF SavedModel, TFLite, GGUF, NumPy, ...
    torch_file        torch.save: zip (since 1.6) and legacy pickles; the fallback for any other file

Nothing from a file ever runs unless trust_pickle: every pickle goes through the inert unpickler
(`unpickle.py`), whose only callables are the checked rebuilders of `rebuild.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ddp.checkpoint.errors import CheckpointFormatError, CheckpointNotFoundError
from ddp.checkpoint.readers import (
    bin_dir,
    dcp,
    deepspeed,
    export_pt2,
    gzip_file,
    model_dir,
    named,
    safetensors_file,
    sharded,
    torch_file,
    torchscript,
)
from ddp.checkpoint.readers.loaded import HEAD_SIZE, Loaded, not_recognised

FILE_READERS = (safetensors_file, sharded, gzip_file, torchscript, export_pt2, deepspeed, named, torch_file)
DIRECTORY_READERS = (dcp, deepspeed, model_dir, bin_dir, named)

__all__ = ["DIRECTORY_READERS", "FILE_READERS", "Loaded", "read_checkpoint"]


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, trust_pickle: bool = False) -> Loaded:
    """Read any checkpoint file or directory we recognise onto `map_location`, in a plain process."""
    path = Path(path)
    if path.is_dir():
        readers, head = DIRECTORY_READERS, b""
    elif path.is_file():
        with open(path, "rb") as f:
            readers, head = FILE_READERS, f.read(HEAD_SIZE)
    elif path.exists():  # a FIFO, socket or device: reading it would block or never end
        raise CheckpointFormatError(f"{path} is not a regular file or directory; pass a checkpoint file")
    else:
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    for reader in readers:
        if reader.claims(path, head):
            return reader.read(path, map_location, trust_pickle=trust_pickle)
    raise not_recognised(path)
