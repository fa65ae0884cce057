"""torch.export programs (`torch.export.save`, `.pt2`): the weights, without deserialising the program.

A .pt2 is a zip: `models/model.json` (the graph), `data/weights/model_weights_config.json` (every
parameter and buffer by its state-dict name: the record holding its raw bytes, dtype, sizes, strides),
and one record per weight. Only the JSON map and the weight records are read; every size, stride and
offset is checked against the record's length before a tensor is built. torch.export.load would
rebuild the graph and run code named in it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, first_line
from ddp.checkpoint.readers.loaded import Loaded, open_regular
from ddp.checkpoint.readers.torch_file import read_torch
from ddp.checkpoint.readers.torchscript import archive_names
from ddp.checkpoint.standins import refuse_hostile

WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
MAX_CONFIG_BYTES = 256 << 20
MAX_DIMS = 16
RECORD_NAME = re.compile(r"[\w.-]+")  # a weight's record: a plain name inside data/weights/
# torch._export.serde.schema.ScalarType -> dtype (the values are part of the .pt2 format)
DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
          7: torch.float32, 8: torch.float64, 10: torch.complex64, 11: torch.complex128, 12: torch.bool,
          13: torch.bfloat16, 29: torch.float8_e4m3fn, 30: torch.float8_e5m2}
STRIDED = 7  # schema.Layout.Strided


def _config_name(names: list[str]) -> str | None:
    return next((n for n in names if n.endswith("/" + WEIGHTS_CONFIG) and n.count("/") == 3), None)


def claims(path: Path, head: bytes) -> bool:
    names = archive_names(path, head)
    return any(n.endswith("/archive_format") for n in names) or _config_name(names) is not None


def _ints(values: Any, what: str) -> list[int]:
    """`[{"as_int": 3}, ...]` as the schema writes sizes and strides; symbolic sizes are refused."""
    if not isinstance(values, list) or len(values) > MAX_DIMS:
        raise CheckpointFormatError(f"{what} is not a list of at most {MAX_DIMS} sizes")
    out = [v.get("as_int") if isinstance(v, dict) else None for v in values]
    if not all(type(v) is int and 0 <= v < 1 << 48 for v in out):
        raise CheckpointFormatError(f"{what} holds {values[:4]!r}, not plain non-negative integers")
    return out


def _tensor(name: str, meta: Any, raw: bytes) -> torch.Tensor:
    """The tensor `meta` describes over the bytes of its record, every index checked to lie inside them."""
    if not isinstance(meta, dict) or meta.get("layout", STRIDED) != STRIDED or meta.get("dtype") not in DTYPES:
        raise CheckpointFormatError(f"weight {name}: dtype {meta.get('dtype') if isinstance(meta, dict) else '?'} "
                                    "or layout is not one this reader knows (dense tensors of the usual dtypes)")
    dtype = DTYPES[meta["dtype"]]
    sizes, strides = _ints(meta.get("sizes"), f"weight {name} sizes"), _ints(meta.get("strides"), f"weight {name} strides")
    [offset] = _ints([meta.get("storage_offset", {"as_int": 0})], f"weight {name} storage offset")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(sizes) != len(strides) or len(raw) % itemsize:
        raise CheckpointFormatError(f"weight {name}: {len(sizes)} sizes but {len(strides)} strides, or a record of "
                                    f"{len(raw)} bytes for {itemsize}-byte elements")
    count = len(raw) // itemsize
    if math.prod(sizes) > count:  # more elements than stored: only stride-0 aliasing could, and we allocate them
        raise CheckpointFormatError(f"weight {name}: shape {sizes} has more elements than its {count} stored ones")
    if 0 not in sizes and offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True)) >= count:
        raise CheckpointCorruptError(f"weight {name}: shape {sizes} with strides {strides} reaches past its "
                                     f"{count} stored elements; the file is damaged")
    flat = torch.frombuffer(bytearray(raw), dtype=dtype) if count else torch.empty(0, dtype=dtype)
    return torch.empty(sizes, dtype=dtype).copy_(flat.as_strided(sizes, strides, offset))


def _read_weights(archive: zipfile.ZipFile, config_name: str, map_location: Any) -> dict[str, torch.Tensor]:
    info = archive.getinfo(config_name)
    if info.file_size > MAX_CONFIG_BYTES:
        raise CheckpointFormatError(f"{config_name} is {info.file_size} bytes; no weight map is that large")
    config = json.loads(archive.read(info)).get("config")
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{config_name} has no 'config' map of weights")
    folder, known = config_name.rsplit("/", 1)[0], set(archive.namelist())
    state = {}
    for name, entry in config.items():
        record = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(record, str) or not RECORD_NAME.fullmatch(record) or f"{folder}/{record}" not in known:
            raise CheckpointFormatError(f"weight {name} points at {record!r}, not a record in {folder}/")
        raw = archive.read(f"{folder}/{record}")
        if entry.get("use_pickle"):  # a tensor subclass torch.save'd into the record: read like any untrusted file
            value, names, _ = read_torch(io.BytesIO(raw), map_location, f"weight {name}")  # bounded, inert
            refuse_hostile(names, f"weight {name}")
            if not isinstance(value, torch.Tensor):
                raise CheckpointFormatError(f"weight {name} unpickles to {type(value).__name__}, not a tensor")
            state[name] = value
        else:
            state[name] = _tensor(name, entry.get("tensor_meta"), raw).to(map_location)
    return state


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    names = archive_names(path, b"PK\x03\x04")
    config_name = _config_name(names)
    if config_name is None:
        kind = "an AOTInductor package (its weights are compiled in)" if any("aotinductor" in n for n in names) \
            else "a .pt2 archive without a weight map (written by an older or newer torch.export)"
        raise CheckpointFormatError(f"{path} is {kind}; ddp-cifar cannot take its weights: save the original "
                                    "model's state_dict() with torch.save instead")
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            if any(r.compress_type != zipfile.ZIP_STORED for r in infos):  # nothing to inflate unbounded
                raise CheckpointFormatError("compressed records, where torch.export.save stores them; refused")
            if sum(r.file_size for r in infos) > os.fstat(f.fileno()).st_size:  # records sharing bytes: a zip bomb
                raise CheckpointFormatError("records larger than the file together; refused")
            state = _read_weights(archive, config_name, map_location)
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from e
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        raise CheckpointCorruptError(f"{path} is a damaged torch.export archive ({first_line(e, 120)}); save it "
                                     "again with torch.export.save or pick another file") from e
    if not state:
        raise CheckpointFormatError(f"{path} is a torch.export program with no weights in its weight map")
    return Loaded(state, "torch.export program (.pt2, read without its graph)")
