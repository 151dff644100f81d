"""Late fusion of scores files (two-stream RGB + flow, or any streams): `eleatt fuse` and `fuse_scores`.

Files are aligned by video name, their class lists must agree, class probabilities are fused by a weighted mean
(`prob`, TSN's 1 : 1.5 for two streams) or a weighted mean of log-probabilities turned back into probabilities
(`logit`), and weights can be searched on validation scores (never on the scores being fused).
Imports neither Lightning nor the model: only scores files and numpy (and viz for the confusion matrix).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import EXIT_OK, EXIT_SOME_FAILED, UsageError
from pipeline.paths import check_not_input, ensure_writable_file
from pipeline.evaluation.scores import accuracy_summary, chunk_rows, read_scores, write_scores

MODES = ("prob", "logit")
TSN_WEIGHTS = (1.0, 1.5)  # RGB : flow, the two-stream default of TSN
SEARCH_GRID = tuple(np.arange(0, 3.0 + 1e-9, 0.25).round(2).tolist())  # weights of the later streams, first = 1
MAX_SEARCH = 50_000  # weightings tried at most (13 ** (K - 1) grows fast with the number of streams)
EPS = 1e-12  # floor of a probability before its log: float32 softmax outputs can round to 0
SHOWN = 5  # names listed per missing-videos report
FEW_VALIDATION = 30  # a weight search on fewer labelled validation videos than this is mostly chance: said so
# Scores fused at a time: float64 temporaries of 256 KB stay in the CPU's caches (measured 2-3x faster than 16 MB
# chunks on 200k x 400 scores, where fresh large temporaries cost page faults and memory bandwidth).
FUSE_VALUES = 1 << 15


def default_weights(count: int) -> list[float]:
    """TSN's 1 : 1.5 for two streams (RGB, flow), equal weights otherwise."""
    return list(TSN_WEIGHTS) if count == 2 else [1.0] * count


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """One finite, non-negative weight per stream, not all zero; raises ValueError naming the fix."""
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise UsageError(f"{len(weights)} weights given for {count} streams: give one weight per scores file "
                         "or checkpoint, in the same order")
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(f"weights {weights}: each must be a finite number >= 0, and at least one > 0")
    return weights


def _terms(arrays: Sequence[np.ndarray], mode: str) -> list[np.ndarray]:
    """Each stream's summand in float64: its probabilities (prob) or their logs (logit)."""
    if mode == "prob":
        return [np.asarray(a, dtype=np.float64) for a in arrays]
    return [np.log(np.clip(np.asarray(a, dtype=np.float64), EPS, None)) for a in arrays]


def _combine(terms: Sequence[np.ndarray], w: np.ndarray, mode: str) -> np.ndarray:
    """The fused rows (n, C) float32 from `_terms` and normalised weights (K,): the weighted sum in stream order
    (what a sum over the first axis of the stacked terms adds, so the values are those of a whole-array fusion),
    softmaxed in logit mode."""
    acc = w[0] * terms[0]
    for wk, term in zip(w[1:], terms[1:]):
        acc += wk * term
    if mode == "logit":
        acc -= acc.max(-1, keepdims=True)
        np.exp(acc, out=acc)
        acc /= acc.sum(-1, keepdims=True)
    return acc.astype(np.float32)


