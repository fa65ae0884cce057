"""What rank 0 shows: a TensorBoard run, a tqdm bar on a terminal, plain lines in a log file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

# The run's results as HParams-dashboard metrics: written once, when training ends.
FINAL_METRICS = {"final/test_acc": "acc", "final/best_test_acc": "best_acc", "final/test_loss": "loss",
                 "final/train_loss": "train_loss"}


def fresh_run_name(logdir: str | Path, name: str) -> str:
    """`name`, or `name-v2`, `name-v3`, ...: the first with no TensorBoard events under `logdir` yet.

    A fresh run never appends to another run's TensorBoard directory (TensorBoard would draw both as one
    zigzag line); a resumed run reuses the name its checkpoint records instead.
    """
    taken = {p.parent.name for p in Path(logdir).glob("*/events.out.tfevents.*")}
    candidates = (name if version == 1 else f"{name}-v{version}" for version in range(1, len(taken) + 2))
    return next(c for c in candidates if c not in taken)


class Monitor:
    """TensorBoard scalars, hyper-parameters and a progress bar. On ranks other than 0 every method does nothing."""

    def __init__(self, enabled: bool, logdir: str, run_name: str, config: dict[str, Any], note: str = ""):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(Path(logdir) / run_name))
        # The flags in the HParams dashboard, one row per run (lists as text; None is left out).
        flags = {k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for k, v in config.items()}
        experiment, start, self.session_end = hparams(flags, dict.fromkeys(FINAL_METRICS, 0.0))
        for summary in (experiment, start):
            self.writer.file_writer.add_summary(summary)
        if note:
            self.writer.add_text("note", note)

    def final(self, step: int, metrics: dict[str, float]) -> None:
        """Training finished: its final and best metrics, as the HParams dashboard's metric columns."""
        if self.writer:
            self.scalars(step, {tag: metrics[key] for tag, key in FINAL_METRICS.items()})
            self.writer.file_writer.add_summary(self.session_end)

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
