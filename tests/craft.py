"""Writing files the way an attacker would: pickles opcode by opcode, torch zips and legacy files around them,
DCP directories from hand-made Metadata, safetensors from a hand-made header, and real checkpoints of every
layout to start from (ours, plain torch.save, legacy, safetensors, sharded, DCP, Lightning-like).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

FORGED = "@@FORGED@@"  # a string in a real checkpoint that `splice` replaces by crafted pickle opcodes


class Pickle:
    """A pickle written opcode by opcode, with only what torch's weights-only unpickler reads (protocol 2)."""

    def __init__(self, proto: int = 2):
        self.b = bytearray(b"\x80" + bytes([proto]))

    def raw(self, data: bytes) -> Pickle:
        self.b += data
        return self

    def g(self, module: str, name: str) -> Pickle:  # GLOBAL
        return self.raw(b"c" + f"{module}\n{name}\n".encode())

    def i(self, n: int) -> Pickle:
        if 0 <= n < 256:
            return self.raw(b"K" + bytes([n]))
        if -(2**31) <= n < 2**31:
            return self.raw(b"J" + struct.pack("<i", n))
        data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
        return self.raw(b"\x8a" + bytes([len(data)]) + data)  # LONG1

    def f(self, x: float) -> Pickle:
        return self.raw(b"G" + struct.pack(">d", x))

    def s(self, text: str) -> Pickle:
        data = text.encode("utf-8", "surrogatepass")
        return self.raw(b"X" + struct.pack("<I", len(data)) + data)

    def by(self, data: bytes) -> Pickle:  # bytes as protocol 2 writes them: _codecs.encode(str, "latin1")
        return self.g("_codecs", "encode").s(data.decode("latin1")).s("latin1").raw(b"\x86R")

    def none(self) -> Pickle:
        return self.raw(b"N")

    def true(self) -> Pickle:
        return self.raw(b"\x88")

    def false(self) -> Pickle:
        return self.raw(b"\x89")

    def mark(self) -> Pickle:
        return self.raw(b"(")

    def tuple(self, n: int | None = None) -> Pickle:  # n items above (None: up to the mark)
        return self.raw({None: b"t", 0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}[n])

    def reduce(self) -> Pickle:
        return self.raw(b"R")

    def build(self) -> Pickle:
        return self.raw(b"b")

    def dict(self) -> Pickle:
        return self.raw(b"}")

    def list(self) -> Pickle:
        return self.raw(b"]")

    def setitem(self) -> Pickle:
        return self.raw(b"s")

    def append(self) -> Pickle:
        return self.raw(b"a")

    def put(self, n: int) -> Pickle:
        return self.raw(b"q" + bytes([n]))

    def get(self, n: int) -> Pickle:
        return self.raw(b"h" + bytes([n]))

    def pop(self) -> Pickle:
        return self.raw(b"0")

    def ints(self, *ns: int) -> Pickle:
        self.mark()
        for n in ns:
            self.i(n)
        return self.tuple()

    def ordered_dict(self) -> Pickle:
        return self.g("collections", "OrderedDict").tuple(0).reduce()

    def tensor(self, key: str, numel: int, size: tuple, stride: tuple, storage: str = "FloatStorage",
               offset: int = 0, location: str = "cpu") -> Pickle:
        """torch._utils._rebuild_tensor_v2 of storage `key` (a record archive/data/KEY) as torch.save writes it."""
        self.g("torch._utils", "_rebuild_tensor_v2").mark()
        self.mark().s("storage").g("torch", storage).s(key).s(location).i(numel).tuple().raw(b"Q")  # BINPERSID
        return self.i(offset).ints(*size).ints(*stride).false().ordered_dict().tuple().reduce()

    def body(self) -> bytes:
        """The opcodes without PROTO, to splice into another pickle."""
        return bytes(self.b[2:])

    def done(self) -> bytes:
        return bytes(self.b + b".")