def fuse_probs(probs: Sequence[np.ndarray], weights: Sequence[float], mode: str = "prob",
               rows: int | None = None) -> np.ndarray:
    """Fuses K aligned probability arrays (N, C) (or (C,)) into one of the same shape, float32.

    prob:  sum_k w_k p_k / sum_k w_k (a weighted mean of class probabilities);
    logit: softmax(sum_k w_k log p_k / sum_k w_k) (a weighted geometric mean, renormalised).

    Chunked over videos (`rows` at a time, default FUSE_VALUES scores' worth): the inputs are read where they are
    (float32 scores are never copied whole), the arithmetic is float64 on one chunk at a time (bounded memory, and
    the same values as a float64 computation over the whole array: float32 sums would round differently for no
    saving), the result float32 as stored in a scores file. Memory: the output plus a few chunk-sized temporaries.
    """
    if mode not in MODES:
        raise UsageError(f"fusion mode {mode!r}: expected one of {', '.join(MODES)}")
    w = np.asarray(check_weights(weights, len(probs)), dtype=np.float64)
    w = w / w.sum()
    arrays = [np.asarray(p) for p in probs]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim not in (1, 2):
        raise UsageError(f"fuse_probs needs K arrays of one shape (N, C) or (C,), got shapes "
                         f"{[a.shape for a in arrays]}; align the scores first (align_scores)")
    if arrays[0].ndim == 1:
        return _combine(_terms([a[None] for a in arrays], mode), w, mode)[0]
    out = np.empty(arrays[0].shape, dtype=np.float32)
    step = chunk_rows(out.shape[1], rows, FUSE_VALUES)
    for start in range(0, len(out), step):
        part = slice(start, start + step)
        out[part] = _combine(_terms([a[part] for a in arrays], mode), w, mode)
    return out


def _names(score_dicts: Sequence[dict], names: Sequence[str] | None) -> list[str]:
    return list(names) if names is not None else [f"input {i + 1}" for i in range(len(score_dicts))]


def _check_file(data: dict, name: str) -> None:
    for key in ("videos", "scores", "labels"):
        if key not in data:
            raise UsageError(f"{name}: not a scores file (no {key!r} array); fuse the scores_<stage>.npz files "
                             "written by `eleatt validate|test|predict`")
    n = len(data["videos"])
    if data["scores"].ndim != 2 or data["scores"].shape[0] != n or len(data["labels"]) != n:
        raise UsageError(f"{name}: inconsistent scores file ({n} videos, scores {data['scores'].shape}, "
                         f"{len(data['labels'])} labels)")


def check_classes(score_dicts: Sequence[dict], names: Sequence[str] | None = None) -> list[str] | None:
    """The class names the files share (None when no file records them); raises ValueError naming the first
    difference when two files disagree (different names, order or number of classes)."""
    names = _names(score_dicts, names)
    ref = None
    for data, name in zip(score_dicts, names):
        _check_file(data, name)
        if "classes" in data and ref is None:
            ref = (list(map(str, data["classes"])), name)
    for data, name in zip(score_dicts, names):
        num, first = data["scores"].shape[1], score_dicts[0]["scores"].shape[1]
        if ref is None and num != first:
            raise UsageError(f"{name} scores {num} classes but {names[0]} scores {first}: fuse files of models "
                             "trained on the same class list")
        if ref is None:
            continue
        mine = list(map(str, data["classes"])) if "classes" in data else None
        theirs, ref_name = ref
        if mine is None:
            if num != len(theirs):
                raise UsageError(f"{name} scores {num} classes but {ref_name} has {len(theirs)}: fuse files of "
                                 "models trained on the same class list")
            continue
        check_same_classes(theirs, mine, ref_name, name)
    return ref[0] if ref else None


def check_same_classes(first: Sequence[str], second: Sequence[str], first_name: str, second_name: str,
                       what: str = "files") -> None:
    """Raises ValueError naming the first difference between two class lists (names, order or number)."""
    first, second = list(map(str, first)), list(map(str, second))
    if first == second:
        return
    i = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    a = repr(first[i]) if i < len(first) else "(end of list)"
    b = repr(second[i]) if i < len(second) else "(end of list)"
    raise UsageError(f"class lists differ: class {i} is {a} in {first_name} but {b} in {second_name} "
                     f"({len(first)} vs {len(second)} classes); fuse {what} of models trained on the same "
                     "classes.txt")


def _keys(videos) -> list[tuple[str, int]]:
    """(video, occurrence): a list may name a video twice, and the k-th occurrences are matched to each other."""
    seen: dict[str, int] = {}
    keys = []
    for video in map(str, videos):
        keys.append((video, seen.get(video, 0)))
        seen[video] = seen.get(video, 0) + 1
    return keys


