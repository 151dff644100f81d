"""The scores file (`scores_<stage>.npz`) and accuracy summaries: the one place they are written and read.

Imports neither Lightning nor the model, so that evaluation (`pipeline.training.module`), late fusion and plots share it.

    videos   unicode (N,)   list paths, in list order
    scores   float32 (N, C) class probabilities, averaged over views
    labels   int64 (N,)     the list's labels, -1 when unknown
    classes  unicode (C,)   class names (when known)

Fused scores (`eleatt fuse`) add `weights` float32 (K,) and `inputs` unicode (K,), one per fused file.

A scores file is untrusted input: `read_scores` checks the zip's members against their declared sizes (and every
array's header against its member) before reading, so memory stays within `4 x the file's size + 64 MB` whatever the
file claims, and refuses arrays of other types or shapes, non-finite scores and labels outside `-1 .. C - 1`, each
with one line naming the file and the fix.
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from pipeline.data.features import NPY_ERRORS, read_npy_header
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


SLACK_BYTES = 64 * 2**20  # what the arrays of a scores file may take beyond 4 x its size (compressed files)
_NPZ_ERRORS = (*NPY_ERRORS, zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, IndexError, NotImplementedError,
               RuntimeError, struct.error)


class ScoresFileError(UsageError):
    """A scores file that cannot be used: not an .npz, damaged, arrays of other types or shapes, NaN scores,
    labels outside the class range."""


def _check_members(zf: zipfile.ZipFile, path: Path) -> None:
    """Every member is an unencrypted .npy, stored or deflated, whose header's shape fits its declared size, and
    the declared sizes together stay within 4 x the file's size + SLACK_BYTES (a zip bomb fails before inflating)."""
    infos = zf.infolist()
    total = sum(info.file_size for info in infos)
    if total > 4 * path.stat().st_size + SLACK_BYTES:
        raise ScoresFileError(f"'{path}' declares {total} bytes of arrays in a {path.stat().st_size}-byte file "
                              "(a damaged file or a zip bomb); pass a scores file written by eleatt")
    for info in infos:
        if (info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                or not info.filename.endswith(".npy")):
            raise ScoresFileError(f"'{path}': member {info.filename[:60]!r} is not a stored or deflated .npy array")
        with zf.open(info) as f:
            shape, dtype = read_npy_header(f)
            if dtype.hasobject or int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
                raise ScoresFileError(f"'{path}': array {info.filename[:-4]!r} claims shape {shape} of {dtype}, more "
                                      "than its member holds (damaged)")


def _check_arrays(scores: dict[str, np.ndarray], path: Path) -> None:
    """Types and shapes of the arrays, finite scores and labels in range; ScoresFileError naming the first fault."""
    missing = [key for key in ("videos", "scores", "labels") if key not in scores]
    if missing:
        raise ScoresFileError(f"'{path}' is not a scores file: it lacks {', '.join(missing)} (a scores file holds "
                              "videos, scores, labels and classes)")
    videos, probs, labels = scores["videos"], scores["scores"], scores["labels"]
    classes = scores.get("classes")
    n = len(videos) if videos.ndim == 1 else -1
    problem = None
    if videos.ndim != 1 or videos.dtype.kind != "U":
        problem = f"videos is a {videos.dtype} array of shape {videos.shape}, not (N,) text"
    elif probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] < 1 or probs.dtype.kind != "f":
        problem = f"scores is a {probs.dtype} array of shape {probs.shape}, not ({n}, C) floats"
    elif labels.shape != (n,) or labels.dtype.kind not in "iu":
        problem = f"labels is a {labels.dtype} array of shape {labels.shape}, not ({n},) integers"
    elif classes is not None and (classes.shape != (probs.shape[1],) or classes.dtype.kind != "U"):
        problem = f"classes is a {classes.dtype} array of shape {classes.shape}, not ({probs.shape[1]},) names"
    if problem:
        raise ScoresFileError(f"'{path}': {problem}; pass a scores_<stage>.npz written by `eleatt test`/`validate`/"
                              "`predict` or `eleatt fuse`")
    step = chunk_rows(probs.shape[1])  # chunk by chunk: a bool copy of N x C scores would cost N x C bytes
    bad = sum(int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
              for chunk in (probs[i:i + step] for i in range(0, len(probs), step)))
    if bad:
        raise ScoresFileError(f"'{path}': {bad} of its {probs.shape[0]}x{probs.shape[1]} scores are NaN or infinite "
                              "(the model that wrote them diverged, or the file is damaged); score the videos again "
                              "with a checkpoint that gives finite scores")
    out = (labels < -1) | (labels >= probs.shape[1])
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ScoresFileError(f"'{path}': video {str(videos[i])[:80]!r} has label {int(labels[i])}, outside the "
                              f"{probs.shape[1]} classes (0..{probs.shape[1] - 1}, or -1 for unknown); "
                              f"{int(out.sum())} labels are out of range: score the list again with the classes.txt "
                              "the model was trained on")


