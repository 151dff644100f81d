"""Run folders of `eleatt fit`: `<root>/<run>/` with best.ckpt, last.ckpt, metrics.csv and hparams.yaml (config.yaml
is the CLI's), kept whole across a resume.

This module is where the project meets Lightning's checkpoint and logger machinery, through public API only:

* two `ModelCheckpoint` callbacks, best.ckpt by the monitored metric and last.ckpt at the end of every training
  epoch (Lightning 2.6's own `save_last=True` rewrites last.ckpt only in a step where a top-k checkpoint is saved,
  so it would stop at the best epoch). Each has a state key of its own (the public `Callback.state_key`), so a resume
  restores both; best's is the key runs written before this module carry, so resuming one of them keeps its score.
  A run folder moved before its resume keeps its best.ckpt (their state is read relative to the folder).
* `RunMetricsLogger`, a `Logger` of our own: metrics.csv in the columns of Lightning's CSVLogger, continued across a
  resume (Lightning's CSVLogger deletes an existing metrics.csv).

What this relies on from Lightning beyond signatures (checkpoint callbacks run last and in the order given, after
the LightningModule's `on_train_epoch_end`; a resume sets `trainer.ckpt_path`, then calls the callbacks'
`on_load_checkpoint` before their `load_state_dict`; what it restores) is pinned by tests/training/test_run_folder.py;
the tested Lightning range is in constraints.txt.
"""
from __future__ import annotations

import csv
import os
import re
from argparse import Namespace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from pipeline.errors import InputNotFoundError, UsageError
from pipeline.paths import atomic_write
from pipeline.trained.record import read_checkpoint

DEFAULT_ROOT = "checkpoints"
CHECKPOINT_FILES = ("best.ckpt", "last.ckpt")
METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"
RUN_DIR_ENV = "ELEATT_RUN_DIR"  # the run folder, handed from rank 0 to the DDP processes Lightning starts
RUN_STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")  # the time stamp of a run folder's name


# -- which folder --------------------------------------------------------------------------------------------------
def stamped_run_dir(root: Path, configs: Iterable, now: Optional[datetime] = None) -> Path:
    """`<root>/<config name>-<YYYYmmdd-HHMMSS>` (`-2`, `-3`... for runs started within the same second). The config
    saved in a run folder (`<run>/config.yaml`) names the fresh run after that run, its stamp dropped."""
    configs = [str(c) for c in configs or []]
    stem = Path(configs[-1]).stem if configs else "eleatt"
    if configs and Path(configs[-1]).name == "config.yaml":
        stem = RUN_STAMP.sub("", Path(configs[-1]).resolve().parent.name) or stem
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    run_dir, k = root / f"{stem}-{stamp}", 2
    while run_dir.exists():
        run_dir, k = root / f"{stem}-{stamp}-{k}", k + 1
    return run_dir


def choose_run_dir(subcommand: str, ckpt: Optional[str], run_name: Optional[str], root: Path,
                   configs: Iterable) -> Path:
    """The folder a command writes into: the checkpoint's folder for an evaluation and for a resumed fit (a fit
    with --run_name too writes into that run instead), `<root>/<run_name>`, the folder rank 0 chose (a DDP process
    Lightning started), or a fresh stamped folder."""
    if ckpt is not None and not (subcommand == "fit" and run_name):
        return Path(ckpt).resolve().parent
    if run_name:
        return root / run_name
    if os.environ.get(RUN_DIR_ENV) and int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:
        # A DDP process that Lightning started (it inherits rank 0's environment): the run folder rank 0 named,
        # not a second time stamp. torchrun/SLURM start every rank themselves: give them --run_name.
        return Path(os.environ[RUN_DIR_ENV])
    return stamped_run_dir(root, configs)


def refuse_taken(run_dir: Path) -> None:
    """A fresh fit must not overwrite the checkpoints of another run."""
    taken = [name for name in CHECKPOINT_FILES if (run_dir / name).exists()]
    if taken:
        raise UsageError(
            f"run folder '{run_dir}' already holds {', '.join(taken)}; choose another --run_name, or resume that "
            f"run with --ckpt_path {run_dir / 'last.ckpt'}"
        )


