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


# -- test features are standardised with the TRAINING statistics --------------------------------------------------
# One feature dimension. Train: class 0 at 0, 1, 2, 3 and class 1 at 10, 11, 12, 13 (mean 6.5, std 5.12), so the
# boundary lies between 3 and 10 in raw units. Standardising test features with their own statistics instead would
# move it to the middle of whatever is tested: 11 and 12 together would split into one class each, and a video
# scored alone would become all zeros (the same prediction for every video).
TRAIN_X = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [12.0], [13.0]])
TRAIN_Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_fit_linear_scores_new_features_with_the_training_statistics():
    predict = fit_linear(TRAIN_X, TRAIN_Y, 2)
    assert predict(np.array([[11.0], [12.0]])).argmax(1).tolist() == [1, 1]  # both right of the boundary
    assert predict(np.array([[1.0], [2.0]])).argmax(1).tolist() == [0, 0]
    assert predict(np.array([[1.0]])).argmax(1).tolist() == [0]  # one video at a time
    assert predict(np.array([[12.0]])).argmax(1).tolist() == [1]
    assert predict(np.array([[-20.0], [1.0], [12.0], [40.0]])).argmax(1).tolist() == [0, 0, 1, 1]
    # a video's scores do not depend on the other videos scored with it
    together = predict(np.array([[1.0], [12.0], [40.0]]))
    np.testing.assert_allclose(together[1], predict(np.array([[12.0]]))[0], rtol=1e-6)
    # shifting every test feature by +9 moves 1, 2 (class 0) across the boundary to 10, 11 (class 1)
    assert predict(np.array([[1.0], [2.0]]) + 9.0).argmax(1).tolist() == [1, 1]


def _one_dim_features(root, test_values: dict[str, list[float]]):
    """A feature folder of 1-D features (each video 3 steps v - 1, v, v + 1: mean v) for the train videos above and
    the given test lists {name: [value, ...]} (labels: 0 below 6.5, else 1). Returns (features, lists)."""
    from pipeline.data.features import FeatureFolder
    from pipeline.data.lists import ListEntry, write_classes, write_list

    folder = FeatureFolder(root / "features")

    def entries(split, values):
        out = []
        for k, v in enumerate(values):
            video = f"{split}/v{k}.mp4"
            folder.write(video, np.array([[v - 1.0], [v], [v + 1.0]], np.float32))
            out.append(ListEntry(video, int(v > 6.5)))
        write_list(root / "lists" / f"{split}.txt", out)

    entries("train", TRAIN_X[:, 0].tolist())
    for name, values in test_values.items():
        entries(name, values)
    write_classes(root / "lists" / "classes.txt", ["low", "high"])
    return root / "features", root / "lists"


def test_order_blind_baseline_standardises_the_test_list_with_train_statistics(tmp_path):
    features, lists = _one_dim_features(tmp_path, {"pair": [11.0, 12.0], "low": [1.0], "high": [12.0]})
    x, y, _ = mean_features(features, lists / "pair.txt")
    assert x.tolist() == [[11.0], [12.0]] and y.tolist() == [1, 1]
    result = order_blind_baseline(features, lists / "train.txt", lists / "pair.txt")
    assert result["scores"].argmax(1).tolist() == [1, 1] and result["top1"] == 1.0 and result["mca"] == 1.0
    # single-video test lists: both right (with a one-video statistic, both would get the same class)
    for name, label in (("low", 0), ("high", 1)):
        result = order_blind_baseline(features, lists / "train.txt", lists / f"{name}.txt")
        assert result["scores"].argmax(1).tolist() == [label] and result["top1"] == 1.0, name
