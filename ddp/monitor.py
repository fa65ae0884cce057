"""What rank 0 shows: a TensorBoard run, a tqdm bar on a terminal, plain lines in a log file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class Monitor:
    """TensorBoard scalars and a progress bar. On ranks other than 0 every method does nothing."""

    def __init__(self, enabled: bool, logdir: str, run_name: str, config: dict[str, Any], note: str = ""):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(logdir) / run_name))
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(config.items()))
        self.writer.add_text("hparams", f"{note}\n\n| flag | value |\n|---|---|\n{table}")
        if note:
            self.writer.add_text("note", note)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        """A tqdm bar when stderr is a terminal; in a log file the epoch summary line is enough."""
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                            leave=False, dynamic_ncols=True)

    def advance(self, loss: float | None = None) -> None:
        if self.bar:
            self.bar.update()
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}")

    def end_epoch(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_epoch()
        if self.writer:
            self.writer.close()
