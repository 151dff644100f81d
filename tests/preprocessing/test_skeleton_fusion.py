"""Four skeleton streams (joint, bone, joint motion, bone motion) of one generated set, one EleAtt-GRU each, fused
by `eleatt fuse`: with pyskl's fixed 2:2:1:1 and with weights searched on validation, the fusion beats the best
single stream on the test set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.benchmarks.skeleton import INFORMATIVE, generated_skeletons, predict_probs, train_classifier
from pipeline.data.skeleton import STREAMS, derive_stream
from pipeline.evaluation.fusion import main as fuse
from pipeline.evaluation.scores import read_scores, write_scores
from pipeline.nn.classifier import SequenceClassifier

CLASSES = 6
SPLITS = {"train": slice(0, 400), "val": slice(400, 550), "test": slice(550, 850)}


@pytest.fixture(scope="module")
def stream_scores(tmp_path_factory):
    """scores_{val,test}.npz of one small EleAtt-GRU per stream, trained on that stream of the same sequences."""
    root = tmp_path_factory.mktemp("streams")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: far faster on one thread on a loaded machine
    try:
        # the class is the direction of a steady 12 cm walk of 3 joints among 25 that all walk; 3 cm of noise per
        # frame, 6 cm per sample (a different pose: it hides the walk in the joints more than in their motion)
        feats, labels = generated_skeletons(850, CLASSES, steps=12, informative=INFORMATIVE[:3], pattern="drift",
                                            amplitude=0.12, jitter=0.03, pose=0.06, seed=SEED)
        videos = np.array([f"s{i:03d}" for i in range(len(labels))])
        classes = [f"direction {c}" for c in range(CLASSES)]
        for stream in STREAMS:
            x = np.stack([derive_stream(f, stream) for f in feats])
            torch.manual_seed(SEED)
            model = SequenceClassifier(x.shape[-1], CLASSES, cell="gru", hidden_size=16, dropout=0.0)
            train_classifier(model, x[SPLITS["train"]], labels[SPLITS["train"]], epochs=15, batch_size=64, lr=1e-2,
                             seed=SEED)
            for split in ("val", "test"):
                part = SPLITS[split]
                write_scores(root / stream / f"scores_{split}.npz", list(videos[part]), predict_probs(model, x[part]),
                             labels[part], classes)
    finally:
        torch.set_num_threads(threads)
    return root


SEED = 3


def top1(path) -> float:
    scores = read_scores(path)
    return float((scores["scores"].argmax(1) == scores["labels"]).mean())


def test_four_fused_skeleton_streams_beat_the_best_single_stream(stream_scores, capsys):
    root = stream_scores
    single = {s: top1(root / s / "scores_test.npz") for s in STREAMS}
    assert min(single.values()) > 0.3 and max(single.values()) < 0.97  # each learned something, none is perfect
    tests = [str(root / s / "scores_test.npz") for s in STREAMS]
    assert fuse(["--scores", *tests, "--weights", "2", "2", "1", "1", "--out", str(root / "fixed.npz"),
                 "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "fused 300 videos from 4 files (mode prob, weights 2 : 2 : 1 : 1)" in out
    fixed = top1(root / "fixed.npz")
    assert fixed >= max(single.values()) + 0.03, (fixed, single)

    vals = [str(root / s / "scores_val.npz") for s in STREAMS]
    assert fuse(["--scores", *tests, "--search-weights", *vals, "--out", str(root / "searched.npz"),
                 "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "(150 labelled videos, 2197 weightings tried)" in out  # 13 ** 3: the first stream's weight is 1
    searched = top1(root / "searched.npz")
    assert searched > max(single.values()), (searched, single)
    assert read_scores(root / "searched.npz")["weights"][0] == 1.0


def test_six_streams_are_searched_on_a_coarser_grid(stream_scores, capsys):
    # 13 ** 5 weightings would be too many: every other grid value goes, 7 ** 5 are tried
    root = stream_scores
    names = STREAMS + ("joint", "bone")
    tests = [str(root / s / "scores_test.npz") for s in names]
    vals = [str(root / s / "scores_val.npz") for s in names]
    assert fuse(["--scores", *tests, "--search-weights", *vals, "--out", str(root / "six.npz"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "16807 weightings tried, each over 0..3 step 0.5" in out
    assert set(read_scores(root / "six.npz")["weights"].tolist()) <= {0, 0.5, 1, 1.5, 2, 2.5, 3}