def forged_object_array(raw: bytes = b"\x41" * 8) -> Pickle:
    """An ndarray of dtype object over raw bytes: the dtype's pickled state clears its object flags, so
    ndarray.__setstate__ takes the bytes as they are, and every element is a forged PyObject pointer."""
    p = Pickle()
    p.g("numpy.core.multiarray", "_reconstruct").g("numpy", "ndarray").ints(0).by(b"b").tuple(3).reduce()
    p.mark().i(1).ints(len(raw) // 8)
    p.g("numpy", "dtype").s("O8").false().true().tuple(3).reduce()
    p.mark().i(3).s("|").none().none().none().i(-1).i(-1).i(0).tuple().build()  # flags 0: "no objects in here"
    return p.false().by(raw).tuple().build()


def splice(data: bytes, fragment: bytes, sentinel: str = FORGED) -> bytes:
    """Replace the BINUNICODE opcode of `sentinel` (protocol 2, no frames) by `fragment`'s opcodes."""
    op = b"X" + struct.pack("<I", len(sentinel)) + sentinel.encode()
    assert data.count(op) >= 1, f"{sentinel} not found"
    return data.replace(op, fragment)


def write_zip(path: Path, records: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    """A torch zip: archive/data.pkl, archive/data/KEY, byteorder and version records."""
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in {"byteorder": b"little", "version": b"3\n", **records}.items():
            z.writestr(f"archive/{name}", data)
    return path


def torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    return write_zip(path, {"data.pkl": pkl, **{f"data/{k}": v for k, v in (storages or {}).items()}})


def saved_with(path: Path, obj: Any, fragments: dict[str, bytes], legacy: bool = False) -> Path:
    """torch.save(obj) (zip or legacy) with each sentinel string in obj replaced by crafted opcodes."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    if legacy:
        data = buf.getvalue()
        for sentinel, fragment in fragments.items():
            data = splice(data, fragment, sentinel)
        path.write_bytes(data)
        return path
    buf.seek(0)
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                for sentinel, fragment in fragments.items():
                    data = splice(data, fragment, sentinel)
            zout.writestr(info, data)
    return path


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_file(path: Path, main_pickle: bytes, storages: list[tuple[str, bytes]] = ()) -> Path:
    """torch.save's format before 1.6: magic, protocol, sys_info, the object, storage keys, the storages."""
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, out, protocol=2)
    out.write(main_pickle)
    pickle.dump([k for k, _ in storages], out, protocol=2)
    for _, data in storages:
        out.write(struct.pack("<q", len(data) // 4) + data)
    path.write_bytes(out.getvalue())
    return path


def safetensors_file(path: Path, header: dict, data: bytes = b"", raw_header: bytes | None = None) -> Path:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def dcp_dir(directory: Path, tensors: dict[str, tuple[list[int], list[tuple[list[int], torch.Tensor]]]],
            edit=None, fragments: dict[str, bytes] | None = None, file: str = "__0_0.distcp") -> Path:
    """A DCP directory written by hand: fqn -> (size, [(offsets, chunk), ...]); `edit(metadata)` may change
    DCP's real Metadata before it is pickled (protocol 2, sentinels spliced)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    directory.mkdir(parents=True, exist_ok=True)
    blob, entries, storage = io.BytesIO(), {}, {}
    for fqn, (size, chunks) in tensors.items():
        metas = []
        for offsets, chunk in chunks:
            start = blob.tell()
            torch.save(chunk, blob)
            storage[MetadataIndex(fqn, torch.Size(offsets))] = _StorageInfo(file, start, blob.tell() - start)
            metas.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(chunk.shape)))
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(size), metas)
    meta = Metadata(state_dict_metadata=entries, planner_data={k: (k,) for k in tensors}, storage_data=storage)
    if edit is not None:
        edit(meta)
    data = pickle.dumps(meta, protocol=2)
    for sentinel, fragment in (fragments or {}).items():
        data = splice(data, fragment, sentinel)
    (directory / ".metadata").write_bytes(data)
    (directory / file).write_bytes(blob.getvalue())
    return directory


def small_state(fill: float = 1.0, keys: tuple[str, ...] = ("w",)) -> dict[str, torch.Tensor]:
    return {k: torch.full((4,), fill) for k in keys}


# ----------------------------------------------------------------------------- real checkpoints


def fastnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from ddp import models

    torch.manual_seed(seed)
    return models.build("fastnet_small", 10).state_dict()


def ours(path: Path, cfg: Any = None, **extra: Any) -> Path:
    """Our own format, as the trainer writes it (make_checkpoint + save_checkpoint)."""
    from ddp import checkpoint, models

    torch.manual_seed(0)
    model = models.build("fastnet_small", 10)
    ckpt = checkpoint.make_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), None, None,
                                      progress={"epoch": 1}, metrics={}, world_size=1, device_type="cpu",
                                      config=cfg if cfg is not None else {"model": "fastnet_small",
                                                                                 "num_classes": 10,
                                                                                 "dataset": "cifar10"})
    ckpt.update(extra)
    checkpoint.save_checkpoint(ckpt, path)
    return path


@dataclasses.dataclass
class RunConfig:
    """A user's config class: pickled by reference to this module, which a reader must not import."""

    lr: float = 0.1
    arch: str = "fastnet_small"


def real_checkpoints(directory: Path) -> dict[str, Path]:
    """One real checkpoint of every layout the reader knows, each written by the tool that writes it."""
    from safetensors.torch import save_file

    from ddp.checkpoint import WEIGHTS_FORMAT, write_dcp

    directory.mkdir(parents=True, exist_ok=True)
    state = fastnet_state()
    out = {"ours": ours(directory / "ours.pt")}
    torch.save(state, directory / "plain.pt")
    out["plain"] = directory / "plain.pt"
    torch.save({"state_dict": state, "epoch": 3}, directory / "legacy.pt", _use_new_zipfile_serialization=False)
    out["legacy"] = directory / "legacy.pt"
    save_file(state, directory / "export.safetensors", metadata={"format": WEIGHTS_FORMAT,
                                                                 "model_name": "fastnet_small", "num_classes": "10"})
    out["safetensors"] = directory / "export.safetensors"
    sharded = directory / "sharded"
    sharded.mkdir()
    keys = list(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k].contiguous() for k in part}, sharded / name)
    index = {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    out["sharded"] = sharded
    write_dcp({"model": state, "step": 7}, directory / "dcp")
    out["dcp"] = directory / "dcp"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "pytorch-lightning_version": "2.5.0",
                "epoch": 2, "global_step": 10, "hyper_parameters": {"lr": 0.1}}, directory / "lightning.ckpt")
    out["lightning"] = directory / "lightning.ckpt"
    with zipfile.ZipFile(directory / "plain.pt") as src, zipfile.ZipFile(directory / "repacked.pt", "w") as dst:
        for info in src.infolist():  # re-zipped by Python's zipfile: names without the UTF-8 flag (cp437)
            dst.writestr(info.filename, src.read(info.filename))
    out["repacked"] = directory / "repacked.pt"
    torch.save({"model": state, "config": RunConfig()}, directory / "foreign_class.pt")  # read inertly
    out["foreign_class"] = directory / "foreign_class.pt"
    return out