def _same_videos(score_dicts: Sequence[dict]) -> bool:
    """Whether every file lists the same videos in the same order (the usual case: each stream scored one list);
    compared as arrays, without a Python object per video."""
    first = np.asarray(score_dicts[0]["videos"])
    return all(np.asarray(d["videos"]).shape == first.shape and bool((np.asarray(d["videos"]) == first).all())
               for d in score_dicts[1:])


def align_scores(score_dicts: Sequence[dict], names: Sequence[str] | None = None
                 ) -> tuple[Sequence[str], list[np.ndarray], np.ndarray, dict[str, list[str]]]:
    """Aligns files by video name.

    Returns (videos, probs, labels, missing): the videos every file has (in the first file's order), each file's
    scores (N, C) in that order, the labels (N,) (-1 where no file knows it), and for each file that lacks some
    of the other files' videos, those videos. Raises ValueError when a video's labels disagree or no video is
    in every file. Files that list the same videos in the same order are not copied (`probs` are their float32
    arrays, `videos` the first file's array); a file in another order or with other videos is gathered (a copy).
    """
    names = _names(score_dicts, names)
    if _same_videos(score_dicts) and len(score_dicts[0]["videos"]):
        videos, missing = np.asarray(score_dicts[0]["videos"]), {}
        rows = [slice(None)] * len(score_dicts)
    else:
        keys = [_keys(d["videos"]) for d in score_dicts]
        index = [{k: i for i, k in enumerate(ks)} for ks in keys]
        union = list(dict.fromkeys(k for ks in keys for k in ks))
        missing = {name: [v for v, _ in (k for k in union if k not in idx)] for name, idx in zip(names, index)}
        missing = {name: videos for name, videos in missing.items() if videos}
        common = [k for k in keys[0] if all(k in idx for idx in index[1:])]
        if not common:
            raise UsageError(f"no video is in every file ({', '.join(names)}): fuse scores of the same list "
                             "(e.g. each stream's scores_test.npz)")
        videos = [v for v, _ in common]
        rows = [np.array([idx[k] for k in common]) for idx in index]
    probs = [np.asarray(d["scores"], dtype=np.float32)[r] for d, r in zip(score_dicts, rows)]  # a slice: no copy
    per_file = np.stack([np.asarray(d["labels"], dtype=np.int64)[r] for d, r in zip(score_dicts, rows)])  # (K, N)
    labels = per_file.max(0)
    clash = ((per_file >= 0) & (per_file != labels)).any(0)
    if clash.any():
        j = int(np.flatnonzero(clash)[0])
        said = ", ".join(f"{n}: {int(per_file[i, j])}" for i, n in enumerate(names))
        raise UsageError(f"video {str(videos[j])!r} has different labels in the files ({said}); fuse scores of the "
                         "same list")
    return videos, probs, labels, missing


def fuse_scores(score_dicts: Sequence[dict], weights: Sequence[float] | None = None, mode: str = "prob",
                names: Sequence[str] | None = None) -> dict:
    """Fuses scores dicts (`pipeline.evaluation.scores.read_scores`) of the same videos from different streams.

    Returns a scores dict over the videos common to all files: `videos`, `scores` (N, C) float32, `labels`,
    `classes` (when known), `weights` float32 (K,), `inputs` (K,), `missing` ({input name: videos it lacks},
    empty when every file has every video) and `streams` (each file's aligned scores (N, C), for per-stream
    accuracies). Raises ValueError for differing class lists.
    """
    if len(score_dicts) < 1:
        raise UsageError("nothing to fuse: give at least one scores file")
    names = _names(score_dicts, names)
    classes = check_classes(score_dicts, names)
    weights = check_weights(default_weights(len(score_dicts)) if weights is None else weights, len(score_dicts))
    videos, probs, labels, missing = align_scores(score_dicts, names)
    fused = {"videos": np.asarray(videos, dtype=np.str_), "scores": fuse_probs(probs, weights, mode), "labels": labels,
             "weights": np.array(weights, dtype=np.float32), "inputs": np.array(names, dtype=np.str_),
             "missing": missing, "streams": probs}
    if classes is not None:
        fused["classes"] = np.array(classes, dtype=np.str_)
    return fused


