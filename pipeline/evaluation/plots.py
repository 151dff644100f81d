"""Plots of evaluation results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.paths import atomic_write
from pipeline.errors import InputNotFoundError, UsageError


def confusion_matrix(scores: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """int64 (C, C) counts, rows = true class, columns = top-1 prediction, from scores (N, C) and labels (N,);
    videos labelled -1 are left out."""
    num_classes = num_classes or scores.shape[1]
    keep = labels >= 0
    pred = scores.argmax(1)[keep]  # no copy of the N x C scores (a fused 1M x 400 file is 1.6 GB)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels[keep], pred), 1)
    return cm


def plot_confusion(
    cm: np.ndarray, path: str | os.PathLike, class_names: list[str] | None = None, title: str = ""
) -> Path:
    """Saves a row-normalised confusion matrix (C, C) as a PNG; class names on the axes up to 100 classes."""
    plt = pyplot()
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
    return save_figure(fig, path)


# -- training curves ------------------------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """The per-epoch values of a run's `metrics.csv` (Lightning's CSVLogger): {metric: {epoch: value}}.

    `path` is the csv file or the run folder that holds it. Lightning writes step rows and epoch rows with blanks
    in between; each metric keeps the last value logged in an epoch. `train/loss` is the epoch mean
    (`train/loss_epoch`) when logged, else the last step value.
    """
    import csv

    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.is_file():
        raise InputNotFoundError(f"metrics file '{path}' not found: a run folder of `eleatt fit` holds metrics.csv "
                                "(written by its CSV logger)")
    values: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(float(row.get("epoch") or ""))
            except ValueError:
                continue
            for key, text in row.items():
                if key in ("epoch", "step") or key is None or text in (None, ""):
                    continue
                values.setdefault(key, {})[epoch] = float(text)
    for name in list(values):
        base = name[: -len("_epoch")] if name.endswith("_epoch") else None
        if base is not None:
            values[base] = values.pop(name)  # epoch mean wins over step values
            values.pop(base + "_step", None)
    for name in [n for n in values if n.endswith("_step")]:
        values.setdefault(name[: -len("_step")], values.pop(name))
    return values


def plot_curves(
    runs: "dict[str, str | os.PathLike | dict]", path: str | os.PathLike, title: str = "training curves"
) -> Path:
    """Training curves of one or several runs (e.g. the streams of a two-stream model) on one figure: loss per
    epoch (train solid, validation dashed) and validation top-1 per epoch, one colour per run.

    runs: {label: run folder, metrics.csv path, or the dict `read_metrics` returns}.
    """
    plt = pyplot()
    if not runs:
        raise UsageError("plot_curves needs at least one run")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, source) in enumerate(runs.items()):
        metrics = source if isinstance(source, dict) else read_metrics(source)
        colour = colours[i % len(colours)]
        for key, style, what in (("train/loss", "-", "train"), ("val/loss", "--", "val")):
            series = metrics.get(key)
            if series:
                epochs = sorted(series)
                ax_loss.plot([e + 1 for e in epochs], [series[e] for e in epochs], style, color=colour,
                             label=f"{label} {what}", marker="." if len(epochs) < 30 else None)
        series = metrics.get("val/top1")
        if series:
            epochs = sorted(series)
            ax_acc.plot([e + 1 for e in epochs], [series[e] for e in epochs], "-", color=colour, label=label,
                        marker="." if len(epochs) < 30 else None)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss (solid: train, dashed: validation)")
    ax_acc.set(xlabel="epoch", ylabel="validation top-1 accuracy", title="validation top-1", ylim=(-0.02, 1.02))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Saves and closes a figure; the image is written whole or not at all (format from the suffix, PNG by default)."""
    plt = pyplot()
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=path.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)
    return path