def read_scores(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a scores file (never unpickles); `classes` is absent when the names were unknown.

    A file that is not a usable scores file (truncated, another format, keys missing, arrays of other types or
    shapes, non-finite scores, labels outside -1 .. C - 1) raises ScoresFileError (a ValueError) naming it; memory
    stays within 4 x the file's size + SLACK_BYTES."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"scores file '{path}' not found (`eleatt validate|test|predict` write "
                                "scores_<stage>.npz into the checkpoint's run folder)")
    try:
        with zipfile.ZipFile(path) as zf:
            _check_members(zf, path)
        with np.load(path, allow_pickle=False) as data:
            scores = {key: data[key] for key in data.files}
    except ScoresFileError:
        raise
    except _NPZ_ERRORS as err:
        raise ScoresFileError(f"'{path}' is not a readable scores file ({load_failure(err)}); pass a "
                              "scores_<stage>.npz written by `eleatt test`/`validate`/`predict` or `eleatt fuse`"
                              ) from None
    _check_arrays(scores, path)
    return scores


CHUNK_VALUES = 1 << 21  # scores looked at a time (videos x classes): the temporaries stay a few MB at any N


def chunk_rows(num_classes: int, rows: int | None = None, values: int | None = None) -> int:
    """Videos handled at a time: `rows` when given (tests set small ones), else what keeps a chunk near `values`
    scores (default CHUNK_VALUES), so that scoring or fusing N videos costs memory independent of N."""
    return max(1, int(rows)) if rows else max(1, (values or CHUNK_VALUES) // max(1, int(num_classes)))


def label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's position (0 = first) of its label in the order `np.argsort(-scores, kind="stable")` gives, without
    sorting: the classes scored higher, plus the classes scored the same with a lower index (a stable sort keeps
    them first); NaN sorts after every number. scores (n, C), labels (n,) in 0..C-1 -> int64 (n,). O(n C)."""
    n, num_classes = scores.shape
    columns = np.arange(num_classes)
    own = scores[np.arange(n), labels][:, None]  # (n, 1)
    ranks = np.count_nonzero(scores > own, axis=1).astype(np.int64)
    tied = scores == own
    several = np.flatnonzero(np.count_nonzero(tied, axis=1) > 1)
    if several.size:
        ranks[several] += np.count_nonzero(tied[several] & (columns < labels[several, None]), axis=1)
    nan = np.flatnonzero(np.isnan(own[:, 0]))
    if nan.size:  # a NaN label score: after every number, and after the NaNs of lower classes
        isnan = np.isnan(scores[nan])
        ranks[nan] = (np.count_nonzero(~isnan, axis=1)
                      + np.count_nonzero(isnan & (columns < labels[nan, None]), axis=1))
    return ranks


def accuracy_summary(scores: np.ndarray, labels: np.ndarray, topk: int = 5,
                     rows: int | None = None) -> dict[str, float] | None:
    """top1, top<k> (k = min(topk, C)) and mca (mean per-class recall over classes with labelled videos) from
    scores (N, C) and labels (N,) (-1 ignored); None when no video is labelled.

    Ties go as a stable sort of the scores, descending, orders them (the lower class first); computed `rows` videos
    at a time by counting (`label_ranks`), never sorting nor copying the N x C scores: memory independent of N."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
        return None
    num_classes = scores.shape[1]
    k = min(topk, num_classes)
    step = chunk_rows(num_classes, rows)
    top1_hits, topk_hits = 0, 0
    per_class = np.zeros(0)
    for start in range(0, len(labels), step):
        y = labels[start:start + step]
        chunk = np.flatnonzero(y >= 0)
        if not chunk.size:
            continue
        y = y[chunk]
        ranks = np.full(len(y), num_classes, dtype=np.int64)  # a label past the classes is never ranked
        inside = y < num_classes
        ranks[inside] = label_ranks(np.asarray(scores[start:start + step])[chunk[inside]], y[inside])
        top1 = ranks == 0
        top1_hits += int(top1.sum())
        topk_hits += int((ranks < k).sum())
        hits = np.bincount(y, weights=top1)
        per_class = np.pad(per_class, (0, max(0, len(hits) - len(per_class))))
        per_class[:len(hits)] += hits
    counts = np.bincount(labels[keep])
    present = counts > 0
    recalls = per_class[:len(counts)][present] / counts[present]
    total = int(keep.sum())
    return {"top1": top1_hits / total, f"top{k}": topk_hits / total, "mca": float(np.mean(recalls))}
