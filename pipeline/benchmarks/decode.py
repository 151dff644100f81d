"""Decoding speed and accuracy of each video backend: `python -m pipeline.benchmarks.decode [--quick] [VIDEO ...]`.

Videos: those named, else every file of the folder in ``ELEATT_BENCH_VIDEOS``, else a few generated here (H.264
with B-frames and a long GOP, H.264 with a short GOP at 640x360, HEVC, MPEG-4 in AVI, VP9 in WebM, and an H.264 file
with a 90-degree display rotation), so that it runs anywhere.

For every video, three reads are timed (median of --repeats, one process, a fresh reader per call as in a DataLoader
worker): *segments* (the centre frame of each of 8 equal segments, TSN test sampling), *train* (a random frame in
each of 8 segments, TSN training sampling, seed 0) and *all* frames. Backends:

- ``decord``       raw decord 0.6.0 ``get_batch`` in this process (no accuracy check; may return wrong frames),
- ``torchcodec``   raw torchcodec ``get_frames_at`` (exact seek mode) in this process, where installed (no check),
- ``forward``      a reference: PyAV decoding from the start to the last wanted frame, keeping the wanted ones (same
                   threads as ``load_frames``; exact by definition, no index, no seeking),
- ``pyav``         ``load_frames(backend="pyav")``: PyAV with the frame index (pts-matched seeking where the container
                   allows it, else sequential), in the decoding process (the guard of ``decode_guard``),
- ``auto``         what ``load_frames`` does by default (PyAV for sparse reads; torchcodec or decord for dense reads
                   of files where they passed the per-file check), in a process that has read the file before,
- ``auto (no guard)`` the same in this process (``ELEATT_DECODE_TIMEOUT=off``): ``auto`` minus it is the guard's cost,
- ``auto (1st read)`` the first read of the file in a fresh process: the index, and for a dense read the checks.

``wrong`` counts returned frames that are not the frame sequential decoding yields at that index (mean absolute
difference above ``SAME_FRAME_TOL``), in the displayed orientation. ``vs ref`` is a row's time over the faster of
``decord`` and ``forward`` for the same frames of the same file (the target for ``pyav``/``auto``: at most 1.1x).
A summary follows: per file and backend, frame-exact or not, and the sparse (segments) and dense (all) times; then
the worst ``auto`` sparse read against its reference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np

from pipeline.data import decode_guard
from pipeline.data import video as V
from pipeline.errors import quiet_broken_pipe

ENV_VIDEOS = "ELEATT_BENCH_VIDEOS"
NUM_SEGMENTS = 8
# (label, backend, auto reads of the file before the timed one in a fresh process (None: caches warm), through the
# decoding process). Cold last.
CASES = [
    ("decord", "decord", None, False),
    ("torchcodec", "torchcodec", None, False),
    ("forward", "forward", None, False),
    ("pyav", "pyav", None, True),
    ("auto", "auto", None, True),
    ("auto (no guard)", "auto", None, False),
    ("auto (1st read)", "auto", 0, True),
]
REFERENCES = ("decord", "forward")
# Generated when no videos are given: (name, codec, pixel format, size, frames, fps, codec options, display rotation)
GENERATED = [
    ("h264_bframes.mp4", "libx264", "yuv420p", (240, 320), 300, 30, {"preset": "veryfast", "bf": "2"}, 0),
    ("h264_gop30_640x360.mp4", "libx264", "yuv420p", (360, 640), 150, 25,
     {"preset": "veryfast", "g": "30", "keyint_min": "30"}, 0),
    ("hevc.mp4", "libx265", "yuv420p", (240, 320), 150, 30, {"preset": "ultrafast", "x265-params": "log-level=error"},
     0),
    ("mpeg4.avi", "mpeg4", "yuv420p", (240, 320), 150, 25, {"qscale": "3", "g": "50"}, 0),
    ("vp9.webm", "libvpx-vp9", "yuv420p", (240, 320), 120, 30, {"deadline": "realtime", "cpu-used": "8"}, 0),
    ("h264_rotated90.mp4", "libx264", "yuv420p", (240, 320), 90, 30, {"preset": "veryfast"}, 90),
]


def _pattern(t: int, h: int, w: int) -> np.ndarray:
    """A frame of moving gradients and a moving square: every frame differs from its neighbours."""
    y, x = np.mgrid[0:h, 0:w]
    frame = np.stack([(x * 3 + t * 5) % 256, (y * 2 + t * 3) % 256, ((x + y) + t * 7) % 256], -1).astype(np.uint8)
    s = max(8, h // 6)
    y0, x0 = (t * 3) % (h - s), (t * 5) % (w - s)
    frame[y0:y0 + s, x0:x0 + s] = 255 - frame[y0:y0 + s, x0:x0 + s]
    return frame


def make_videos(folder: Path) -> list[Path]:
    """Writes the ``GENERATED`` test videos into ``folder`` (the encoders PyAV's FFmpeg lacks are left out)."""
    out = []
    for name, codec, pix_fmt, (h, w), frames, fps, options, rotation in GENERATED:
        if codec not in av.codecs_available:
            continue
        path = folder / name
        with av.open(str(path), "w") as c:
            stream = c.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            stream.options = dict(options)
            if rotation:
                stream.set_display_rotation(rotation)
            for t in range(frames):
                for packet in stream.encode(av.VideoFrame.from_ndarray(_pattern(t, h, w), format="rgb24")):
                    c.mux(packet)
            for packet in stream.encode():
                c.mux(packet)
        out.append(path)
    return out


@contextmanager
def _guard(on: bool):
    """Reads in the decoding process (on) or in this process (off) inside the block."""
    saved = os.environ.get(decode_guard.ENV_TIMEOUT)
    if not on:
        os.environ[decode_guard.ENV_TIMEOUT] = "off"
    elif saved is not None and saved.strip().lower() in decode_guard._OFF:
        os.environ.pop(decode_guard.ENV_TIMEOUT)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(decode_guard.ENV_TIMEOUT, None)
        else:
            os.environ[decode_guard.ENV_TIMEOUT] = saved


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
    """The reference: decode from the start, keep frames ``indices`` (sorted, distinct) -> (U, H, W, 3) uint8, in the
    displayed orientation (the file's display matrix, as ``probe`` reads it)."""
    want = set(indices.tolist())
    out = []
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in want:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= indices[-1]:
                break
    info = V.probe(path)
    return V._orient(np.stack(out), (info.rotation // 90, info.mirrored))


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


def _raw(path: Path, idx: np.ndarray, backend: str) -> np.ndarray:
    """A raw backend in this process (no guard, no check), in the order asked, displayed."""
    with _guard(False):
        return V.load_frames(path, idx, backend).numpy()


def bench_video(path: Path, repeats: int, modes: list[str]) -> list[dict]:
    """Rows {video, mode, backend, frames, ms, best_ms, fps, wrong, note} for one video (``ms`` None where the
    backend fails, with the reason in ``note``)."""
    info = V.probe(path)
    rows = []
    for mode in modes:
        idx = MODES[mode](info.num_frames)
        distinct = np.unique(idx)
        ref = sequential_frames(path, distinct)
        ref_pos = np.searchsorted(distinct, idx)
        for guarded in (True, False):  # warm: the index built and the verdicts settled (cold cases come last)
            with _guard(guarded):
                for _ in range(2):
                    V.load_frames(path, idx, "auto")
        for label, backend, reads_before, guarded in CASES:
            if backend == "decord" and not V.decord_available():
                continue
            if backend == "torchcodec" and not V.torchcodec_available():
                continue

            def setup(reads_before=reads_before, guarded=guarded):
                if reads_before is not None:  # a fresh process that has read this file `reads_before` times
                    with _guard(guarded):
                        V.clear_cache()
                        for _ in range(reads_before):
                            V.load_frames(path, idx, "auto")

            def run(backend=backend, guarded=guarded):
                if backend == "forward":
                    return forward_frames(path, idx)
                if backend in ("decord", "torchcodec"):
                    return _raw(path, idx, backend)
                with _guard(guarded):
                    return V.load_frames(path, idx, backend).numpy()

            try:
                setup()
                frames = run()
            except V.VideoReadError as e:
                rows.append(dict(video=path.name, mode=mode, backend=label, frames=len(idx), ms=None, fps=None,
                                 wrong=None, note=str(e).split(": ", 1)[-1][:60]))
                continue
            if backend == "forward":
                frames = V._orient(frames, (info.rotation // 90, info.mirrored))
            wrong = sum(f.shape != ref[k].shape or _mad(f, ref[k]) > V.SAME_FRAME_TOL for f, k in zip(frames, ref_pos))
            del frames
            sec, best = _time(run, setup, repeats)
            rows.append(dict(video=path.name, mode=mode, backend=label, frames=len(idx), ms=sec * 1e3,
                             best_ms=best * 1e3, fps=len(idx) / sec, wrong=wrong, note=""))
    return rows


def _references(rows: list[dict]) -> dict[tuple, float]:
    """The faster of decord and forward decoding, per (file, read)."""
    ref_ms: dict[tuple, float] = {}
    for r in rows:
        if r["backend"] in REFERENCES and r["ms"] is not None:
            k = (r["video"], r["mode"])
            ref_ms[k] = min(ref_ms.get(k, float("inf")), r["ms"])
    return ref_ms


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'video':<30} {'mode':<9} {'backend':<16} {'frames':>6} {'ms':>8} {'best ms':>8} {'frames/s':>9} "
             f"{'vs pyav':>8} {'vs ref':>7} {'wrong':>5}"]
    pyav_ms = {(r["video"], r["mode"]): r["ms"] for r in rows if r["backend"] == "pyav"}
    ref_ms = _references(rows)
    for r in rows:
        if r["ms"] is None:
            lines.append(f"{r['video']:<30} {r['mode']:<9} {r['backend']:<16} {r['frames']:>6}  fails: {r['note']}")
            continue
        ref = pyav_ms.get((r["video"], r["mode"]))
        ratio = f"{ref / r['ms']:.2f}x" if ref else "-"
        best_ref = ref_ms.get((r["video"], r["mode"]))
        vs_ref = f"{r['ms'] / best_ref:.2f}x" if best_ref else "-"
        lines.append(f"{r['video']:<30} {r['mode']:<9} {r['backend']:<16} {r['frames']:>6} {r['ms']:>8.1f} "
                     f"{r['best_ms']:>8.1f} {r['fps']:>9.0f} {ratio:>8} {vs_ref:>7} {r['wrong']:>5}")
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """Per file and backend: frame-exact or not over every read, and the sparse (segments) and dense (all) times;
    then the worst auto sparse read (segments, train) against the faster of decord and forward."""
    lines = ["", f"{'video':<30} {'backend':<16} {'frame-exact':<22} {'sparse ms':>9} {'dense ms':>9}"]
    keys = list(dict.fromkeys((r["video"], r["backend"]) for r in rows))
    for video, backend in keys:
        mine = [r for r in rows if r["video"] == video and r["backend"] == backend]
        failed = [r for r in mine if r["ms"] is None]
        wrong = sum(r["wrong"] for r in mine if r["ms"] is not None)
        exact = (f"fails: {failed[0]['note'][:14]}" if failed else "yes" if wrong == 0 else f"NO ({wrong} wrong)")
        ms = {r["mode"]: r["ms"] for r in mine if r["ms"] is not None}
        sparse = f"{ms['segments']:.1f}" if "segments" in ms else "-"
        dense = f"{ms['all']:.1f}" if "all" in ms else "-"
        lines.append(f"{video:<30} {backend:<16} {exact:<22} {sparse:>9} {dense:>9}")
    ref_ms = _references(rows)
    sparse = [(r["ms"] / ref_ms[(r["video"], r["mode"])], r["video"], r["mode"]) for r in rows
              if r["backend"] == "auto" and r["mode"] in ("segments", "train") and r["ms"] is not None
              and (r["video"], r["mode"]) in ref_ms]
    if sparse:
        worst = max(sparse)
        lines.append(f"worst auto sparse read: {worst[0]:.2f}x the faster of decord and forward ({worst[1]}, "
                     f"{worst[2]}; target <= 1.1x)")
    return "\n".join(lines)


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.decode",
        description="Frames/s of each video backend (decord, PyAV, auto with its accuracy check) for segment sampling "
                    "(8 frames) and for all frames, the cost of the accuracy check (first open vs cached), and how "
                    "many returned frames are wrong against sequential decoding.")
    parser.add_argument("videos", nargs="*", type=Path,
                        help=f"video files (default: every file in the folder ${ENV_VIDEOS}, else a few generated "
                             f"ones: H.264, HEVC, MPEG-4 AVI, VP9, a rotated H.264)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per case; the median and the best are printed (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 repeat, the sparse reads (segments, train) only")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    videos = args.videos
    scratch = None
    if not videos and os.environ.get(ENV_VIDEOS):
        folder = Path(os.environ[ENV_VIDEOS])
        if not folder.is_dir():
            parser.error(f"{ENV_VIDEOS}={folder} is not a folder; name a folder of videos, or pass video files")
        videos = sorted(p for p in folder.iterdir() if p.is_file())
    if not videos:
        scratch = tempfile.TemporaryDirectory(prefix="eleatt-bench-videos-")
        print(f"no videos given (and no {ENV_VIDEOS}): generating test videos in {scratch.name}", flush=True)
        videos = make_videos(Path(scratch.name))
    repeats = 1 if args.quick else args.repeats
    modes = ["segments", "train"] if args.quick else list(MODES)

    tc = "available" if V.torchcodec_available() else f"not used ({V._torchcodec_missing})"
    print(f"PyAV {av.__version__} (FFmpeg libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}), "
          f"decord {'available' if V.decord_available() else 'not installed'}, torchcodec {tc}; "
          f"ms = median of {repeats} calls "
          f"(frames/s, 'vs pyav' and 'vs ref' from it; ref = the faster of decord and forward); wrong = frames differing "
          f"from sequential decoding", flush=True)
    rows, failed = [], []
    for path in videos:
        try:
            rows += bench_video(path, repeats, modes)
        except (V.VideoReadError, FileNotFoundError) as e:
            failed.append(f"{path}: {e}")
    print(format_rows(rows))
    print(format_summary(rows))
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    V.close_readers()
    if scratch is not None:
        scratch.cleanup()
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
