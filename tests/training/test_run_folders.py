"""Run folders that survive: last.ckpt at every epoch end, metrics.csv across a resume, `--ckpt_path last`, the saved
config starting a fresh run, Ctrl-C with the command that resumes, and runs stopped (not saved) when values go
non-finite."""
from __future__ import annotations

import csv
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.training.module import EleAttClassifier, NonFiniteError
from pipeline.training.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def data_args(features: Path, lists: Path) -> list[str]:
    return ["--data.features_dir", str(features), "--data.train_list", str(lists / "train.txt"),
            "--data.val_list", str(lists / "val.txt")]


def epoch_of(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["epoch"]


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_last_is_the_latest_epoch_and_a_resume_keeps_the_history(order_features, tmp_path, capsys):
    root = tmp_path / "runs"
    # lr 0: val/top1 never improves after epoch 0, so best.ckpt stays at epoch 0 while last.ckpt must move on.
    argv = ["fit", "--config", TINY, *data_args(order_features["features"], order_features["lists"]),
            "--trainer.default_root_dir", str(root), "--run_name", "r", "--optimizer.init_args.lr", "0",
            "--trainer.max_epochs", "3"]
    assert main(argv) == 0
    run = root / "r"
    assert epoch_of(run / "best.ckpt") == 0 and epoch_of(run / "last.ckpt") == 2
    report = capsys.readouterr().out.splitlines()[-3:]
    assert report[0] == f"run folder: {run}" and report[2] == f"last checkpoint: {run.resolve() / 'last.ckpt'}"
    assert report[1].startswith(f"best checkpoint: {run.resolve() / 'best.ckpt'} (val/top1 = ")
    # A mark in epoch 2's last row: a resume from last.ckpt keeps the row, one from an earlier epoch redoes it.
    before = metric_rows(run)
    before[-1]["train/top1"] = "0.123"
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(before[0]))
        writer.writeheader()
        writer.writerows(before)
    best = (run / "best.ckpt").read_bytes()

    # `--ckpt_path last` with the run's saved config resumes into the same folder, its history kept.
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "4"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["r"]
    assert epoch_of(run / "last.ckpt") == 3 and epoch_of(run / "best.ckpt") == 0
    assert (run / "best.ckpt").read_bytes() == best  # not re-saved: the resume knows epoch 0's score
    rows = metric_rows(run)
    assert rows[:len(before)] == before and len(before) == 24  # epochs 0-2 kept as they were, not redone
    validated = [int(r["epoch"]) for r in rows if r.get("val/top1")]
    assert validated == [0, 1, 2, 3]  # each epoch once, in order: earlier rows kept, none duplicated
    assert {int(r["epoch"]) for r in rows if r.get("train/loss_step")} == {0, 1, 2, 3}
    assert Counter(int(r["epoch"]) for r in rows) == {0: 8, 1: 8, 2: 8, 3: 8}

    # The saved config describes the training: rerunning it starts a fresh run beside this one.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["ckpt_path"] is None and saved["run_name"] is None
    assert Path(saved["trainer"]["default_root_dir"]) == root
    assert main(["fit", "--config", str(run / "config.yaml"), "--trainer.max_epochs", "1"]) == 0
    fresh = sorted(p for p in root.iterdir() if p.name != "r")
    assert len(fresh) == 1 and fresh[0].name.startswith("r-") and (fresh[0] / "last.ckpt").is_file()
    assert not [p for p in run.iterdir() if p.is_dir() and p.name != "tensorboard"]  # nothing nested


def test_without_validation_best_is_the_latest_epoch(order_features, tmp_path, capsys):
    argv = ["fit", "--config", TINY, "--data.features_dir", str(order_features["features"]), "--data.train_list",
            str(order_features["lists"] / "train.txt"), "--data.val_list", "null", "--lr_scheduler", "null",
            "--trainer.default_root_dir", str(tmp_path), "--run_name", "r", "--trainer.max_epochs", "2"]
    assert main(argv) == 0
    run = tmp_path / "r"
    assert epoch_of(run / "best.ckpt") == 1 and epoch_of(run / "last.ckpt") == 1
    assert capsys.readouterr().out.splitlines()[-2] == f"best checkpoint: {run.resolve() / 'best.ckpt'}"  # no metric
    assert not [r for r in metric_rows(run) if "val/top1" in r]


