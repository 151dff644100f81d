"""The scores file (`scores_<stage>.npz`) and accuracy summaries: the one place they are written and read.

Imports neither Lightning nor the model, so that evaluation (`pipeline.training.module`), late fusion and plots share it.

    videos   unicode (N,)   list paths, in list order
    scores   float32 (N, C) class probabilities, averaged over views
    labels   int64 (N,)     the list's labels, -1 when unknown
    classes  unicode (C,)   class names (when known)

Fused scores (`eleatt fuse`) add `weights` float32 (K,) and `inputs` unicode (K,), one per fused file.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import InputNotFoundError, load_failure, UsageError
from pipeline.paths import atomic_write


def write_scores(
    path: str | os.PathLike, videos: list[str], scores: np.ndarray, labels: np.ndarray, classes: list[str] | None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Writes a scores file atomically: videos (N,) unicode, scores (N, C) float32, labels (N,) int64, classes,
    plus `extra` arrays (e.g. the fused file's `weights` and `inputs`; numeric or unicode, never objects)."""
    path = Path(path)
    arrays = {
        "videos": np.array(videos, dtype=np.str_),
        "scores": np.asarray(scores, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
    }
    if classes is not None:
        arrays["classes"] = np.array(classes, dtype=np.str_)
    for key, value in (extra or {}).items():
        if key in arrays:
            raise UsageError(f"extra array {key!r} would overwrite the scores file's own {key!r}")
        value = np.asarray(value)
        if value.dtype == object:
            raise UsageError(f"extra array {key!r} has dtype object; a scores file is read without unpickling")
        arrays[key] = value
    with atomic_write(path, "wb") as f:  # whole or not at all, with the umask's permissions; makes the folder
        np.savez(f, **arrays)
    return path


def read_scores(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a scores file (never unpickles); `classes` is absent when the names were unknown.

    A file that is not a scores file (truncated, another format, keys missing) raises ValueError naming it."""
    if not Path(path).is_file():
        raise InputNotFoundError(f"scores file '{path}' not found (`eleatt validate|test|predict` write "
                                "scores_<stage>.npz into the checkpoint's run folder)")
    try:
        with np.load(path, allow_pickle=False) as data:
            scores = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"'{path}' is not a readable scores file ({load_failure(err)}); pass a "
                         "scores_<stage>.npz written by `eleatt test`/`validate`/`predict` or `eleatt fuse`") from None
    missing = [key for key in ("videos", "scores", "labels") if key not in scores]
    if missing:
        raise UsageError(f"'{path}' is not a scores file: it lacks {', '.join(missing)} (a scores file holds videos, "
                         "scores, labels and classes)")
    return scores


def accuracy_summary(scores: np.ndarray, labels: np.ndarray, topk: int = 5) -> dict[str, float] | None:
    """top1, top<k> (k = min(topk, C)) and mca (mean per-class recall over classes with labelled videos) from
    scores (N, C) and labels (N,) (-1 ignored); None when no video is labelled."""
    keep = labels >= 0
    if not keep.any():
        return None
    scores, labels = scores[keep], labels[keep]
    k = min(topk, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    topk_hit = (order[:, :k] == labels[:, None]).any(1)
    recalls = [top1[labels == c].mean() for c in np.unique(labels)]
    return {"top1": float(top1.mean()), f"top{k}": float(topk_hit.mean()), "mca": float(np.mean(recalls))}
