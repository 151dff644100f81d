"""The order-blind baseline: a linear classifier on the mean over time of a video's frame features.

It sees the same bag of frames whatever their order, so on a dataset whose classes differ only in temporal order
it stays near what appearance alone gives; the gap to a recurrent model measures what the model learnt about time.
"""
from __future__ import annotations

import os

import numpy as np

from pipeline.data.features import FeatureFolder, as_views
from pipeline.data.lists import classes_path_for, read_classes, read_list
from pipeline.evaluation.scores import accuracy_summary
from pipeline.errors import UsageError


def mean_features(features_dir: str | os.PathLike, list_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The mean over views and steps of each listed video's stored features: float32 (N, D), labels int64 (N,),
    and the list paths. A video without features raises FileNotFoundError naming it (run `eleatt extract`)."""
    folder = FeatureFolder(features_dir)
    entries = read_list(list_path)
    if not entries:
        raise UsageError(f"list '{list_path}' has no videos")
    means = [as_views(folder.load(e.path)).astype(np.float64).mean(axis=(0, 1)) for e in entries]  # (D,) each
    return (np.stack(means).astype(np.float32), np.array([e.label for e in entries], dtype=np.int64),
            [e.path for e in entries])


def fit_linear(x: np.ndarray, y: np.ndarray, num_classes: int, steps: int = 300, lr: float = 0.1,
               weight_decay: float = 1e-3, seed: int = 0):
    """Multinomial logistic regression on standardised x (N, D), labels y (N,) (-1 ignored), full-batch Adam.
    Returns predict(x (M, D)) -> class probabilities (M, C) float32.

    In numpy on purpose: these are a few hundred tiny steps, which torch's thread pool makes hundreds of times
    slower on a busy 2-core machine."""
    keep = y >= 0
    if not keep.any():
        raise UsageError("the training list has no labelled video; the baseline needs labels")
    x = np.asarray(x, dtype=np.float64)[keep]  # (N, D)
    y = np.asarray(y, dtype=np.int64)[keep]  # (N,)
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)  # statistics of the training set only
    z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)  # (N, D + 1): the bias as a column
    onehot = np.eye(num_classes)[y]  # (N, C)
    rng = np.random.default_rng(seed)
    weight = 0.01 * rng.standard_normal((z.shape[1], num_classes))  # (D + 1, C)
    m, v = np.zeros_like(weight), np.zeros_like(weight)
    decay = np.ones_like(weight)
    decay[-1] = 0.0  # no weight decay on the bias
    for step in range(1, steps + 1):
        logits = z @ weight  # (N, C)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = z.T @ (p - onehot) / len(z) + 2 * weight_decay * decay * weight  # (D + 1, C)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        weight -= lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)

    def predict(x_new: np.ndarray) -> np.ndarray:
        z_new = (np.asarray(x_new, dtype=np.float64) - mean) / std  # (M, D)
        logits = z_new @ weight[:-1] + weight[-1]  # (M, C)
        p_new = np.exp(logits - logits.max(1, keepdims=True))
        return (p_new / p_new.sum(1, keepdims=True)).astype(np.float32)

    return predict


def order_blind_baseline(features_dir: str | os.PathLike, train_list: str | os.PathLike,
                         test_list: str | os.PathLike, num_classes: int | None = None, steps: int = 300,
                         seed: int = 0) -> dict:
    """Trains the order-blind linear classifier on the train list's mean features and scores the test list.

    Returns {"top1", "top<k>", "mca"} (pipeline.evaluation.scores.accuracy_summary on the test list), plus "chance"
    (1 / C), "scores" (N, C), "labels" (N,), "videos" and "num_classes"."""
    x_train, y_train, _ = mean_features(features_dir, train_list)
    x_test, y_test, videos = mean_features(features_dir, test_list)
    if x_train.shape[1] != x_test.shape[1]:
        raise UsageError(f"train features have {x_train.shape[1]} dimensions, test features {x_test.shape[1]}")
    if num_classes is None:
        classes = classes_path_for(train_list)
        known = read_classes(classes) if classes.is_file() else []
        num_classes = max(len(known), int(max(y_train.max(), y_test.max())) + 1)
    predict = fit_linear(x_train, y_train, num_classes, steps=steps, seed=seed)
    scores = predict(x_test)
    summary = accuracy_summary(scores, y_test)
    if summary is None:
        raise UsageError(f"test list '{test_list}' has no labelled video; the baseline needs labels to score")
    return {**summary, "chance": 1.0 / num_classes, "scores": scores, "labels": y_test, "videos": videos,
            "num_classes": num_classes}
