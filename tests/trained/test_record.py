"""pipeline.trained: the trained-stream record in every checkpoint, read back the same by everything that serves a
model, validated, and loaded without Lightning."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.data.features import FeatureSettings
from pipeline.data.lists import read_list
from pipeline.trained.load import build_classifier, load_stream
from pipeline.trained.record import RECORD_KEY, StreamRecordError, TrainedStream, read_stream
from tests.conftest import REPO


def _record(**changes) -> TrainedStream:
    base = dict(
        network={"input_size": 6, "num_classes": 3, "cell": "gru", "hidden_size": 5, "num_layers": 2,
                 "attention_layers": 1, "dropout": 0.0, "input_dropout": 0.0, "proj_size": 0, "pooling": "mean"},
        class_names=["a", "b", "c"], features=FeatureSettings(backbone="test_resnet", dim=6), num_steps=4,
        normalizer={"mode": "standard", "mean": torch.arange(6.0), "std": torch.full((6,), 2.0)}, encoder=None)
    base.update(changes)
    return TrainedStream(**base)


def test_the_record_round_trips_through_a_checkpoint_file(tmp_path):
    record = _record()
    stored = record.to_dict()
    assert stored["format"] == 1 and stored["num_steps"] == 4 and stored["class_names"] == ["a", "b", "c"]
    assert stored["network"]["hidden_size"] == 5 and stored["features"]["backbone"] == "test_resnet"
    torch.save({"state_dict": {}, RECORD_KEY: stored}, tmp_path / "r.ckpt")
    back = TrainedStream.from_checkpoint(torch.load(tmp_path / "r.ckpt", weights_only=True), "r.ckpt")
    assert back.network == record.network and back.class_names == ["a", "b", "c"] and back.num_steps == 4
    assert back.features == FeatureSettings(backbone="test_resnet", dim=6)
    assert torch.equal(back.normalizer["mean"], torch.arange(6.0))
    assert back.normalizer["std"].tolist() == [2.0] * 6


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format=2), "format 2 is not one this version reads"),
    (lambda d: d.pop("normalizer"), "lacks ['normalizer']"),
    (lambda d: d.update(class_names=["a", "b"]), "2 class names for 3 classes"),
    (lambda d: d["network"].update(num_classes=0), "num_classes must be a positive integer"),
    (lambda d: d.update(num_steps=-1), "num_steps must be a positive integer or null"),
    (lambda d: d["normalizer"].update(std=torch.tensor([1.0, 0, 1, 1, 1, 1])), "non-finite or non-positive"),
    (lambda d: d["normalizer"].update(mean=torch.zeros(5)), "shape (6,)"),
    (lambda d: d["normalizer"].update(mode="zscore"), "normalizer mode"),
    (lambda d: d.update(features={"format": 1, "backbone": 3}), "settings"),
    (lambda d: d.update(encoder={"in_chans": 3}), "encoder must name its backbone"),
])
def test_a_damaged_record_is_one_error_naming_the_checkpoint(change, message):
    stored = _record().to_dict()
    change(stored)
    with pytest.raises(StreamRecordError, match="ck.ckpt") as err:
        TrainedStream.from_checkpoint({RECORD_KEY: stored, "state_dict": {}}, "runs/ck.ckpt")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_record_are_refused():
    record = _record()
    with pytest.raises(StreamRecordError, match="do not match its record"):
        build_classifier(record, {"net.head.weight": torch.zeros(3, 5)}, "x.ckpt")


def test_fit_writes_the_record_that_classify_reads(quick_demo):
    """The demo's RGB run: the record holds what the run was configured with (the quick demo's EleAtt-LSTM of 32
    units on timm test_resnet features, 96 dimensions; 10 classes), and the loaded classifier scores as `test`."""
    from pipeline.evaluation.scores import read_scores

    run = quick_demo["run"]
    checkpoint = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    assert set(checkpoint[RECORD_KEY]) == {"format", "network", "class_names", "features", "num_steps",
                                           "normalizer", "encoder"}
    assert "data_state" not in checkpoint and "FeatureDataModule" not in checkpoint  # stored once, in the record
    record, state = read_stream(run / "best.ckpt")
    assert record.network["cell"] == "lstm" and record.network["input_size"] == 96
    assert record.network["hidden_size"] == 32 and record.network["num_layers"] == 1
    assert record.num_classes == 10 and len(record.class_names) == 10 and record.class_names[0] == "grow"
    assert record.features.modality == "rgb" and record.features.backbone == "test_resnet"
    assert record.encoder is None
    stream = load_stream(run / "best.ckpt")
    scores = read_scores(run / "scores_test.npz")
    from pipeline.data.features import FeatureFolder

    folder = FeatureFolder(quick_demo["features"])
    for i in range(3):
        probs = stream.probabilities(stream.prepare(folder.load(str(scores["videos"][i]))))
        np.testing.assert_allclose(probs, scores["scores"][i], atol=1e-5)


SERVING_PROBE = r"""
import sys
from pipeline.cli import main
code = main(sys.argv[1:])
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'lightning_fabric',
                                                             'torchmetrics') or m.startswith('pipeline.training'))
print('EXIT', code)
print('LIGHTNING', ' '.join(bad) or '-')
"""


def test_serving_commands_import_no_lightning(quick_demo, tmp_path):
    """classify, classify --stream, export and visualize, each run for real in a fresh interpreter under
    `python -X importtime`: no Lightning (nor torchmetrics, nor the training package) is imported."""
    data, run = quick_demo["data"], quick_demo["run"]
    video = str(data / read_list(data / "test.txt")[0].path)
    ckpt = str(run / "best.ckpt")
    from pipeline.data.features import FeatureFolder

    features = FeatureFolder(quick_demo["features"]).feature_path(read_list(data / "test.txt")[0].path)
    commands = {
        "classify": ["classify", video, "--ckpt", ckpt, "--device", "cpu"],
        "stream": ["classify", "--stream", video, "--ckpt", ckpt, "--device", "cpu"],
        "export": ["export", "--ckpt", ckpt, "--format", "torchscript", "--out", str(tmp_path / "m.ts")],
        "visualize": ["visualize", "--ckpt", ckpt, "--video", video, "--out", str(tmp_path / "vis")],
        "visualize --features": ["visualize", "--ckpt", ckpt, "--features", str(features), "--out",
                                 str(tmp_path / "vis-features")],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for name, argv in commands.items():
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", SERVING_PROBE, *argv], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        lines = proc.stdout.splitlines()
        assert "EXIT 0" in lines, (name, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "LIGHTNING -" in lines, (name, [line for line in lines if line.startswith("LIGHTNING")])
        imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
        assert len(imported) > 100 and not [m for m in imported if "lightning" in m or "torchmetrics" in m]