# -- attention and probabilities over time -------------------------------------------------------------------------
def plot_attention(
    gates: "list[np.ndarray]",
    path: str | os.PathLike,
    titles: list[str] | None = None,
    frames: "list[np.ndarray | None] | None" = None,
    layer: int = 1,
    max_elements: int = 64,
) -> Path:
    """The attention picture (in the spirit of the EleAtt paper's Fig. 3): for each video one row with a few of
    its frames and a heat map of the gate values of one layer, elements x steps.

    gates: per video float (T, D) gate values in [0, 1] (`EleAttLSTM(..., return_attention=True)`).
    frames: per video None or uint8 (K, H, W, 3) frames shown left of the heat map, in time order.
    max_elements: at most this many elements (rows) are drawn: the ones whose gate varies most over time over all
        the videos (the same rows for every video, so the rows compare), in element order; all when D is smaller.
    """
    plt = pyplot()
    if not gates:
        raise UsageError("plot_attention needs the gates of at least one video")
    dims = {g.shape[1] for g in gates}
    if len(dims) != 1:
        raise UsageError(f"the videos' gates have different element counts {sorted(dims)}; pass one layer's gates")
    rows = select_elements(gates, max_elements)
    frames = frames or [None] * len(gates)
    num_frames = max((0 if f is None else len(f)) for f in frames)
    n = len(gates)
    width_ratios = [1] * num_frames + [max(4, num_frames * 1.5)]
    fig, axes = plt.subplots(n, num_frames + 1, figsize=(2.0 + 1.4 * num_frames + 6, 0.6 + 2.3 * n), dpi=100,
                             squeeze=False, gridspec_kw={"width_ratios": width_ratios}, layout="constrained")
    image = None
    for i, g in enumerate(gates):
        video_frames = frames[i]
        for j in range(num_frames):
            ax = axes[i, j]
            ax.axis("off")
            if video_frames is not None and j < len(video_frames):
                ax.imshow(video_frames[j])
                if i == 0:
                    ax.set_title(f"frame {j + 1}", fontsize=8)
        ax = axes[i, -1]
        shown = np.asarray(g, dtype=np.float32)[:, rows].T  # (elements, T)
        image = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                          extent=(0.5, shown.shape[1] + 0.5, len(rows) - 0.5, -0.5))
        ax.set_title(titles[i] if titles else f"video {i + 1}", fontsize=9)
        ax.set_ylabel(f"input element\n({len(rows)} most varying of {g.shape[1]})" if len(rows) < g.shape[1]
                      else "input element", fontsize=8)
        if i == n - 1:
            ax.set_xlabel("time step")
    fig.suptitle(f"element-wise attention: gate values of layer {layer} over time (0 = suppressed, 1 = kept)")
    fig.colorbar(image, ax=axes[:, -1].tolist(), fraction=0.03, pad=0.01, label="gate value a_t")
    return save_figure(fig, path)


def select_elements(gates: "list[np.ndarray]", max_elements: int) -> np.ndarray:
    """Indices (in element order) of the at most `max_elements` elements whose gate values vary most over time,
    pooled over the videos' gates (T_i, D)."""
    dim = gates[0].shape[1]
    if dim <= max_elements:
        return np.arange(dim)
    spread = np.mean([np.asarray(g, dtype=np.float64).std(0) for g in gates], axis=0)  # (D,)
    return np.sort(np.argsort(-spread, kind="stable")[:max_elements])


def plot_probabilities(
    probs: np.ndarray,
    path: str | os.PathLike,
    class_names: list[str] | None = None,
    true_label: int | None = None,
    title: str = "",
    max_classes: int = 6,
) -> Path:
    """Class probabilities over time for one video: probs (T, C), row t = the prediction after the first t + 1
    steps. Draws the `max_classes` classes with the highest probability at any step (and the true class)."""
    plt = pyplot()
    probs = np.asarray(probs, dtype=np.float64)
    steps, num_classes = probs.shape
    names = class_names if class_names is not None and len(class_names) == num_classes else [
        f"class {c}" for c in range(num_classes)]
    shown = list(np.argsort(-probs.max(0), kind="stable")[:max_classes])
    if true_label is not None and 0 <= true_label < num_classes and true_label not in shown:
        shown.append(true_label)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    x = np.arange(1, steps + 1)
    for c in shown:
        is_true = true_label is not None and c == true_label
        ax.plot(x, probs[:, c], linewidth=2.5 if is_true else 1.2, marker="." if steps <= 40 else None,
                label=names[c] + (" (true)" if is_true else ""))
    ax.axhline(1.0 / num_classes, color="grey", linestyle=":", linewidth=1, label=f"chance (1/{num_classes})")
    ax.set(xlabel="steps seen (prediction after the first t steps)", ylabel="class probability", ylim=(-0.02, 1.02),
           xlim=(0.5, steps + 0.5))
    ax.set_title(title or "class probabilities over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return save_figure(fig, path)
