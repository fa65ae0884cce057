"""A directory holding `pytorch_model.bin`: Hugging Face save_pretrained(safe_serialization=False) and
accelerate's save_state(safe_serialization=False).

Only the model file is read (a torch.save state dict, through torch_file like any untrusted file).
accelerate's optimizer.bin, scheduler.bin and random_states_0.pkl (a plain pickle of RNG states) are never
opened: they hold no weights, and a plain pickle can only be read by running it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp.checkpoint.readers.loaded import Loaded, open_regular

MODEL_FILE = "pytorch_model.bin"
ACCELERATE_FILES = ("optimizer.bin", "random_states_0.pkl", "scheduler.bin", "scaler.pt")


def claims(path: Path, head: bytes) -> bool:
    return (path / MODEL_FILE).is_file()


def read(path: Path, map_location: Any, *, trust_pickle: bool = False) -> Loaded:
    from ddp.checkpoint.readers import read_checkpoint

    open_regular(path / MODEL_FILE, root=path).close()  # a symlink out of the directory, or a FIFO, is refused
    loaded = read_checkpoint(path / MODEL_FILE, map_location, trust_pickle=trust_pickle)
    tool = "accelerate save_state directory" if any((path / n).exists() for n in ACCELERATE_FILES) \
        else "Hugging Face model folder"
    loaded.container = f"{tool} ({MODEL_FILE}, {loaded.container})"
    return loaded
