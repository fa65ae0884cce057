"""torch.save files: the zip format (since torch 1.6; ours, Lightning, timm, pytorch/examples) and legacy pickles.

torch's weights-only loader reads them first, with a scoped allowlist; a zip whose pickle names classes
beyond it is read again by the inert unpickler, which stands in for them. Any file no other reader
claims comes here last, so torch's verdict on it is the one the user sees.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ddp.checkpoint.errors import CheckpointError
from ddp.checkpoint.files import load_checkpoint
from ddp.checkpoint.readers.loaded import Loaded
from ddp.checkpoint.unpickle import inert_load_zip, refuse_hostile, safe_globals

ZIP_MAGIC = b"PK\x03\x04"


def claims(path: Path, head: bytes) -> bool:
    return True  # the fallback: asked last


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    with open(path, "rb") as f:
        container = "torch zip" if f.read(4) == ZIP_MAGIC else "torch legacy"
    if trust_pickle:
        return Loaded(load_checkpoint(path, map_location, trust_pickle=True), container)
    try:
        with safe_globals():  # argparse.Namespace, numpy scalars etc. load as themselves
            return Loaded(load_checkpoint(path, map_location), container)
    except CheckpointError as e:
        # the bytes are sound (CRCs checked) but name classes beyond the allowlist: read them inertly
        if container != "torch zip" or not isinstance(e.__cause__, pickle.UnpicklingError):
            raise
        with open(path, "rb") as f:
            try:
                obj, names = inert_load_zip(f, map_location)
            except Exception:  # noqa: BLE001 -- not even inertly readable: torch's own verdict stands
                raise e from None
    refuse_hostile(names, str(path))
    return Loaded(obj, container, names)
