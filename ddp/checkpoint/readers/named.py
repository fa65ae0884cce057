"""Files recognised but not read: each named for what it is, with what to do instead.

A valid file of another framework is not a damaged checkpoint, so it is never called one. Signatures come
from each format's specification; bytes that match none are left to torch_file, whose verdict on unknown
bytes is "no checkpoint format this reader knows". Asked after every reader that takes weights: last of
the directory readers, and before torch_file among the file readers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ddp.checkpoint.errors import CheckpointFormatError
from ddp.checkpoint.readers.loaded import Loaded
from ddp.checkpoint.readers.torchscript import archive_names

PYTORCH = "ddp-cifar reads PyTorch weights"
REBUILD = ("rebuild the model in PyTorch and copy the weights across layer by layer (convolution kernels are laid "
           "out differently), or use the original PyTorch checkpoint")
# ONNX is a protobuf ModelProto: field 1 (ir_version, a small varint) first, then a length-delimited field
# (producer_name, producer_version, domain, graph, opset_import, ...); torch.onnx.export and onnx.save write it so
ONNX = re.compile(rb"\x08[\x01-\x20][\x12\x1a\x22\x2a\x32\x3a\x42\x52\x72\xa2]", re.DOTALL)
SIGNATURES: list[tuple[bytes, int, str, str]] = [  # (magic, offset, what it is, what to do)
    (b"\x89HDF\r\n\x1a\n", 0, "an HDF5 file (a Keras .h5 model or weights)", f"{PYTORCH}: {REBUILD}"),
    (b"TFL3", 4, "a TensorFlow Lite model", f"{PYTORCH}: {REBUILD}"),
    (b"GGUF", 0, "a GGUF file (llama.cpp)", f"{PYTORCH}: use the original PyTorch or safetensors weights"),
    (b"\x93NUMPY", 0, "a NumPy .npy array", "save a dict of tensors with torch.save or safetensors instead"),
    (b"\xfd7zXZ\x00", 0, "xz-compressed", "decompress it first (xz -d FILE)"),
    (b"BZh", 0, "bzip2-compressed", "decompress it first (bunzip2 FILE)"),
    (b"\x28\xb5\x2f\xfd", 0, "zstd-compressed", "decompress it first (zstd -d FILE)"),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive", "extract it first and pass the checkpoint inside"),
]
ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip, or an empty one


def _zip_kind(names: list[str]) -> tuple[str, str] | None:
    """A zip that is not torch.save's: Keras 3 `.keras`, NumPy `.npz`, or any other archive of files."""
    if not names or any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return None  # torch.save's (or damaged): torch_file's
    if {"config.json", "metadata.json"} <= set(names) and any(n.endswith(".weights.h5") for n in names):
        return "a Keras 3 .keras model (a zip of config.json and HDF5 weights)", f"{PYTORCH}: {REBUILD}"
    if all(n.endswith(".npy") for n in names):
        return "a NumPy .npz archive", "save a dict of tensors with torch.save or safetensors instead"
    listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"a zip archive of {len(names)} files ({listed}), not a torch.save checkpoint", \
        "extract it and pass the checkpoint inside"


def _identify(path: Path, head: bytes) -> tuple[str, str] | None:
    for magic, offset, what, todo in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return what, todo
    if ONNX.match(head) or (path.suffix == ".onnx" and head[:1] == b"\x08"):
        return "an ONNX model", f"{PYTORCH}: export them from the original PyTorch model, or convert with onnx2torch"
    if head.startswith(ZIP_STARTS):
        return _zip_kind(archive_names(path, b"PK\x03\x04"))
    return None


def _identify_directory(path: Path) -> tuple[str, str] | None:
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
        return "a TensorFlow SavedModel directory", f"{PYTORCH}: {REBUILD}"
    return None


def claims(path: Path, head: bytes) -> bool:
    return (_identify_directory(path) if path.is_dir() else _identify(path, head)) is not None


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    if path.is_dir():
        what, todo = _identify_directory(path) or ("", "")
        raise CheckpointFormatError(f"{path} is {what}; {todo}")
    with open(path, "rb") as f:
        head = f.read(64)
    what, todo = _identify(path, head) or ("not a format this reader knows", "pass a torch or safetensors file")
    raise CheckpointFormatError(f"{path} is {what}; {todo}")
