"""pipeline.training.run_folder, the adapter between run folders and Lightning: which folder a command writes into,
best.ckpt / last.ckpt through two public ModelCheckpoint callbacks, and metrics.csv through our own Logger. The
Lightning behaviour it relies on (checkpoint callbacks last and in order, what a resume restores, that last.ckpt
follows every epoch) is read from real Trainer runs of a tiny model whose metric is set per epoch."""
from __future__ import annotations

import csv
import os
from datetime import datetime
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

from pipeline.errors import InputNotFoundError, UsageError
from pipeline.training.run_folder import (
    RUN_DIR_ENV, BestCheckpoint, LastCheckpoint, RunMetricsLogger, checkpoint_epoch, choose_run_dir,
    named_checkpoint, refuse_taken, run_checkpoints, stamped_run_dir,
)

BEST_KEY = ("_RunCheckpoint{'monitor': 'val/score', 'mode': 'max', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
            "'train_time_interval': None}")


class Scored(pl.LightningModule):
    """Two training steps per epoch (lr 0: the weights never change) and `val/score` = SCORES[epoch]."""

    SCORES = (1.0, 0.5, 0.2, 0.1, 0.0)

    def __init__(self, validate: bool = True) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.validate = validate

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.SCORES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 2)), batch_size=2) if self.validate else []


def fit(run: Path, epochs: int, ckpt: Path | None = None, resume_epoch: int | None = None, validate: bool = True,
        **trainer) -> pl.Trainer:
    callbacks = run_checkpoints(run, "val/score" if validate else None, "max")
    trainer = pl.Trainer(
        default_root_dir=run, max_epochs=epochs, callbacks=callbacks, logger=RunMetricsLogger(run, resume_epoch),
        accelerator="cpu", devices=1, log_every_n_steps=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, **trainer,
    )
    trainer.fit(Scored(validate), ckpt_path=ckpt)
    return trainer


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# -- checkpoints ---------------------------------------------------------------------------------------------------
def test_callbacks_run_last_in_the_order_given_with_their_own_state_keys(tmp_path):
    best, last = run_checkpoints(tmp_path, "val/score", "max")
    other = Callback()
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[best, last, other], logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert trainer.callbacks[-2:] == [best, last] and trainer.checkpoint_callback is best
    assert trainer.checkpoint_callbacks == [best, last]
    assert best.state_key == BEST_KEY  # the key of runs written before this module: their resume keeps the best
    assert last.state_key == "eleatt.LastCheckpoint"
    # Without validation both monitor nothing; a "min" metric gives best the mode a plain last checkpoint has.
    keys = {c.state_key for c in run_checkpoints(tmp_path, None, "min")}
    assert len(keys) == 2
    assert (best.filename, last.filename) == ("best", "last")


def test_last_follows_every_epoch_and_best_the_metric(tmp_path):
    trainer = fit(tmp_path, 3)  # val/score 1.0, 0.5, 0.2: only epoch 0 is the best
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert load(tmp_path / "best.ckpt")["epoch"] == 0 and load(tmp_path / "last.ckpt")["epoch"] == 2
    state = load(tmp_path / "last.ckpt")["callbacks"]
    assert sorted(state) == sorted([BEST_KEY, "eleatt.LastCheckpoint"])
    assert float(state[BEST_KEY]["best_model_score"]) == 1.0
    assert Path(state[BEST_KEY]["best_model_path"]).name == "best.ckpt"
    assert Path(state["eleatt.LastCheckpoint"]["best_model_path"]).name == "last.ckpt"
    assert float(trainer.checkpoint_callback.best_model_score) == 1.0


def test_a_resume_keeps_best_and_moves_last_on(tmp_path):
    fit(tmp_path, 2)
    before = (tmp_path / "best.ckpt").read_bytes()
    trainer = fit(tmp_path, 4, ckpt=tmp_path / "last.ckpt", resume_epoch=1)  # epochs 2, 3: 0.2, 0.1, no better
    assert (tmp_path / "best.ckpt").read_bytes() == before  # neither re-saved at the start nor replaced
    assert load(tmp_path / "last.ckpt")["epoch"] == 3
    assert float(trainer.checkpoint_callback.best_model_score) == 1.0  # the state restored, not started anew
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt", "metrics.csv"]


def test_a_run_folder_moved_before_its_resume_keeps_its_best(tmp_path):
    fit(tmp_path / "there", 2)
    (tmp_path / "there").rename(tmp_path / "here")  # copied to another machine, renamed, ...
    run = tmp_path / "here"
    before = (run / "best.ckpt").read_bytes()
    trainer = fit(run, 4, ckpt=run / "last.ckpt", resume_epoch=1)
    assert sorted(p.name for p in run.iterdir()) == ["best.ckpt", "last.ckpt", "metrics.csv"]  # no best-v1.ckpt
    assert (run / "best.ckpt").read_bytes() == before and load(run / "last.ckpt")["epoch"] == 3
    best = trainer.checkpoint_callback
    assert float(best.best_model_score) == 1.0 and best.best_model_path == str(run.resolve() / "best.ckpt")
    assert list(best.best_k_models) == [str(run.resolve() / "best.ckpt")]
    state = load(run / "last.ckpt")["callbacks"]
    assert state[BEST_KEY]["dirpath"] == state["eleatt.LastCheckpoint"]["dirpath"] == str(run.resolve())