def test_ctrl_c_in_fit_exits_130_and_prints_the_command_that_resumes(order_features, tmp_path, monkeypatch, capsys):
    def interrupt_in_epoch_1(self):  # before the checkpoint callback saves epoch 1: last.ckpt holds epoch 0
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    argv = ["fit", "--config", TINY, *data_args(order_features["features"], order_features["lists"]),
            "--trainer.default_root_dir", str(tmp_path), "--run_name", "r", "--trainer.max_epochs", "3"]
    with monkeypatch.context() as patch:
        patch.setattr(EleAttClassifier, "on_train_epoch_end", interrupt_in_epoch_1)
        assert main(argv) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"eleatt fit: interrupted (Ctrl-C); kept {tmp_path / 'r'}/ with last.ckpt (end of epoch 0)")
    resume = shlex.split(err.split("resume with: ", 1)[1])
    assert resume[:2] == ["eleatt", "fit"] and "--run_name" not in resume
    # Epoch 1 logged its 6 steps and its validation before the interrupt: rows the resume from epoch 0 redoes.
    assert Counter(int(r["epoch"]) for r in metric_rows(tmp_path / "r")) == {0: 8, 1: 7}
    assert main(resume[1:]) == 0
    assert epoch_of(tmp_path / "r" / "last.ckpt") == 2
    rows = metric_rows(tmp_path / "r")  # per epoch: 6 step rows, the validation row, the training-epoch row
    assert Counter(int(r["epoch"]) for r in rows) == {0: 8, 1: 8, 2: 8}
    assert [int(r["epoch"]) for r in rows if r.get("val/top1")] == [0, 1, 2]
    assert [int(r["step"]) for r in rows if r.get("train/loss_step")] == list(range(18))


def test_non_finite_features_stop_fit_naming_the_file(order_features, tmp_path, capsys):
    features = tmp_path / "features"
    shutil.copytree(order_features["features"], features)
    video = (order_features["lists"] / "train.txt").read_text().split()[0]
    bad = features / (os.path.splitext(video)[0] + ".npy")
    array = np.load(bad)
    array[3, 2] = np.nan
    np.save(bad, array)
    # A sample checks the steps it reads (never the whole file): all steps here (num_steps 0), so step 3 is read.
    argv = ["fit", "--config", TINY, *data_args(features, order_features["lists"]), "--data.num_steps", "0",
            "--trainer.default_root_dir", str(tmp_path), "--run_name", "r", "--trainer.max_epochs", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{bad}' of '{video}' holds 1 non-finite values" in err
    assert not list((tmp_path / "r").glob("*.ckpt"))


def test_a_non_finite_loss_stops_training_and_nan_weights_are_never_saved():
    model = EleAttClassifier(input_size=4, num_classes=3, hidden_size=8)
    batch = {"feats": torch.full((2, 5, 4), float("nan")), "lengths": torch.tensor([5, 3]),
             "labels": torch.tensor([0, 2]), "videos": ["a/x.mp4", "b/y.mp4"]}
    with pytest.raises(NonFiniteError, match=r"the training loss is nan .*batch videos: a/x.mp4, b/y.mp4"):
        model.training_step(batch, 0)
    checkpoint = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    model.on_save_checkpoint(checkpoint)  # finite: saved
    next(iter(checkpoint["state_dict"].values())).fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="are not finite"):
        model.on_save_checkpoint(checkpoint)


def test_config_errors_are_short_and_name_the_key(order_features, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text(Path(TINY).read_text().replace("hidden_size: 32", "hiden_size: 32"))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "hiden_size" in err and len(err.strip().splitlines()) <= 3 and "usage:" not in err
    (tmp_path / "file").write_text("x")
    argv = ["fit", "--config", TINY, *data_args(order_features["features"], order_features["lists"]),
            "--trainer.default_root_dir", str(tmp_path / "file")]
    assert main(argv) == 2
    assert f"run folder '{tmp_path / 'file'}/tiny-" in capsys.readouterr().err  # "...: a parent of it is a file"
    assert main(["fit", "--config", TINY, "--ckpt_path", "last"]) == 2
    assert "--ckpt_path last: no last.ckpt found" in capsys.readouterr().err


@pytest.mark.slow  # two processes start and synchronise (~1 minute on 2 loaded cores)
def test_two_process_fit_warns_nothing_and_reports_once(order_features, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "fit", "--config", TINY,
         *data_args(order_features["features"], order_features["lists"]), "--trainer.default_root_dir",
         str(tmp_path), "--run_name", "ddp", "--trainer.max_epochs", "2", "--trainer.strategy", "ddp",
         "--trainer.devices", "2"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist" not in result.stderr and "Warning" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1 and epoch_of(tmp_path / "ddp" / "last.ckpt") == 1
    rows = metric_rows(tmp_path / "ddp")
    assert [int(r["epoch"]) for r in rows if r.get("val/loss")] == [0, 1]
