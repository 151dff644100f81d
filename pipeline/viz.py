"""Plots of evaluation results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def confusion_matrix(scores: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """int64 (C, C) counts, rows = true class, columns = top-1 prediction, from scores (N, C) and labels (N,);
    videos labelled -1 are left out."""
    num_classes = num_classes or scores.shape[1]
    keep = labels >= 0
    pred = scores[keep].argmax(1)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels[keep], pred), 1)
    return cm


def plot_confusion(
    cm: np.ndarray, path: str | os.PathLike, class_names: list[str] | None = None, title: str = ""
) -> Path:
    """Saves a row-normalised confusion matrix (C, C) as a PNG; class names on the axes up to 100 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_classes = cm.shape[0]
    support = cm.sum(1, keepdims=True)
    rates = np.divide(cm, support, out=np.zeros(cm.shape, dtype=np.float64), where=support > 0)  # per-class recall rows
    side = float(np.clip(0.25 * num_classes + 3, 4, 30))
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=100)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    names = class_names if class_names is not None and len(class_names) == num_classes else [str(i) for i in range(num_classes)]
    if num_classes <= 100:
        fontsize = 10 if num_classes <= 20 else 6
        ax.set_xticks(range(num_classes), names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(num_classes), names, fontsize=fontsize)
    if num_classes <= 20:
        for (i, j), count in np.ndenumerate(cm):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix ({int(cm.sum())} videos)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
