"""The errors of ddp.checkpoint: each message is one line that says what is wrong and what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ddp.checkpoint.keys import KeyDiff


# C0 and C1 controls (ESC starts terminal escape sequences), DEL, and the bidirectional overrides that reorder
# what a terminal shows: a name read from a file can contain any of them
_UNPRINTABLE = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
                for c in [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def printable(text: object) -> str:
    """`text` with every control character escaped (\\x1b): what a file holds can never drive the terminal."""
    return str(text).translate(_UNPRINTABLE)


class CheckpointError(Exception):
    """Base class; every message is one line meant for the user, with control characters escaped (it may quote
    key and class names from a file, which can hold terminal escape sequences)."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(printable(message), *args)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path given does not exist."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """The file is not a readable checkpoint (empty, truncated, garbage)."""


class UntrustedPickleError(CheckpointError, ValueError):
    """The file holds pickled classes/code that weights_only loading refuses."""


class CheckpointFormatError(CheckpointError, ValueError):
    """The file loads, but its layout or format version is not one we understand."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the model (or optimizer); `.diff` holds the details."""

    def __init__(self, message: str, diff: KeyDiff | None = None):
        super().__init__(message)
        self.diff = diff


class CheckpointWriteError(CheckpointError, OSError):
    """Saving failed; whatever was at the destination before is untouched."""


class CheckpointLockedError(CheckpointError):
    """Another run holds the checkpoint directory's lock; the message names it."""


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint file was skipped because it is unreadable; an older one is used instead."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, with its type unless it is an OSError."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if isinstance(e, OSError) else f"{type(e).__name__}: {text}".rstrip(": ")
    return text[:limit]
