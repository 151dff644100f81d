"""Optical-flow speed and storage: `python -m pipeline.benchmarks.flow [--quick] [--video V]`.

Frame pairs per second at short side 256, on clips (default 6 x 76 frames) of a 340x256 video:

- ``whole process``: `eleatt flow` (DIS fast, ``--workers``, default 2) run as a command, timed from its start to its
  exit: interpreter start, imports, the workers' start, decoding, flow, quantising, writing and the manifest, what a
  user waits for. Beside it, from the same runs, ``in run`` (from the run's start inside the command to its end,
  the rate the command prints) and ``steady`` = pairs / (the workers' summed per-video seconds / workers), the rate
  of a long run once the workers are up. The runs alternate with in-process runs (`compute()` called from this
  process: ``in process``), median of ``--repeats``.
- per method (DIS fast and medium, Farneback; TV-L1 where OpenCV's contrib module is installed, RAFT with
  ``--raft-weights``): ``flow alone``, the estimator on frames already decoded, greyscale and resized (one process,
  one OpenCV thread), and end to end in process with 1 and 2 workers, ``steady`` and ``wall``.

and the bytes per frame pair of the flow files next to mmaction2/denseflow's layout (two JPEGs, quality 95, of the
same quantised flow). The clips are the first frames of ``--video`` (or of the video named by the environment
variable ``ELEATT_BENCH_VIDEO``; without either, a generated 340x256 video of a moving texture), re-encoded
losslessly so that every clip decodes to the same frames.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pipeline
from pipeline.data.flow_files import FlowFolder, jpeg_bytes, load_quantized
from pipeline.data.video import probe, read_frames
from pipeline.errors import quiet_broken_pipe
from preprocessing.flow import OpenCVFlow, RaftFlow, compute, target_size, tvl1_available
from preprocessing.synthetic import write_lossless_video

VIDEO_ENV = "ELEATT_BENCH_VIDEO"
SHORT_SIDE = 256
GENERATED_SIZE = (256, 340)  # (height, width) of the generated video, the size of UCF101 / HMDB51 clips at 256


def generated_frames(frames: int, size: tuple[int, int] = GENERATED_SIZE, seed: int = 0) -> np.ndarray:
    """uint8 (frames, H, W, 3): a smooth random texture panning along a curve, with a bright square crossing it
    (motion everywhere, of a few pixels per frame, as in an action video)."""
    import cv2

    h, w = size
    rng = np.random.default_rng(seed)
    pad = 4 * frames + 8
    noise = rng.random((h + 2 * pad, w + 2 * pad, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 2.0)
    texture = ((texture - texture.min()) / (texture.max() - texture.min()) * 255).astype(np.uint8)
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        dy, dx = int(round(pad / 2 * np.sin(t / 9))), int(round(2 * t)) % pad
        out[t] = texture[pad + dy:pad + dy + h, dx:dx + w]
        x0, y0 = (5 * t) % (w - 40), h // 3 + int(20 * np.cos(t / 7))
        out[t, y0:y0 + 40, x0:x0 + 40] = (255, 220, 40)
    return out


def make_clips(video: Path | None, out: Path, clips: int, frames: int) -> tuple[Path, Path, str]:
    """``clips`` lossless copies of the first ``frames`` frames of ``video`` (None: generated ones), a list naming
    them, and the source's name."""
    if video is None:
        rgb, name = generated_frames(frames), f"a generated {GENERATED_SIZE[1]}x{GENERATED_SIZE[0]} video"
        fps = 25
    else:
        info = probe(video)
        rgb = read_frames(video, np.arange(min(frames, info.num_frames)))  # (T, H, W, 3)
        name, fps = video.name, max(1, round(info.fps))
    write_lossless_video(out / "clip_000.mp4", rgb, fps=fps)
    for i in range(1, clips):
        shutil.copyfile(out / "clip_000.mp4", out / f"clip_{i:03d}.mp4")
    list_path = out / "clips.txt"
    list_path.write_text("".join(f"clip_{i:03d}.mp4 0\n" for i in range(clips)))
    return list_path, out, name


