"""The order-blind baseline: high where the class lives in the bag of features, near chance where only order differs."""
import numpy as np
import pytest

from pipeline.evaluation.baseline import fit_linear, mean_features, order_blind_baseline


def _bag_features(root, num_classes=4, per_split=None, dim=8, seed=1):
    """A feature folder whose class is WHICH prototype vectors appear (each class its own pair), in a random
    order and random proportions: the mean over time tells the class."""
    from pipeline.data.features import FeatureFolder
    from pipeline.data.lists import ListEntry, write_classes, write_list

    per_split = per_split or {"train": 16, "test": 8}
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(num_classes, 2, dim))
    folder = FeatureFolder(root / "features")
    for split, count in per_split.items():
        entries = []
        for c in range(num_classes):
            for k in range(count):
                steps = rng.integers(0, 2, size=int(rng.integers(6, 12)))  # which of the class's two vectors
                feats = prototypes[c][steps] + 0.5 * rng.normal(size=(len(steps), dim))  # (T, D)
                video = f"c{c}/v_{split}_{k}.mp4"
                folder.write(video, feats.astype(np.float32))
                entries.append(ListEntry(video, c))
        write_list(root / "lists" / f"{split}.txt", entries)
    write_classes(root / "lists" / "classes.txt", [f"c{c}" for c in range(num_classes)])
    return root / "features", root / "lists"


def test_high_when_order_is_irrelevant(tmp_path):
    features, lists = _bag_features(tmp_path)
    result = order_blind_baseline(features, lists / "train.txt", lists / "test.txt")
    assert result["top1"] >= 0.9
    assert result["chance"] == 0.25 and result["num_classes"] == 4
    assert result["scores"].shape == (32, 4)
    np.testing.assert_allclose(result["scores"].sum(1), 1.0, rtol=1e-5)


def test_near_chance_when_only_order_differs(order_features):
    """The conftest dataset: every class is the same three vectors, only their order differs."""
    lists = order_features["lists"]
    result = order_blind_baseline(order_features["features"], lists / "train.txt", lists / "test.txt")
    assert result["chance"] == 0.25
    assert result["top1"] <= 0.5  # chance 0.25; 32 test videos


def test_mean_features_and_errors(order_features, tmp_path):
    lists = order_features["lists"]
    x, y, videos = mean_features(order_features["features"], lists / "test.txt")
    assert x.shape == (32, 8) and y.shape == (32,) and len(videos) == 32
    missing = tmp_path / "missing.txt"
    missing.write_text("not/there.mp4 0\n")
    with pytest.raises(FileNotFoundError, match="not/there"):
        mean_features(order_features["features"], missing)
    with pytest.raises(ValueError, match="no labelled video"):
        fit_linear(x, np.full(len(x), -1), 4)


def test_fit_linear_separates_a_linear_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    predict = fit_linear(x, y, 2)
    assert (predict(x).argmax(1) == y).mean() >= 0.95
