"""Progress of a training run as a log file wants it: one line per epoch with the run named, instead of progress bars.

On a terminal Lightning's progress bar is the better view; written to a file or a pipe (a log, CI, `eleatt run`'s
output captured), its bars are hundreds of lines of carriage returns. `on_terminal()` tells the two apart, and
`EpochLines` prints, after each training epoch (its validation included):

    rgb epoch 3/40: train/loss 1.2345  val/loss 1.3012  val/top1 0.4500  (2.1 s)
"""
from __future__ import annotations

import sys
import time
from typing import Any

from pytorch_lightning.callbacks import Callback

# The epoch metrics shown, in this order, when logged (others are left to metrics.csv).
SHOWN = ("train/loss", "train/top1", "val/loss", "val/top1", "val/mca")


def on_terminal(stream: Any = None) -> bool:
    """Whether `stream` (default stdout, where Lightning draws its progress bar) is a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _value(metrics: dict, name: str) -> float | None:
    for key in (f"{name}_epoch", name):  # logged on step and epoch: Lightning names the epoch mean `<name>_epoch`
        if key in metrics:
            try:
                return float(metrics[key])
            except (TypeError, ValueError):
                return None
    return None


def epoch_line(name: str, epoch: int, max_epochs: int | None, metrics: dict, seconds: float) -> str:
    """`<name> epoch <k>/<max>: <metric> <value> ...  (<seconds> s)`; epochs counted from 1."""
    total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    shown = [(m, _value(metrics, m)) for m in SHOWN]
    values = "  ".join(f"{m} {v:.4f}" for m, v in shown if v is not None)
    return f"{name} epoch {epoch + 1}{total}: {values or 'no metrics logged'}  ({seconds:.1f} s)"


class EpochLines(Callback):
    """Prints one line per training epoch (after its validation), naming the run: see the module's docstring."""

    def __init__(self, name: str, stream: Any = None) -> None:
        self.name = name
        self.stream = stream
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # Read on every rank: computing a metric logged with sync_dist is a collective, and a rank that skips it
        # leaves the others waiting on a mismatched one (gloo aborts with "collective mismatch" under DDP).
        metrics = dict(trainer.callback_metrics)
        if not trainer.is_global_zero:
            return
        line = epoch_line(self.name, trainer.current_epoch, trainer.max_epochs, metrics,
                          time.perf_counter() - self._start)
        print(line, file=self.stream or sys.stdout, flush=True)