def _search_counts(probs: Sequence[np.ndarray], labels: np.ndarray, weightings: Sequence[Sequence[float]],
                   mode: str, names: Sequence[str], rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each weighting, what ranks it, accumulated chunk by chunk over the videos (never a stacked copy, never a
    full sort): the top-1 hits per class (W, C), the videos per class (C,) and the summed negative log-likelihood
    of the true class (W,), in float64. Each chunk's fused scores are the float32 values `fuse_probs` writes, and
    top-1 is their first largest class (a stable sort's first): finite inputs give finite fused scores, so
    `argmax` is exact; a non-finite input is refused, naming the file."""
    num_classes = probs[0].shape[1]
    norm = [np.asarray(w, dtype=np.float64) / sum(w) for w in weightings]
    hits = np.zeros((len(weightings), num_classes))
    nll = np.zeros(len(weightings))
    counts = np.zeros(num_classes, dtype=np.int64)
    step = chunk_rows(num_classes, rows, FUSE_VALUES)
    for start in range(0, len(labels), step):
        y = labels[start:start + step]
        keep = y >= 0
        if not keep.any():
            continue
        y = y[keep]
        parts = [p[start:start + step][keep] for p in probs]
        for part, name in zip(parts, names):
            if not np.isfinite(part).all():
                raise UsageError(f"{name}: its scores hold NaN or infinite values; score the videos again with a "
                                 "checkpoint that gives finite scores")
        terms = _terms(parts, mode)
        counts += np.bincount(y, minlength=num_classes)[:num_classes]
        picked = np.arange(len(y))
        for i, w in enumerate(norm):
            fused = _combine(terms, w, mode)
            hits[i] += np.bincount(y, weights=fused.argmax(1) == y, minlength=num_classes)[:num_classes]
            nll[i] -= np.log(np.clip(fused[picked, y], EPS, None)).sum(dtype=np.float64)
    return hits, counts, nll


def search_weights(val_dicts: Sequence[dict], mode: str = "prob", grid: Sequence[float] = SEARCH_GRID,
                   names: Sequence[str] | None = None, rows: int | None = None) -> dict:
    """Picks fusion weights on validation scores: the first stream's weight is 1, every later stream's runs over
    `grid` (default 0..3 step 0.25); the best top-1 wins, then mean class accuracy, then the lower negative
    log-likelihood of the true class, then the earlier weighting. Where the full grid would try more than
    MAX_SEARCH weightings (5 or more streams), every other grid value is dropped until it does not (0..3 step 0.5
    for 5 and 6 streams). The videos are read in chunks of `rows` (default `chunk_rows`), each weighting's counts
    accumulated per chunk: memory stays that of one chunk per weighting, whatever the number of videos.

    Returns {"weights", "top1", "mca", "videos" (labelled videos used), "tried", "grid" (the values searched),
    "missing" (as `align_scores`), "common" (videos in every file)}.
    """
    names = _names(val_dicts, names)
    if len(val_dicts) < 2:
        raise UsageError("a weight search needs the validation scores of two or more streams")
    if mode not in MODES:
        raise UsageError(f"fusion mode {mode!r}: expected one of {', '.join(MODES)}")
    grid = tuple(grid)
    while len(grid) ** (len(val_dicts) - 1) > MAX_SEARCH and len(grid) > 2:
        grid = grid[::2]
    tried = len(grid) ** (len(val_dicts) - 1)
    if tried > MAX_SEARCH:
        raise UsageError(f"a grid search over {len(val_dicts)} streams would try {tried} weightings; give --weights")
    check_classes(val_dicts, names)
    _, probs, labels, missing = align_scores(val_dicts, names)
    keep = labels >= 0
    labelled = int(keep.sum())
    if not labelled:
        raise UsageError(f"the validation scores ({', '.join(names)}) have no labelled video; the weight search "
                         "needs the scores of `eleatt validate` (labelled val list)")
    weightings = [[1.0, *map(float, rest)] for rest in itertools.product(grid, repeat=len(val_dicts) - 1)]
    for weights in weightings:
        check_weights(weights, len(val_dicts))
    hits, counts, nll = _search_counts(probs, labels, weightings, mode, names, rows)
    present = counts > 0
    best, best_rank = None, None
    for weights, row, loss in zip(weightings, hits, nll):
        # top-1 and mca as `accuracy_summary` computes them (exact counts over float64), then -mean NLL
        rank = (float(row.sum() / labelled), float(np.mean(row[present] / counts[present])), -float(loss / labelled))
        if best_rank is None or rank > best_rank:
            best, best_rank = weights, rank
    return {"weights": best, "top1": best_rank[0], "mca": best_rank[1], "videos": labelled, "tried": tried,
            "grid": grid, "missing": missing, "common": len(keep)}


def search_warnings(picked: dict, names: Sequence[str]) -> list[str]:
    """What a user must know about picked weights (`search_weights`' result): a stream the fusion now ignores
    (weight 0), and a pick made on too few labelled validation videos to mean much."""
    warnings = [f"the search gave {name} weight 0: the fused scores ignore that stream (on these validation videos "
                "it never helped); check it, or fix the weights with --weights"
                for name, weight in zip(names, picked["weights"]) if weight == 0]
    if picked["videos"] < FEW_VALIDATION:
        warnings.append(f"weights picked on only {picked['videos']} labelled validation videos (fewer than "
                        f"{FEW_VALIDATION}): the choice is mostly chance; prefer --weights "
                        f"{' '.join(f'{w:g}' for w in default_weights(len(names)))} or a larger validation list")
    return warnings


def _fmt_weights(weights: Sequence[float]) -> str:
    return " : ".join(f"{w:g}" for w in weights)


def _report_missing(missing: dict[str, list[str]], common: int, what: str = "videos") -> None:
    total = common + len({v for videos in missing.values() for v in videos})
    print(f"eleatt fuse: {total - common} of {total} {what} are not in every file; used the {common} common ones:",
          file=sys.stderr)
    for name, videos in missing.items():
        more = f", ... ({len(videos) - SHOWN} more)" if len(videos) > SHOWN else ""
        print(f"  {name} lacks {len(videos)}: {', '.join(videos[:SHOWN])}{more}", file=sys.stderr)


def print_table(fused: dict, names: Sequence[str]) -> None:
    """top-1, top-k and mean class accuracy of each stream and the fusion, on the videos they share."""
    labels = fused["labels"]
    rows = [(name, f"{w:g}", accuracy_summary(p, labels)) for name, w, p in zip(names, fused["weights"],
                                                                               fused["streams"])]
    rows.append(("fused", "", accuracy_summary(fused["scores"], labels)))
    if rows[-1][2] is None:
        print("no labelled video: accuracies not computed")
        return
    k = min(5, fused["scores"].shape[1])
    width = max(len("stream"), *(len(r[0]) for r in rows))
    print(f"{int((labels >= 0).sum())} labelled videos")
    print(f"{'stream':<{width}}  {'weight':>6}  {'top-1':>6}  {f'top-{k}':>6}  {'mca':>6}")
    for name, weight, s in rows:
        print(f"{name:<{width}}  {weight:>6}  {s['top1']:>6.1%}  {s[f'top{k}']:>6.1%}  {s['mca']:>6.1%}")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser

    parser = command_parser(
        prog="eleatt fuse",
        description="Fuse the scores files of several streams (e.g. RGB and flow scores_test.npz of the same test "
                    "list): align by video name, weighted mean of class probabilities (or of log-probabilities), "
                    "print top-1/top-5/mean class accuracy per stream and fused, write the fused scores file and "
                    "its confusion matrix.",
        epilog="exit status: 0 fused; 3 some videos were not in every file (the common ones were fused, the others "
               "listed); 2 usage error or refused inputs (e.g. different class lists)",
    )
    parser.add_argument("--scores", nargs="+", required=True, metavar="NPZ",
                        help="scores files to fuse, one per stream (e.g. rgb/scores_test.npz flow/scores_test.npz)")
    parser.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                        help="one weight per file (default: 1 1.5 for two files, as TSN's RGB : flow; equal "
                             "otherwise); e.g. 2 2 1 1 for skeleton joint, bone, joint-motion, bone-motion scores "
                             "(pyskl's fixed ensemble)")
    parser.add_argument("--mode", choices=MODES, default="prob",
                        help="prob: weighted mean of probabilities (default); logit: weighted mean of "
                             "log-probabilities, softmaxed back to probabilities")
    parser.add_argument("--search-weights", nargs="+", default=None, metavar="VAL_NPZ",
                        help="validation scores files of the same streams, in the same order: pick the weights "
                             "on them (first stream 1, the others over 0..3 step 0.25, step 0.5 from 5 streams; "
                             "best top-1, then mca)")
    parser.add_argument("--out", default="fused.npz", help="fused scores file (default fused.npz)")
    parser.add_argument("--plot", default=None,
                        help="confusion matrix PNG of the fusion (default confusion_<out name>.png beside --out)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the confusion matrix")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(args.scores)
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_name(f"confusion_{out.stem}.png")
    inputs = names + list(args.search_weights or [])
    check_not_input(out, inputs, "--out")  # the fused file never replaces a scores file it reads
    if args.weights is not None and args.search_weights is not None:
        raise UsageError("give either --weights or --search-weights, not both")
    ensure_writable_file(out, "--out")  # before the (possibly long) weight search
    if not args.no_plot:
        check_not_input(plot, [*inputs, out], "--plot")
        ensure_writable_file(plot, "--plot")
    score_dicts = [read_scores(p) for p in names]  # each names its file when missing or unreadable
    weights = args.weights
    if args.search_weights is not None:
        if len(args.search_weights) != len(names):
            raise UsageError(f"--search-weights has {len(args.search_weights)} validation files for "
                             f"{len(names)} --scores files; give each stream's validation scores, in the same order")
        val_dicts = [read_scores(p) for p in args.search_weights]
        check_classes([*score_dicts, *val_dicts], [*names, *args.search_weights])
        picked = search_weights(val_dicts, mode=args.mode, names=args.search_weights)
        if picked["missing"]:  # a note only: the exit status speaks of the fused (test) files
            _report_missing(picked["missing"], picked["common"], "validation videos")
        weights = picked["weights"]
        grid = picked["grid"]
        coarse = f", each over 0..3 step {grid[1] - grid[0]:g}" if len(grid) < len(SEARCH_GRID) else ""
        print(f"picked weights {_fmt_weights(weights)} on validation ({picked['videos']} labelled videos, "
              f"{picked['tried']} weightings tried{coarse}): top-1 {picked['top1']:.1%}, mca {picked['mca']:.1%}")
        for warning in search_warnings(picked, args.search_weights):
            print(f"eleatt fuse: warning: {warning}", file=sys.stderr)
    fused = fuse_scores(score_dicts, weights, mode=args.mode, names=names)
    n = len(fused["videos"])
    print(f"fused {n} videos from {len(names)} files (mode {args.mode}, weights "
          f"{_fmt_weights(fused['weights'].tolist())})")
    print_table(fused, names)
    classes = fused.get("classes")
    write_scores(out, list(fused["videos"]), fused["scores"], fused["labels"],
                 None if classes is None else list(classes),
                 extra={"weights": fused["weights"], "inputs": fused["inputs"]})
    print(f"wrote {out}")
    if not args.no_plot and (fused["labels"] >= 0).any():
        from pipeline.evaluation.plots import confusion_matrix, plot_confusion

        cm = confusion_matrix(fused["scores"], fused["labels"])
        plot_confusion(cm, plot, None if classes is None else list(map(str, classes)),
                       title=f"fused ({_fmt_weights(fused['weights'].tolist())}, {args.mode}): {int(cm.sum())} videos")
        print(f"wrote {plot}")
    if fused["missing"]:
        _report_missing(fused["missing"], n)
        return EXIT_SOME_FAILED
    return EXIT_OK
