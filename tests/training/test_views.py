"""`fit`/`test` on features with several spatial views: scores are the views' probabilities averaged.

Every other integration test uses one view, where "average the views" and "take the first view" agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_order_features
from pipeline.data.features import FeatureFolder
from pipeline.training.module import load_classifier
from pipeline.training.cli import main
from pipeline.evaluation.scores import read_scores

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


@pytest.mark.parametrize("views", [3, 10])
def test_test_scores_average_the_views_probabilities(views, tmp_path):
    data = make_order_features(tmp_path / "data", videos={"train": 6, "val": 2, "test": 3}, views=views)
    lists = data["lists"]
    args = ["--config", TINY, "--data.features_dir", str(data["features"]), "--data.train_list",
            str(lists / "train.txt"), "--data.val_list", str(lists / "val.txt"), "--data.test_list",
            str(lists / "test.txt"), "--data.num_steps", "0"]
    assert main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path),
                 "--run_name", "views"]) == 0
    ckpt = tmp_path / "views" / "last.ckpt"
    assert main(["test", *args, "--ckpt_path", str(ckpt)]) == 0
    scores = read_scores(tmp_path / "views" / "scores_test.npz")
    assert len(scores["videos"]) == 4 * 3

    model = load_classifier(ckpt)
    folder = FeatureFolder(data["features"])
    spread = 0.0
    for video, got in zip(scores["videos"], scores["scores"]):
        feats = torch.from_numpy(folder.load(str(video)).astype(np.float32))  # (V, T, D)
        assert feats.shape[0] == views
        with torch.no_grad():
            per_view = torch.stack([model(feats[v][None]).softmax(-1)[0] for v in range(views)])  # (V, C)
        np.testing.assert_allclose(got, per_view.mean(0).numpy(), atol=1e-5)
        spread = max(spread, float((per_view - per_view.mean(0)).abs().max()))
    assert spread > 1e-3  # the views disagree, so the first view alone would not pass
