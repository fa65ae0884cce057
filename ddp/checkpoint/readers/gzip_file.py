"""gzip-compressed checkpoints (`model.pt.gz`): decompressed with a bound, then read like any other file.

The bound comes from the file's size (a real checkpoint compresses by a few times at most; a gzip bomb by
a thousand) and a fixed ceiling. The bytes go to a temporary file that is always removed, which the
dispatcher reads again; gzip inside gzip is refused, so the dispatcher is entered once more at most.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

from ddp.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, first_line
from ddp.checkpoint.readers.loaded import Loaded, open_regular

MAGIC = b"\x1f\x8b"
RATIO = 8  # decompressed bytes allowed per compressed byte (tensors of floats compress by ~1.1x)
SLACK = 64 << 20  # plus this much, for small files of zeros
CEILING = 64 << 30  # and never more than this
CHUNK = 1 << 20


def claims(path: Path, head: bytes) -> bool:
    return head.startswith(MAGIC)


def _inflate(path: Path, out: Any, limit: int) -> None:
    """Write the decompressed bytes of gzip file `path` to `out`, refusing more than `limit` of them."""
    inflater, written = zlib.decompressobj(16 + zlib.MAX_WBITS), 0  # 16+: the gzip header and trailer (CRC32)
    with open_regular(path) as f:
        while chunk := f.read(CHUNK):
            data = inflater.decompress(chunk, limit + 1 - written)
            while True:
                written += len(data)
                if written > limit:
                    raise CheckpointFormatError(f"{path} decompresses to more than {limit >> 20} MiB ({RATIO}x its "
                                                "size and more): not a compressed checkpoint (a gzip bomb?); refused")
                out.write(data)
                if not inflater.unconsumed_tail:
                    break
                data = inflater.decompress(inflater.unconsumed_tail, limit + 1 - written)
            if inflater.eof:
                break
    if not inflater.eof:
        raise zlib.error("the compressed stream ends early")


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    from ddp.checkpoint.readers import read_checkpoint  # the decompressed bytes are any file we read

    limit = min(path.stat().st_size * RATIO + SLACK, CEILING)
    fd, name = tempfile.mkstemp(prefix=".ddp-gunzip-", suffix=".tmp")
    inner = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                _inflate(path, out, limit)
            except (zlib.error, EOFError) as e:
                raise CheckpointCorruptError(f"{path} is a damaged gzip file ({first_line(e, 120)}); copy it again "
                                             "or pick another file") from e
        with open(inner, "rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                raise CheckpointFormatError(f"{path} is gzip inside gzip; decompress it yourself (gunzip) and pass "
                                            "the result")
        try:
            loaded = read_checkpoint(inner, map_location, trust_pickle=trust_pickle)
        except CheckpointError as e:  # its messages name the temporary file: name the one the user gave
            raise type(e)(str(e).replace(str(inner), f"{path} (decompressed)")) from e
    finally:
        inner.unlink(missing_ok=True)
    loaded.container = f"gzip-compressed {loaded.container}"
    return loaded
