"""What the per-dataset costs of the tool become as a dataset grows: each cost at 1k, 10k and 100k videos (and 1M
for `eleatt fuse`) side by side, with the ratio to the previous size (linear = 10x).

`python -m pipeline.benchmarks.scale` generates the folders each row needs, in the real formats but with small
arrays (the costs measured grow with the number of files and records, not with their contents), and times:

- prepare: `eleatt prepare folder` on a folder of classes (empty .mp4 files, 400 class folders; 100 at 1k);
- extract resume: `FeatureFolder.finished()` + `failed()` on a feature folder whose every video is done (what a rerun
  of `eleatt extract` with nothing left to do checks), .npy files of (64, 16) float16 and their manifest;
- flow resume: `FlowFolder.finished()` on a flow folder of .flow.zip files of 16 pairs of 16x16 (a rerun of `eleatt
  flow`);
- training start-up: `FeatureDataModule.setup("fit")` and the first batch (32 videos, 4 of the 64 steps) on that
  feature folder, with the number of feature files read in full before that batch (none);
- fuse: `eleatt fuse` of two scores files of N videos x 400 classes (--no-plot), in a subprocess: its time and peak
  resident memory against the inputs' size; and `--search-weights` on the same files (13 weightings).

`--quick` runs 100 and 1,000 videos (a few seconds). `--work DIR` keeps the generated folders there (default: a
temporary folder, removed afterwards). Figures: docs/benchmarks.md, "Dataset scale".
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import UserError, quiet_broken_pipe
from pipeline.paths import ensure_writable_dir

SIZES = (1_000, 10_000, 100_000)
FUSE_SIZES = (*SIZES, 1_000_000)
QUICK_SIZES = (100, 1_000)
WARM_UP = 40  # videos of the unreported first round
CLASSES = 400  # Kinetics-400's classes: the fuse rows' score columns, the prepare rows' class folders
FEATURE_SHAPE = (64, 16)  # steps x dim of a generated feature file (2 KB)
NUM_STEPS = 4  # steps a training sample takes of it
FLOW_PAIRS, FLOW_SIZE = 16, 16


# ---------------------------------------------------------------------------------------------------- the table
def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n))


def seconds(value: float) -> str:
    return f"{value:.3g} s" if value >= 0.01 else f"{value * 1000:.2g} ms"


def megabytes(value: float) -> str:
    return f"{value / 2**20:,.0f} MB"


def count(value: float) -> str:
    return f"{value:g}"


def format_table(rows: Sequence[tuple], sizes: Sequence[int]) -> list[str]:
    """The printed table: one line per (label, {size: value}, format[, ratios]) row, one column per size holding
    the value and, unless `ratios` is False, its ratio to the previous size's value of the row (`(x9.8)`; none for
    the first size, after a zero or a missing value); `-` where the row has no value at that size."""
    cells = []
    for label, values, fmt, *more in rows:
        ratios = more[0] if more else True
        line, previous = [label], None
        for n in sizes:
            if n not in values:
                line.append("-")
                previous = None
                continue
            text = fmt(values[n])
            if previous and ratios:
                text += f" (x{values[n] / previous:.1f})"
            line.append(text)
            previous = values[n]
        cells.append(line)
    header = ["videos", *(_size(n) for n in sizes)]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *cells]]
    return lines


# ---------------------------------------------------------------------------------------------------- generating
def _names(n: int, classes: int = CLASSES) -> list[str]:
    return [f"class{i % classes:03d}/v{i:07d}.mp4" for i in range(n)]


def make_video_tree(root: Path, n: int) -> Path:
    """`root/<class>/<video>.mp4`, empty files, in min(CLASSES, n / 10) class folders (prepare holds out test and
    val videos per class: a class needs a few)."""
    classes = max(2, min(CLASSES, n // 10))
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for name in _names(n, classes):
        with open(root / name, "wb"):
            pass
    return root


def make_feature_folder(root: Path, n: int) -> tuple[Path, Path]:
    """A finished feature folder of n videos (settings.json, one .npy each, its manifest) and its train list with
    classes.txt; returns (folder, list)."""
    from pipeline.data.features import FeatureFolder
    from pipeline.data.lists import ListEntry, write_classes, write_list

    folder = FeatureFolder(root / "features")
    folder.check_settings({"backbone": "generated", "dtype": "float16", "dim": FEATURE_SHAPE[1]})
    buffer = io.BytesIO()
    np.save(buffer, np.ones(FEATURE_SHAPE, np.float16))
    data = buffer.getvalue()  # every file holds the same bytes: what is measured is per file, not per value
    names = _names(n)
    with open(folder.manifest_path, "w", encoding="utf-8") as manifest:
        for c in range(CLASSES):
            (folder.root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        for video in names:
            path = folder.feature_path(video)
            path.write_bytes(data)
            manifest.write(json.dumps({"video": video, "feature": folder.relative(path), "frames": FEATURE_SHAPE[0],
                                       "dim": FEATURE_SHAPE[1], "views": 1}, sort_keys=True) + "\n")
    lists = root / "lists"
    write_list(lists / "train.txt", [ListEntry(video, i % CLASSES) for i, video in enumerate(names)])
    write_classes(lists / "classes.txt", [f"class{c:03d}" for c in range(CLASSES)])
    return folder.root, lists / "train.txt"


def make_flow_folder(root: Path, n: int) -> Path:
    """A finished flow folder of n videos: one real .flow.zip (FLOW_PAIRS pairs), its bytes copied to every video,
    each with its manifest record (with the copy's size and time, as a run writes them)."""
    from pipeline.data.flow_files import FlowFolder

    folder = FlowFolder(root / "flow")
    pairs = np.random.default_rng(0).integers(0, 255, (FLOW_PAIRS, 2, FLOW_SIZE, FLOW_SIZE), dtype=np.uint8)
    names = _names(n)
    record = folder.write_quantized(names[0], pairs, bound=20.0)
    data = folder.feature_path(names[0]).read_bytes()
    with open(folder.manifest_path, "a", encoding="utf-8") as manifest:
        for c in range(CLASSES):
            (folder.root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        for video in names[1:]:
            path = folder.feature_path(video)
            path.write_bytes(data)
            stat = path.stat()  # as `FlowFolder.record` notes it: a resume then compares, not opens, the file
            manifest.write(json.dumps({**record, "video": video, "feature": folder.relative(path),
                                       "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}, sort_keys=True) + "\n")
    return folder.root


def make_scores(path: Path, n: int, seed: int) -> Path:
    """A scores file of n videos x CLASSES classes (float32 probabilities, labels), written chunk by chunk."""
    from pipeline.evaluation.scores import write_scores

    rng = np.random.default_rng(seed)
    scores = np.empty((n, CLASSES), np.float32)
    labels = np.random.default_rng(0).integers(0, CLASSES, n)  # the same labels in every stream's file
    step = 50_000
    for start in range(0, n, step):
        part = rng.random((min(step, n - start), CLASSES), dtype=np.float32)
        part[np.arange(len(part)), labels[start:start + step]] += 2.0  # right often enough to be a real file
        scores[start:start + step] = part / part.sum(1, keepdims=True)
    write_scores(path, [f"v{i:07d}.mp4" for i in range(n)], scores, labels, [f"class{c:03d}" for c in range(CLASSES)])
    return path


# ---------------------------------------------------------------------------------------------------- measuring
def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        call()
    return time.perf_counter() - start


def time_prepare(tree: Path, out: Path) -> float:
    from preprocessing.prepare import main

    return _timed(lambda: main(["folder", "--root", str(tree), "--out", str(out)]))


def time_extract_resume(features: Path) -> float:
    from pipeline.data.features import FeatureFolder

    def resume():
        folder = FeatureFolder(features)
        assert len(folder.finished()) > 0 and not folder.failed()

    return _timed(resume)


def time_flow_resume(flow: Path) -> float:
    from pipeline.data.flow_files import FlowFolder

    return _timed(lambda: FlowFolder(flow).finished())


def time_startup(features: Path, train_list: Path) -> tuple[float, int]:
    """Seconds of `setup("fit")` + the first batch (NUM_STEPS steps a sample), and the feature files read in full
    until then: loaded without a memory map, or passed whole to a numpy check (`np.isfinite` on all of a file's
    values, as a per-file NaN check does)."""
    from pipeline.training.feature_data import FeatureDataModule

    full_reads = []
    real_load, real_isfinite = np.load, np.isfinite
    whole = FEATURE_SHAPE[0] * FEATURE_SHAPE[1]

    def counting_load(*args, **kwargs):
        if kwargs.get("mmap_mode") is None:
            full_reads.append(args[0])
        return real_load(*args, **kwargs)

    def counting_isfinite(x, *args, **kwargs):
        if isinstance(x, np.ndarray) and x.size >= whole:
            full_reads.append(x)
        return real_isfinite(x, *args, **kwargs)

    def start():
        data = FeatureDataModule(str(features), train_list=str(train_list), num_steps=NUM_STEPS, batch_size=32)
        data.setup("fit")
        next(iter(data.train_dataloader()))

    np.load, np.isfinite = counting_load, counting_isfinite
    try:
        took = _timed(start)
    finally:
        np.load, np.isfinite = real_load, real_isfinite
    return took, len(full_reads)


# The peak is /proc's VmHWM, this process's own high-water mark: getrusage's ru_maxrss would keep the parent's
# (Linux carries it across exec), and the parent holds torch.
_PEAK = """
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
"""
_FUSE = _PEAK + """
import contextlib, io, json, sys, time
from pipeline.evaluation.fusion import main
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak": peak()}))
"""


def run_fuse(argv: list[str]) -> dict:
    """`eleatt fuse argv` in a fresh interpreter: {"code", "seconds", "peak" (bytes of resident memory at most)}."""
    done = subprocess.run([sys.executable, "-c", _FUSE, *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"eleatt fuse {' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def idle_peak() -> int:
    """Peak resident memory of the interpreter that runs fuse, with its imports, fusing nothing."""
    code = _PEAK + "import pipeline.evaluation.fusion, pipeline.arguments\nprint(peak())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


# ---------------------------------------------------------------------------------------------------- the run
def folder_round(where: Path, n: int) -> dict[str, float]:
    """The folder rows at n videos: generates the folders under `where`, times each."""
    tree = make_video_tree(where / "videos", n)
    row = {"prepare": time_prepare(tree, where / "prepared")}
    features, train_list = make_feature_folder(where, n)
    row["extract"] = time_extract_resume(features)
    row["startup"], row["reads"] = time_startup(features, train_list)
    row["flow"] = time_flow_resume(make_flow_folder(where, n))
    return row


def run(sizes: Sequence[int], fuse_sizes: Sequence[int], work: Path, log: Callable[[str], None]) -> list[tuple]:
    rows: dict[str, dict[int, float]] = {k: {} for k in (
        "prepare", "extract", "flow", "startup", "reads", "fuse", "peak", "ratio", "search", "search_ratio")}
    folder_round(work / "warm-up", WARM_UP)  # unreported: first calls' one-off costs stay out of the figures
    for n in sizes:
        log(f"{_size(n)} videos: generating folders")
        for key, value in folder_round(work / f"n{n}", n).items():
            rows[key][n] = value
        log(f"{_size(n)} videos: prepare {seconds(rows['prepare'][n])}, extract resume "
            f"{seconds(rows['extract'][n])}, start-up {seconds(rows['startup'][n])}, flow resume "
            f"{seconds(rows['flow'][n])}")
    base = idle_peak()
    for n in fuse_sizes:
        where = work / f"fuse{n}"
        where.mkdir(parents=True, exist_ok=True)
        log(f"{_size(n)} videos x {CLASSES} classes: generating two scores files")
        a, b = make_scores(where / "a.npz", n, 1), make_scores(where / "b.npz", n, 2)
        fused = run_fuse(["--scores", str(a), str(b), "--out", str(where / "fused.npz"), "--no-plot"])
        inputs = 2 * n * CLASSES * 4
        rows["fuse"][n], rows["peak"][n] = fused["seconds"], fused["peak"]
        rows["ratio"][n] = (fused["peak"] - base) / inputs
        search = run_fuse(["--scores", str(a), str(b), "--search-weights", str(a), str(b),
                           "--out", str(where / "searched.npz"), "--no-plot"])
        rows["search"][n] = search["seconds"]
        rows["search_ratio"][n] = search["seconds"] / fused["seconds"]
        log(f"{_size(n)} videos: fuse {seconds(fused['seconds'])}, peak {megabytes(fused['peak'])} "
            f"(inputs {megabytes(inputs)}), weight search {seconds(search['seconds'])}")
        for path in where.iterdir():
            path.unlink()
    return [
        ("prepare folder", rows["prepare"], seconds),
        ("extract resume (nothing to do)", rows["extract"], seconds),
        ("flow resume (nothing to do)", rows["flow"], seconds),
        ("training start-up + 1st batch", rows["startup"], seconds),
        ("  files read in full before it", rows["reads"], count, False),
        (f"fuse 2 x N x {CLASSES}", rows["fuse"], seconds),
        ("  fuse peak memory", rows["peak"], megabytes),
        ("  peak above imports / inputs", rows["ratio"], lambda v: f"{v:.2f}", False),
        ("fuse --search-weights (13)", rows["search"], seconds),
        ("  search / one fuse", rows["search_ratio"], lambda v: f"{v:.1f}", False),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.scale",
        description="Per-dataset costs (prepare, extract and flow resume, training start-up, fuse) at 1k, 10k and "
                    "100k videos (fuse also 1M), on generated folders, each with its ratio to the previous size "
                    "(linear = x10).")
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 videos only (a few seconds)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                        help=f"video counts of the folder rows (default {' '.join(map(str, SIZES))})")
    parser.add_argument("--fuse-sizes", type=int, nargs="+", default=None, metavar="N",
                        help=f"video counts of the fuse rows (default {' '.join(map(str, FUSE_SIZES))})")
    parser.add_argument("--work", default=None, help="folder for the generated data (kept); default: a temporary "
                                                     "folder, removed afterwards")
    return parser


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    fuse_sizes = args.fuse_sizes or (QUICK_SIZES if args.quick else FUSE_SIZES)
    if min(*sizes, *fuse_sizes) < 1:
        print("scale benchmark: sizes must be >= 1 video", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        if args.work:
            try:
                work = ensure_writable_dir(args.work, "--work folder", create=True)
            except UserError as err:
                print(f"scale benchmark: {err}", file=sys.stderr)
                return 2
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eleatt-scale-")))
        rows = run(sorted(set(sizes)), sorted(set(fuse_sizes)), work, log)
    all_sizes = sorted(set(sizes) | set(fuse_sizes))
    print(f"per-dataset costs on generated folders (python {sys.version.split()[0]}, {os.cpu_count()} cores); "
          "(xR) = ratio to the previous size")
    for line in format_table(rows, all_sizes):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
