"""Decoding speed and accuracy of each video backend: `python -m pipeline.benchmarks.decode [--quick]`.

For every video, three reads are timed (median of --repeats, one process, a fresh reader per call as in a DataLoader
worker): *segments* (the centre frame of each of 8 equal segments, TSN test sampling), *train* (a random frame in
each of 8 segments, TSN training sampling, seed 0) and *all* frames. Backends:

- ``decord``       raw decord 0.6.0 ``get_batch`` (no accuracy check; may return wrong frames),
- ``forward``      a reference: PyAV decoding from the start to the last wanted frame, keeping the wanted ones (same
                   threads as ``load_frames``; exact by definition, no index, no seeking),
- ``pyav``         PyAV with the frame index (pts-matched seeking where the container allows it, else sequential),
- ``auto``         what ``load_frames`` does by default (PyAV for sparse reads; decord for dense reads of files
                   where it passed the accuracy check), in a process that has read the file before,
- ``auto (1st read)`` the first read of the file in a fresh process: the index, and for a dense read the decord
                   check.

``wrong`` counts returned frames that are not the frame sequential decoding yields at that index (mean absolute
difference above ``SAME_FRAME_TOL``). ``auto (1st read)`` minus ``auto`` is the cost of opening a file: the index,
plus, for the dense ``all`` read, the decord accuracy check. ``vs ref`` is a row's time over the faster of ``decord``
and ``forward`` for the same frames of the same file (the target for ``pyav``/``auto``: at most 1.1x).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np

from pipeline.data import video as V
from pipeline.errors import quiet_broken_pipe

DEFAULT_VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"
NUM_SEGMENTS = 8
# (label, backend, auto reads of the file before the timed one in a fresh process; None: caches warm). Cold last.
CASES = [
    ("decord", "decord", None),
    ("forward", "forward", None),
    ("pyav", "pyav", None),
    ("auto", "auto", None),
    ("auto (1st read)", "auto", 0),
]


def segment_centres(num_frames: int, num_segments: int = NUM_SEGMENTS) -> np.ndarray:
    """The middle frame of each of ``num_segments`` equal segments (TSN test-time sampling), int64 (num_segments,)."""
    return ((np.arange(num_segments) + 0.5) * num_frames / num_segments).astype(np.int64)


def segment_random(num_frames: int, num_segments: int = NUM_SEGMENTS, seed: int = 0) -> np.ndarray:
    """A random frame in each of ``num_segments`` equal segments (TSN training sampling), int64 (num_segments,)."""
    edges = np.arange(num_segments + 1) * num_frames / num_segments
    rng = np.random.default_rng(seed)
    return np.minimum(np.floor(edges[:-1] + rng.random(num_segments) * np.diff(edges)), num_frames - 1).astype(np.int64)


MODES = {
    "segments": segment_centres,
    "train": segment_random,
    "all": lambda n: np.arange(n, dtype=np.int64),
}


def sequential_frames(path: Path, indices: np.ndarray) -> np.ndarray:
    """The reference: decode from the start, keep frames ``indices`` (sorted, distinct) -> (U, H, W, 3) uint8."""
    want = set(indices.tolist())
    out = []
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in want:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= indices[-1]:
                break
    return np.stack(out)


def forward_frames(path: Path, indices: np.ndarray) -> np.ndarray:
    """Frames ``indices`` (any order) by decoding from the start to the last one, with ``load_frames``'s threads:
    (T, H, W, 3) uint8 in the order asked. The reference a sparse read must not be slower than."""
    distinct = np.unique(indices)
    last, want = int(distinct[-1]), set(distinct.tolist())
    out = []
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type, stream.thread_count = V.PYAV_THREAD_TYPE, V.PYAV_THREADS
        for i, frame in enumerate(c.decode(stream)):
            if i in want:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= last:
                break
    return np.stack(out)[np.searchsorted(distinct, indices)]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 frames."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _time(fn, setup, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of ``fn()`` over ``repeats`` calls, each after an untimed ``setup()``; on a busy
    machine the best is the steadier figure."""
    times = []
    for _ in range(repeats):
        setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def bench_video(path: Path, repeats: int, modes: list[str]) -> list[dict]:
    """Rows {video, mode, backend, frames, ms, fps, wrong} for one video (``ms`` None where the backend fails)."""
    info = V.probe(path)
    rows = []
    for mode in modes:
        idx = MODES[mode](info.num_frames)
        distinct = np.unique(idx)
        ref = sequential_frames(path, distinct)
        ref_pos = np.searchsorted(distinct, idx)
        for _ in range(2):  # warm: the index built and the decord verdict settled (cold cases come last)
            V.load_frames(path, idx, "auto")
        for label, backend, reads_before in CASES:
            if backend == "decord" and not V.decord_available():
                continue

            def setup(reads_before=reads_before):
                if reads_before is not None:  # a fresh process that has read this file `reads_before` times
                    V.clear_cache()
                    for _ in range(reads_before):
                        V.load_frames(path, idx, "auto")

            def run(backend=backend):
                if backend == "forward":
                    return forward_frames(path, idx)
                return V.load_frames(path, idx, backend).numpy()

            try:
                setup()
                frames = run()
            except V.VideoReadError as e:
                rows.append(dict(video=path.name, mode=mode, backend=label, frames=len(idx), ms=None, fps=None,
                                 wrong=None, note=str(e).split(": ", 1)[-1][:60]))
                continue
            wrong = sum(_mad(f, ref[k]) > V.SAME_FRAME_TOL for f, k in zip(frames, ref_pos))
            del frames
            sec, best = _time(run, setup, repeats)
            rows.append(dict(video=path.name, mode=mode, backend=label, frames=len(idx), ms=sec * 1e3,
                             best_ms=best * 1e3, fps=len(idx) / sec, wrong=wrong, note=""))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'video':<30} {'mode':<9} {'backend':<15} {'frames':>6} {'ms':>8} {'best ms':>8} {'frames/s':>9} "
             f"{'vs pyav':>8} {'vs ref':>7} {'wrong':>5}"]
    pyav_ms = {(r["video"], r["mode"]): r["ms"] for r in rows if r["backend"] == "pyav"}
    ref_ms: dict[tuple, float] = {}  # the faster of decord and forward decoding, per file and read
    for r in rows:
        if r["backend"] in ("decord", "forward") and r["ms"] is not None:
            k = (r["video"], r["mode"])
            ref_ms[k] = min(ref_ms.get(k, float("inf")), r["ms"])
    for r in rows:
        if r["ms"] is None:
            lines.append(f"{r['video']:<30} {r['mode']:<9} {r['backend']:<15} {r['frames']:>6}  fails: {r['note']}")
            continue
        ref = pyav_ms.get((r["video"], r["mode"]))
        ratio = f"{ref / r['ms']:.2f}x" if ref else "-"
        best_ref = ref_ms.get((r["video"], r["mode"]))
        vs_ref = f"{r['ms'] / best_ref:.2f}x" if best_ref else "-"
        lines.append(f"{r['video']:<30} {r['mode']:<9} {r['backend']:<15} {r['frames']:>6} {r['ms']:>8.1f} "
                     f"{r['best_ms']:>8.1f} {r['fps']:>9.0f} {ratio:>8} {vs_ref:>7} {r['wrong']:>5}")
    return "\n".join(lines)


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.decode",
        description="Frames/s of each video backend (decord, PyAV, auto with its accuracy check) for segment sampling "
                    "(8 frames) and for all frames, the cost of the accuracy check (first open vs cached), and how "
                    "many returned frames are wrong against sequential decoding.")
    parser.add_argument("videos", nargs="*", type=Path,
                        help=f"video files (default: every file in {DEFAULT_VIDEOS})")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per case; the median and the best are printed (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 repeat, the sparse reads (segments, train) only")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    videos = args.videos
    if not videos:
        if not DEFAULT_VIDEOS.is_dir():
            parser.error(f"no videos given and {DEFAULT_VIDEOS} does not exist; pass video files")
        videos = sorted(p for p in DEFAULT_VIDEOS.iterdir() if p.is_file())
    repeats = 1 if args.quick else args.repeats
    modes = ["segments", "train"] if args.quick else list(MODES)

    print(f"PyAV {av.__version__} (FFmpeg libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}), "
          f"decord {'available' if V.decord_available() else 'not installed'}; ms = median of {repeats} calls "
          f"(frames/s, 'vs pyav' and 'vs ref' from it; ref = the faster of decord and forward); wrong = frames differing "
          f"from sequential decoding", flush=True)
    rows, failed = [], []
    for path in videos:
        try:
            rows += bench_video(path, repeats, modes)
        except (V.VideoReadError, FileNotFoundError) as e:
            failed.append(f"{path}: {e}")
    print(format_rows(rows))
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