def named_checkpoint(name: str, run_name: Optional[str], root: Path, configs: Iterable) -> Path:
    """`--ckpt_path last` (Lightning's shorthand) or `best`: that file of the run named by --run_name, or of the run
    whose config.yaml is given as --config."""
    if name not in ("last", "best"):
        raise UsageError(f"--ckpt_path {name}: give a checkpoint file, or last / best of a run")
    folders = [root / run_name] if run_name else []
    folders += [Path(str(c)).parent for c in configs or [] if Path(str(c)).name == "config.yaml"]
    for folder in folders:
        if (folder / f"{name}.ckpt").is_file():
            return folder / f"{name}.ckpt"
    where = f" (looked in {', '.join(str(f) for f in folders)})" if folders else ""
    raise InputNotFoundError(
        f"--ckpt_path {name}: no {name}.ckpt found{where}; name the run with --run_name RUN (under "
        f"--trainer.default_root_dir, default {DEFAULT_ROOT}/), pass --config checkpoints/<run>/config.yaml, or "
        f"give the file: --ckpt_path checkpoints/<run>/{name}.ckpt"
    )


def checkpoint_epoch(path: str | os.PathLike) -> Optional[int]:
    """The epoch a Lightning checkpoint ends; refuses (UsageError, one line) a file that is not one, before
    Lightning reads it (a text file, a bare state dict or a truncated file would end in a traceback there)."""
    checkpoint = read_checkpoint(path, mmap=True)
    if "pytorch-lightning_version" not in checkpoint:
        raise UsageError(f"'{path}' is not a Lightning checkpoint (no pytorch-lightning_version); pass a "
                         "best.ckpt or last.ckpt written by `eleatt fit`")
    epoch = checkpoint.get("epoch")
    return epoch if isinstance(epoch, int) else None


# -- checkpoints ---------------------------------------------------------------------------------------------------
class _RunFileCheckpoint(ModelCheckpoint):
    """A checkpoint file of a run folder. A resume from a checkpoint in this folder is a resume of this run, even if
    the folder moved since the checkpoint was written (renamed, copied to another machine): the saved state is then
    read as that of the same files in the folder they are in now. (Lightning's own reload keeps only
    `best_model_path` when the folder changed, and a resume would replace best.ckpt with the next epoch, however
    bad.) A checkpoint of another folder (`fit --ckpt_path other/last.ckpt --run_name new`) starts a new best."""

    _resumed_here = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        resumed = trainer.ckpt_path  # the file being restored (set before the callbacks' states are loaded)
        self._resumed_here = bool(resumed) and bool(self.dirpath) and (
            os.path.realpath(os.path.dirname(os.fspath(resumed))) == os.fspath(self.dirpath))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if self._resumed_here and saved and os.fspath(saved) != os.fspath(self.dirpath):
            def here(path):
                return os.path.join(self.dirpath, os.path.basename(path)) if path else path

            state_dict = {**state_dict, "dirpath": self.dirpath}
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state_dict:
                    state_dict[key] = here(state_dict[key])
            if "best_k_models" in state_dict:
                state_dict["best_k_models"] = {here(k): v for k, v in state_dict["best_k_models"].items()}
        super().load_state_dict(state_dict)


