"""The oldest torch and torchvision this code runs on, and a one-line refusal of anything older.

Found from the APIs the code calls (docs/installing.md lists them): torch 2.5 is the oldest release in
which every one of them is certain; torchvision 0.20 is the release built for torch 2.5. The entry points call `require()` first, so an old install fails with one
line instead of an AttributeError deep in a run.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

import torch

MIN_TORCH = (2, 5)
MIN_TORCHVISION = (0, 20)


def _release(version: str) -> tuple[int, int] | None:
    """(major, minor) of '2.14.1+cu130', '2.5.0a0+git...'; None when it does not start like that."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _torchvision_version() -> str | None:
    try:  # from its metadata, without importing it (only some models and --download import it)
        return importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None


def problem() -> str | None:
    """What is too old in this environment, as one sentence that says what to install; None when all is fine."""
    found = [("torch", str(torch.__version__), MIN_TORCH)]
    vision = _torchvision_version()
    if vision is not None:
        found.append(("torchvision", vision, MIN_TORCHVISION))
    for name, version, needed in found:
        release = _release(version)
        if release is not None and release < needed:
            need = ".".join(map(str, needed))
            return (f"ddp-cifar needs {name}>={need}, but this environment has {name} {version}; "
                    f"pip install 'torch>={'.'.join(map(str, MIN_TORCH))}' "
                    f"'torchvision>={'.'.join(map(str, MIN_TORCHVISION))}'")
    return None


def require(prog: str) -> None:
    """Exit with status 2 and one line on stderr (from rank 0 only, under torchrun) when torch is too old."""
    message = problem()
    if message is None:
        return
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
