"""Training written to a file or a pipe: one line per epoch naming the run instead of progress bars, evaluations
without Lightning's tables, each metric line naming its run; and `validate|test --ckpt_path RUN/best.ckpt` without
a config reads the run's own config.yaml."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.training.cli import main
from pipeline.training.progress import epoch_line

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def test_epoch_line():
    # Lightning keeps a metric logged on step and epoch as <name> (the last step's), <name>_step and <name>_epoch
    metrics = {"train/loss": 9.0, "train/loss_step": 9.0, "train/loss_epoch": 1.23456, "val/top1": 0.5,
               "val/loss": 2.0, "lr": 0.1}
    assert epoch_line("rgb", 2, 40, metrics, 2.06) == "rgb epoch 3/40: train/loss 1.2346  val/loss 2.0000  val/top1 0.5000  (2.1 s)"
    assert epoch_line("flow", 0, -1, {}, 0.0) == "flow epoch 1: no metrics logged  (0.0 s)"


@pytest.fixture
def fit_args(order_features, tmp_path):
    lists = order_features["lists"]
    return ["--config", TINY, "--data.features_dir", str(order_features["features"]), "--data.train_list",
            str(lists / "train.txt"), "--data.val_list", str(lists / "val.txt"), "--data.test_list",
            str(lists / "test.txt"), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "3",
            "--trainer.enable_progress_bar", "null"]


def test_a_fit_to_a_file_prints_one_line_per_epoch(fit_args, tmp_path, capsys, monkeypatch):
    assert main(["fit", *fit_args, "--run_name", "quiet"]) == 0
    out, err = capsys.readouterr()
    assert re.findall(r"^quiet epoch (\d)/3: train/loss [\d.]+ .*val/top1 [\d.]+", out, re.M) == ["1", "2", "3"]
    assert "\r" not in out + err and "it/s" not in out + err and "GPU available" not in out + err
    # on a terminal: Lightning's progress bar, no epoch lines
    import pipeline.training.cli as cli

    monkeypatch.setattr(cli, "on_terminal", lambda stream=None: True)
    assert main(["fit", *fit_args, "--run_name", "terminal", "--trainer.max_epochs", "1"]) == 0
    out, _ = capsys.readouterr()
    assert "terminal epoch" not in out and "Epoch 0" in out


def test_an_evaluation_without_config_reads_the_runs_and_names_it(fit_args, tmp_path, capsys):
    assert main(["fit", *fit_args, "--run_name", "r"]) == 0
    capsys.readouterr()
    best = tmp_path / "r" / "best.ckpt"
    assert main(["test", "--ckpt_path", str(best)]) == 0  # lists and settings from r/config.yaml
    out = capsys.readouterr().out
    assert re.search(rf"^test: run 'r' \(rgb features\), 32 videos, scores: {re.escape(str(tmp_path / 'r'))}", out, re.M)
    assert re.search(r"^test: top1 [\d.]+  top4 [\d.]+  mca [\d.]+  \(32 labelled\), run 'r'$", out, re.M)
    assert "Test metric" not in out  # Lightning's table: not in a file
    assert (tmp_path / "r" / "scores_test.npz").is_file()
    # an explicit --config is used as given (here one without a test list: refused, naming the flag)
    assert main(["test", "--config", TINY, "--ckpt_path", str(best), "--data.features_dir",
                 str(Path(fit_args[fit_args.index("--data.features_dir") + 1])),
                 "--data.test_list", "null", "--data.train_list", fit_args[fit_args.index("--data.train_list") + 1]]) == 2
    assert "needs --data.test_list" in capsys.readouterr().err