def test_a_checkpoint_of_another_run_starts_a_new_best(tmp_path):
    fit(tmp_path / "first", 2)
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "best.ckpt").write_bytes(b"stale")  # a folder fine-tuned into is overwritten, not versioned
    trainer = fit(tmp_path / "second", 3, ckpt=tmp_path / "first" / "last.ckpt", resume_epoch=1)  # epoch 2 only
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == ["best.ckpt", "last.ckpt", "metrics.csv"]
    assert load(tmp_path / "second" / "best.ckpt")["epoch"] == 2  # its own best (0.2), not the first run's (1.0)
    assert float(trainer.checkpoint_callback.best_model_score) == pytest.approx(0.2)
    assert load(tmp_path / "first" / "best.ckpt")["epoch"] == 0


def test_last_is_written_in_epochs_that_do_not_validate(tmp_path):
    fit(tmp_path, 3, check_val_every_n_epoch=2)  # validation after epoch 1 only
    assert load(tmp_path / "best.ckpt")["epoch"] == 1 and load(tmp_path / "last.ckpt")["epoch"] == 2


def test_without_validation_best_is_the_latest_epoch(tmp_path):
    fit(tmp_path, 2, validate=False, limit_val_batches=0)
    assert load(tmp_path / "best.ckpt")["epoch"] == 1 and load(tmp_path / "last.ckpt")["epoch"] == 1