def flow_alone(estimator, rgb: np.ndarray, repeats: int) -> float:
    """Pairs/s of the estimator alone on prepared frames (best of ``repeats``)."""
    size = target_size(rgb.shape[1], rgb.shape[2], SHORT_SIDE)
    images = estimator.prepare(rgb, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _flow in estimator.flows(images):
            pass
        best = min(best, time.perf_counter() - start)
    return (len(images) - 1) / best


def steady_rate(records: list[dict], workers: int) -> float:
    """pairs / (the workers' summed per-video seconds / workers) over a flow folder's manifest records: a long
    run's rate once the workers are up."""
    work = sum(r.get("seconds", 0.0) for r in records)
    return sum(r["pairs"] for r in records) / (work / workers) if work > 0 else float("nan")


def whole_process(list_path: Path, root: Path, out: Path, workers: int) -> tuple[float, float, float]:
    """One `eleatt flow` command (DIS fast) from its start to its exit: (whole process, in run, steady) pairs/s."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(pipeline.__file__).resolve().parents[1]),
                                         *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "pipeline", "flow", "--list", str(list_path), "--root", str(root), "--out",
               str(out), "--workers", str(workers), "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"`eleatt flow` failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    pairs = sum(r["pairs"] for r in FlowFolder(out).finished().values())
    printed = done.stdout.rsplit("; ", 1)[-1].split()[0] if "frame pairs/s" in done.stdout else "nan"
    return pairs / seconds, float(printed), steady_rate(list(FlowFolder(out).finished().values()), workers)


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=None,
                        help=f"source of the clips (default: ${VIDEO_ENV}, else a generated 340x256 video)")
    parser.add_argument("--quick", action="store_true", help="seconds: 2 clips of 12 frames, DIS fast, 1 repeat")
    parser.add_argument("--clips", type=int, default=6, help="clips (videos) per run (default 6)")
    parser.add_argument("--frames", type=int, default=76, help="frames per clip (default 76)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the whole-process runs (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="whole-process and in-process runs, alternated "
                                                               "(default 3; median)")
    parser.add_argument("--raft-weights", help="also time RAFT with this torchvision state dict")
    args = parser.parse_args(argv)
    video = args.video or (Path(os.environ[VIDEO_ENV]) if os.environ.get(VIDEO_ENV) else None)
    if video is not None and not video.is_file():
        print(f"benchmark video '{video}' not found (--video or ${VIDEO_ENV})", file=sys.stderr)
        return 2
    if min(args.clips, args.frames - 1, args.workers, args.repeats) < 1:
        parser.error("--clips, --workers and --repeats must be >= 1 and --frames >= 2")
    clips, frames, repeats = (2, 12, 1) if args.quick else (args.clips, args.frames, args.repeats)
    methods = [("dis", "fast")] if args.quick else [("dis", "fast"), ("dis", "medium"), ("farneback", "fast")]
    if not args.quick and tvl1_available():
        methods.append(("tvl1", "fast"))
    if not args.quick and args.raft_weights:
        methods.append(("raft", "fast"))
    import cv2
    from tqdm import tqdm

    # No tqdm monitor thread: `compute` forks its workers only from a one-thread process (as `eleatt flow` is),
    # so with the monitor of an earlier run's bar alive the later in-process runs would start a forkserver instead.
    tqdm.monitor_interval = 0
    with tempfile.TemporaryDirectory(prefix="eleatt-flow-bench-") as tmp:
        tmp = Path(tmp)
        list_path, root, name = make_clips(video, tmp / "clips", clips, frames)
        rgb = read_frames(root / "clip_000.mp4", np.arange(probe(root / "clip_000.mp4").num_frames))
        h, w = target_size(rgb.shape[1], rgb.shape[2], SHORT_SIDE)
        pairs = clips * (rgb.shape[0] - 1)
        print(f"flow benchmark: {clips} clips x {rgb.shape[0]} frames of {name}, flow at {w}x{h} (short side "
              f"{SHORT_SIDE}); {pairs} frame pairs per run; OpenCV {cv2.__version__}, {os.cpu_count()} CPUs")

        # `eleatt flow` as a user runs it, alternated with the same run in process.
        runs: dict[str, list[float]] = {"whole": [], "in run": [], "steady": [], "in process": []}
        for i in range(repeats):
            whole, in_run, steady = whole_process(list_path, root, tmp / f"cmd-{i}", args.workers)
            start = time.perf_counter()
            summary = compute(list_path, root, tmp / f"proc-{i}", workers=args.workers, progress=False)
            runs["in process"].append(summary.pairs / (time.perf_counter() - start))
            for key, value in (("whole", whole), ("in run", in_run), ("steady", steady)):
                runs[key].append(value)
        med = {k: statistics.median(v) for k, v in runs.items()}
        print()
        print(f"`eleatt flow --workers {args.workers}` (dis fast), frame pairs/s, median of {repeats}:")
        print(f"{'whole process':>14} {'in run':>9} {'steady':>9} {'in process':>11}")
        print(f"{med['whole']:>14.0f} {med['in run']:>9.0f} {med['steady']:>9.0f} {med['in process']:>11.0f}   "
              f"(whole process: {pairs / med['whole']:.2f} s for {pairs} pairs; runs "
              f"{', '.join(f'{v:.0f}' for v in runs['whole'])})")
        sys.stdout.flush()

        print()
        print(f"{'':<18} {'':>11} {'end to end, 1 worker':>22} {'end to end, 2 workers':>22}")
        print(f"{'method':<18} {'flow alone':>11} {'steady':>10} {'wall':>11} {'steady':>10} {'wall':>11}"
              "   (frame pairs/s, in process)")
        sizes = None
        for method, preset in methods:
            saved = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                est = RaftFlow(args.raft_weights, preset) if method == "raft" else OpenCVFlow(method, preset)
                alone = flow_alone(est, rgb, 1 if args.quick else 3)
            finally:
                cv2.setNumThreads(saved)
            rates = []
            for workers in (1, 2):
                out = tmp / f"{method}-{preset}-{workers}"
                start = time.perf_counter()
                summary = compute(list_path, root, out, method, preset, SHORT_SIDE, workers=workers,
                                  weights=args.raft_weights, progress=False)
                seconds = time.perf_counter() - start
                if summary.failed:
                    print(f"  {method} failed: {summary.failed}", file=sys.stderr)
                    return 1
                rates += [steady_rate(list(FlowFolder(out).finished().values()), workers), summary.pairs / seconds]
                if sizes is None:
                    files = sorted(out.rglob("*.flow.zip"))
                    stored = sum(f.stat().st_size for f in files)
                    q = np.concatenate([load_quantized(f)[0] for f in files])
                    sizes = (method, preset, stored / len(q), jpeg_bytes(q) / len(q))
            print(f"{method + ' ' + preset:<18} {alone:>11.0f} " + " ".join(f"{r:>10.0f} " for r in rates))
            sys.stdout.flush()
        method, preset, ours, jpg = sizes
        print(f"bytes per frame pair ({method} {preset}): flow file {ours:.0f} (lossless PNG in zip), "
              f"mmaction2 JPEG q95 {jpg:.0f} (lossy): ratio {ours / jpg:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
