"""TorchScript archives (torch.jit.save): the weights, without compiling or running the archive's code.

An archive is a zip like torch.save's, plus `code/` (TorchScript source), `constants.pkl` and debug info.
Its `data.pkl` pickles the module tree as `__torch__.*` objects whose attributes are the parameters,
buffers and submodules. Only data.pkl is read, through the inert unpickler (every `__torch__` class is a
stand-in), with the tensors from the archive's own records; torch.jit.load would compile `code/`.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, first_line
from ddp.checkpoint.readers.loaded import Loaded, open_regular
from ddp.checkpoint.readers.torch_file import read_torch
from ddp.checkpoint.standins import StandIn, refuse_hostile

ZIP_MAGIC = b"PK\x03\x04"
SCRIPT_PREFIX = "__torch__."  # TorchScript's namespace for the classes of scripted modules
MAX_DEPTH = 64  # module nesting, far beyond any real model


def archive_names(path: Path, head: bytes) -> list[str]:
    """The record names of a zip file, or [] if `path` is not a readable zip."""
    if not head.startswith(ZIP_MAGIC):
        return []
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, CheckpointError):
        return []  # damaged: torch_file says so


def claims(path: Path, head: bytes) -> bool:
    names = archive_names(path, head)
    return any(n.endswith("/data.pkl") for n in names) and \
        any("/code/__torch__/" in n or n.endswith("/constants.pkl") for n in names)


def _module_state(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    """A scripted module's tensors by dotted name: its attributes, recursing into submodules."""
    if depth > MAX_DEPTH:
        raise CheckpointFormatError(f"modules nested more than {MAX_DEPTH} deep; not a model")
    state = obj.state if isinstance(obj, StandIn) else None
    for name, value in (state.items() if isinstance(state, dict) else ()):
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
        elif isinstance(value, StandIn) and value.name.startswith(SCRIPT_PREFIX):
            _module_state(value, f"{prefix}{name}.", out, depth + 1)


def _weights_archive(f: Any, size: int, where: str) -> io.BytesIO:
    """A torch.save-shaped zip of the archive's data.pkl and data/* records only, in memory.

    torch.jit.save compresses code/ and debug records, which torch_file's checks rightly refuse in a
    torch.save file; the records that hold the weights are stored, and are all that is copied here.
    """
    with zipfile.ZipFile(f) as archive:
        infos = [r for r in archive.infolist() if r.filename.split("/", 1)[-1] == "data.pkl"
                 or r.filename.split("/", 1)[-1].startswith("data/")]
        if any(r.compress_type != zipfile.ZIP_STORED for r in infos) or sum(r.file_size for r in infos) > size:
            raise CheckpointCorruptError(f"{where}: a TorchScript archive whose weights are compressed or larger than "
                                         "the file; damaged or not written by torch.jit.save: refused")
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
            for info in infos:
                copy.writestr(info.filename, archive.read(info))  # read() checks each record's CRC32
    out.seek(0)
    return out


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    where = str(path)
    with open_regular(path) as f:
        try:
            weights = _weights_archive(f, os.fstat(f.fileno()).st_size, where)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointCorruptError(f"{path} is a damaged TorchScript archive ({first_line(e, 120)}); save it "
                                         "again with torch.jit.save or pick another file") from e
    root, names, _ = read_torch(weights, map_location, where)  # bounded, checked, inert
    refuse_hostile(names, where)  # before anything of it is used
    state: dict[str, torch.Tensor] = {}
    _module_state(root, "", state)
    if not state:
        raise CheckpointFormatError(f"{path} is a TorchScript archive with no module weights in data.pkl; load "
                                    "the weights from the model it was scripted from")
    # TorchScript's own classes always stand in: list only others (a scripted module names no other)
    return Loaded(state, "TorchScript archive (read without running its code)",
                  [n for n in names if not n.startswith(SCRIPT_PREFIX)])