# -- metrics.csv ---------------------------------------------------------------------------------------------------
def test_a_resume_from_epoch_1_logs_each_epoch_once(tmp_path):
    fit(tmp_path, 2)
    (tmp_path / "epoch1.ckpt").write_bytes((tmp_path / "last.ckpt").read_bytes())
    fit(tmp_path, 3, ckpt=tmp_path / "last.ckpt", resume_epoch=1)
    assert [int(r["epoch"]) for r in rows(tmp_path) if r["val/score"]] == [0, 1, 2]
    # Again from epoch 1: epoch 2's rows are dropped and redone, not kept beside the new ones.
    fit(tmp_path, 3, ckpt=tmp_path / "epoch1.ckpt", resume_epoch=1)
    logged = rows(tmp_path)
    assert [int(r["epoch"]) for r in logged if r["val/score"]] == [0, 1, 2]
    assert [(int(r["epoch"]), int(r["step"])) for r in logged if r["train/loss"]] == [
        (0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    assert len(logged) == 9 and list(logged[0]) == ["epoch", "step", "train/loss", "val/score"]


def write_csv(path: Path, fields: list[str], table: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows(table)


def test_the_logger_appends_widens_the_header_and_drops_only_later_epochs(tmp_path):
    write_csv(tmp_path / "metrics.csv", ["epoch", "loss", "step"],
              [[0, 1.5, 0], [1, 1.25, 1], [1, "", 1], [2, 1.0, 2], ["", 9, 3]])
    logger = RunMetricsLogger(tmp_path, resume_epoch=1)
    assert (logger.name, logger.version, logger.save_dir, logger.log_dir) == ("", "", str(tmp_path), str(tmp_path))
    logger.log_metrics({"epoch": 2, "loss": torch.tensor(0.5)}, step=2)
    assert len(rows(tmp_path)) == 5 and rows(tmp_path)[3]["epoch"] == "2"  # nothing changed before save()
    logger.save()
    assert [(r["epoch"], r["loss"]) for r in rows(tmp_path)] == [
        ("0", "1.5"), ("1", "1.25"), ("1", ""), ("", "9"), ("2", "0.5")]  # a row without an epoch is kept
    logger.log_metrics({"epoch": 2, "val/acc": 0.75}, step=3)
    logger.finalize("success")
    table = rows(tmp_path)
    assert list(table[0]) == ["epoch", "loss", "step", "val/acc"] and len(table) == 6
    assert table[-1] == {"epoch": "2", "loss": "", "step": "3", "val/acc": "0.75"}
    assert table[0] == {"epoch": "0", "loss": "1.5", "step": "0", "val/acc": ""}
    logger.log_hyperparams({"hidden_size": 32})
    assert (tmp_path / "hparams.yaml").read_text() == "hidden_size: 32\n"


def test_a_fresh_run_replaces_a_stale_metrics_file_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    write_csv(tmp_path / "metrics.csv", ["epoch", "loss", "step"], [[0, 1.5, 0], [1, 1.25, 1]])
    logger = RunMetricsLogger(tmp_path)
    logger.log_metrics({"epoch": 0, "loss": 2.0}, step=0)
    logger.save()
    assert rows(tmp_path) == [{"epoch": "0", "loss": "2.0", "step": "0"}]
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    other = RunMetricsLogger(tmp_path / "rank1")
    other.log_metrics({"epoch": 0, "loss": 2.0}, step=0)
    other.save()
    other.log_hyperparams({"a": 1})
    assert not (tmp_path / "rank1").exists()


# -- which folder --------------------------------------------------------------------------------------------------
def test_the_folder_of_each_command(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    root, ckpt = tmp_path / "runs", tmp_path / "runs" / "r" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    for command in ("fit", "validate", "test", "predict"):  # a resume and the evaluations: the checkpoint's folder
        assert choose_run_dir(command, str(ckpt), None, root, ["configs/tiny.yaml"]) == ckpt.parent
    assert choose_run_dir("test", str(ckpt), "other", root, []) == ckpt.parent
    assert choose_run_dir("fit", str(ckpt), "other", root, []) == root / "other"  # fine-tuning into a new run
    assert choose_run_dir("fit", None, "named", root, []) == root / "named"
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "rank0"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert choose_run_dir("fit", None, None, root, ["configs/tiny.yaml"]) == tmp_path / "rank0"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert choose_run_dir("fit", None, None, root, ["configs/tiny.yaml"]).name.startswith("tiny-")


def test_stamped_names(tmp_path):
    now = datetime(2026, 1, 2, 3, 4, 5)
    assert stamped_run_dir(tmp_path, ["a/tiny.yaml"], now) == tmp_path / "tiny-20260102-030405"
    (tmp_path / "tiny-20260102-030405").mkdir()
    (tmp_path / "tiny-20260102-030405-2").mkdir()
    assert stamped_run_dir(tmp_path, ["a/tiny.yaml"], now) == tmp_path / "tiny-20260102-030405-3"
    saved = tmp_path / "ucf-20251231-235959-2" / "config.yaml"  # a run's saved config: named after that run
    assert stamped_run_dir(tmp_path, ["base.yaml", str(saved)], now) == tmp_path / "ucf-20260102-030405"
    assert stamped_run_dir(tmp_path, [], now) == tmp_path / "eleatt-20260102-030405"


def test_named_checkpoints_and_taken_folders(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    refuse_taken(run)  # empty: free
    (run / "last.ckpt").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"already holds last.ckpt; .* --ckpt_path .*r/last.ckpt"):
        refuse_taken(run)
    assert named_checkpoint("last", "r", tmp_path, []) == run / "last.ckpt"
    assert named_checkpoint("last", None, tmp_path / "elsewhere", [str(run / "config.yaml")]) == run / "last.ckpt"
    with pytest.raises(InputNotFoundError, match=r"--ckpt_path best: no best.ckpt found \(looked in .*r\)"):
        named_checkpoint("best", "r", tmp_path, [])
    with pytest.raises(UsageError, match="--ckpt_path hpc: give a checkpoint file"):
        named_checkpoint("hpc", "r", tmp_path, [])


def test_checkpoint_epoch_refuses_what_lightning_did_not_write(tmp_path):
    torch.save({"state_dict": {}, "epoch": 4, "pytorch-lightning_version": "2.6.6"}, tmp_path / "ok.ckpt")
    assert checkpoint_epoch(tmp_path / "ok.ckpt") == 4
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(UsageError, match="is not a Lightning checkpoint"):
        checkpoint_epoch(tmp_path / "bare.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(UsageError, match="cannot be loaded"):
        checkpoint_epoch(tmp_path / "text.ckpt")
    assert os.path.exists(tmp_path / "ok.ckpt")


# -- the tested Lightning ------------------------------------------------------------------------------------------
def test_the_install_applies_the_tested_ranges_and_these_tests_ran_inside_them():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    repo = Path(__file__).resolve().parents[2]
    lines = [line.strip() for line in (repo / "constraints.txt").read_text().splitlines()]
    pins = {r.name: r.specifier for r in (Requirement(line) for line in lines if line and not line.startswith("#"))}
    assert {name: str(spec) for name, spec in pins.items()} == {"pytorch-lightning": "<2.7,>=2.6",
                                                              "jsonargparse": "<4.54,>=4.53"}
    for name, spec in pins.items():  # a newer Lightning must pass these tests before its range goes in
        assert spec.contains(version(name)), f"{name} {version(name)} is outside the tested range {spec}"
    makefile = (repo / "Makefile").read_text()
    recipe = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert recipe.splitlines()[0].split() == ["pyproject.toml", "constraints.txt"]  # reinstalls when they change
    project = [line for line in recipe.splitlines() if "pip install" in line and "-e " in line]
    assert len(project) == 1 and " -c constraints.txt " in project[0]