class BestCheckpoint(_RunFileCheckpoint):
    """`<run>/best.ckpt`: the best epoch by `monitor` (with `monitor=None`, the latest epoch)."""

    def __init__(self, run_dir: str | os.PathLike, monitor: Optional[str], mode: str) -> None:
        super().__init__(dirpath=run_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                         every_n_epochs=1, auto_insert_metric_name=False, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        # The key the checkpoints of earlier versions of this project carry for the same callback (Lightning's
        # format for their `_RunCheckpoint` class): resuming one of those runs restores its best score. The
        # monitor and mode are part of it, so a resume that monitors another metric starts a new best.
        return "_RunCheckpoint" + repr({"monitor": self.monitor, "mode": self.mode, "every_n_train_steps": 0,
                                        "every_n_epochs": 1, "train_time_interval": None})


class LastCheckpoint(_RunFileCheckpoint):
    """`<run>/last.ckpt`: the end of every training epoch, whatever the monitored metric did (and whether or not the
    epoch validated), so a resume redoes nothing."""

    STATE_KEY = "eleatt.LastCheckpoint"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        super().__init__(dirpath=run_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                         save_on_train_epoch_end=True, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return self.STATE_KEY


def run_checkpoints(run_dir: str | os.PathLike, monitor: Optional[str], mode: str) -> list[ModelCheckpoint]:
    """[best, last], in this order: Lightning runs checkpoint callbacks after all others and in the order given,
    so last.ckpt is written after best.ckpt in the same epoch and holds best's state of that epoch."""
    return [BestCheckpoint(run_dir, monitor, mode), LastCheckpoint(run_dir)]


# -- metrics.csv ---------------------------------------------------------------------------------------------------
def _epoch_after(row: dict, epoch: int) -> bool:
    try:
        return float(row.get("epoch") or "nan") > epoch
    except ValueError:
        return False


class RunMetricsLogger(Logger):
    """`<run>/metrics.csv` (a row per logging call; the columns sorted, `epoch` and `step` among them: the layout of
    Lightning's CSVLogger) and `<run>/hparams.yaml`, written on rank 0.

    `resume_epoch`: None for a fresh run (an earlier metrics.csv in the folder, left by a run stopped before it
    saved a checkpoint, is replaced); the epoch of the checkpoint a resume starts from, to keep the rows up to that
    epoch and drop the later ones (logged by the part of an epoch the resume redoes). Either happens at the first
    write, so that only rank 0 touches the file.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_epoch: Optional[int] = None) -> None:
        super().__init__()
        self._dir = Path(run_dir)
        self._resume_epoch = resume_epoch
        self._rows: list[dict[str, Any]] = []
        self._started = False
        self._fields: list[str] = []  # metrics.csv's header once started
        self._hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._dir)

    @property
    def log_dir(self) -> str:
        return str(self._dir)

    @property
    def metrics_file(self) -> Path:
        return self._dir / METRICS_FILE

    @property
    def experiment(self) -> "RunMetricsLogger":
        """No experiment object behind this logger: itself."""
        return self

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self._hparams.update(vars(params) if isinstance(params, Namespace) else dict(params or {}))
        self._dir.mkdir(parents=True, exist_ok=True)
        save_hparams_to_yaml(self._dir / HPARAMS_FILE, self._hparams)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        row = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
        row["step"] = step if step is not None else len(self._rows)
        self._rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        path = self.metrics_file
        if not self._started:
            self._start(path)
        fields = self._fields  # the file's header, as this logger last wrote it (not read again at every step)
        new = sorted(set(fields).union(*self._rows))
        if new != fields:  # a metric logged for the first time (validation at the end of epoch 0): a wider header
            self._rewrite(path, new, self._read(path)[1] if fields else [])
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=new).writerows(self._rows)
        self._fields = new
        self._rows = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def _start(self, path: Path) -> None:
        self._started = True
        self._dir.mkdir(parents=True, exist_ok=True)
        if self._resume_epoch is None:
            path.unlink(missing_ok=True)
        elif path.is_file():
            fields, rows = self._read(path)
            kept = [row for row in rows if not _epoch_after(row, self._resume_epoch)]
            if len(kept) != len(rows):
                self._rewrite(path, fields, kept)
        self._fields = self._header(path)

    @staticmethod
    def _header(path: Path) -> list[str]:
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])

    @staticmethod
    def _read(path: Path) -> tuple[list[str], list[dict]]:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    @staticmethod
    def _rewrite(path: Path, fields: list[str], rows: list[dict]) -> None:
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
