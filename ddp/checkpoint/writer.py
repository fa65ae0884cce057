"""Checkpoints written in the background: training waits only for a CPU copy of the state, never for the disk."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import torch


def cpu_copy(obj: Any) -> Any:
    """A deep copy of a checkpoint dict with every tensor copied to the CPU: safe to write while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = copy.copy(obj)  # the same type and attributes (a state_dict's _metadata)
        for key, value in obj.items():
            copied[key] = cpu_copy(value)
        return copied
    if isinstance(obj, list):
        return [cpu_copy(value) for value in obj]
    if type(obj) is tuple:
        return tuple(cpu_copy(value) for value in obj)
    return copy.deepcopy(obj)  # plain values: nothing to copy, or something a caller may still change


class BackgroundWriter:
    """Runs one write at a time on its own thread; a write's error is raised by the next submit() or wait().

    submit() first waits for the write before it, so there are never two writes in flight (nor two
    copies of the state waiting to be written).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """Whether a write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, write: Callable[[], Any]) -> None:
        """Start `write` on the writer thread, once the previous write is done (raising its error, if any)."""
        self.wait()
        # not a daemon: an interpreter that exits without wait() still lets the write finish
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; raise its error, once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, write: Callable[[], Any]) -> None:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 -- handed to the thread that calls wait()
            self._error = e
