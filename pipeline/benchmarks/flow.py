"""Optical-flow speed and storage: `python -m pipeline.benchmarks.flow [--quick]`.

For each method (DIS fast and medium, Farneback, TV-L1 where OpenCV's contrib module is installed, RAFT with
``--raft-weights``) at short side 256, frame pairs per second:

- ``flow alone``: the estimator on frames already decoded, greyscale and resized (one process, one OpenCV thread);
- ``end to end``: ``eleatt flow`` (decode + resize + flow + quantise + PNG + write + manifest) over the clips, with
  1 and 2 worker processes: ``wall`` from the call to the return (worker start-up included, which the quick run's
  few pairs cannot amortise) and ``steady`` = pairs / (the workers' summed per-video seconds / workers), the rate
  of a long run once the workers are up.

and the bytes per frame pair of the flow files next to mmaction2/denseflow's layout (two JPEGs, quality 95, of the
same quantised flow). The clips are the first frames of ``--video`` (default ``../shared/data/videos/test.mp4``,
340x256), re-encoded losslessly so that every clip decodes to the same frames.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.data.flow_files import FlowFolder, jpeg_bytes, load_quantized
from pipeline.data.video import load_frames, probe
from pipeline.errors import quiet_broken_pipe
from preprocessing.flow import OpenCVFlow, RaftFlow, compute, target_size, tvl1_available
from preprocessing.synthetic import write_lossless_video

DEFAULT_VIDEO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos" / "test.mp4"
SHORT_SIDE = 256


def make_clips(video: Path, out: Path, clips: int, frames: int) -> tuple[Path, Path]:
    """``clips`` lossless copies of the first ``frames`` frames of ``video`` and a list naming them."""
    info = probe(video)
    frames = min(frames, info.num_frames)
    rgb = load_frames(video, np.arange(frames)).numpy()  # (T, H, W, 3)
    write_lossless_video(out / "clip_000.mp4", rgb, fps=max(1, round(info.fps)))
    for i in range(1, clips):
        shutil.copyfile(out / "clip_000.mp4", out / f"clip_{i:03d}.mp4")
    list_path = out / "clips.txt"
    list_path.write_text("".join(f"clip_{i:03d}.mp4 0\n" for i in range(clips)))
    return list_path, out


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


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="source of the clips (default test.mp4)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: 4 clips of 24 frames, DIS fast/medium")
    parser.add_argument("--clips", type=int, default=8, help="clips (videos) per end-to-end run (default 8)")
    parser.add_argument("--frames", type=int, default=150, help="frames per clip (default 150)")
    parser.add_argument("--raft-weights", help="also time RAFT with this torchvision state dict")
    args = parser.parse_args(argv)
    if not args.video.is_file():
        print(f"benchmark video '{args.video}' not found (--video)", file=sys.stderr)
        return 2
    clips, frames = (4, 24) if args.quick else (args.clips, args.frames)
    methods = [("dis", "fast"), ("dis", "medium")]
    if not args.quick:
        methods.append(("farneback", "fast"))
        if tvl1_available():
            methods.append(("tvl1", "fast"))
        if args.raft_weights:
            methods.append(("raft", "fast"))
    import cv2

    with tempfile.TemporaryDirectory(prefix="eleatt-flow-bench-") as tmp:
        tmp = Path(tmp)
        list_path, root = make_clips(args.video, tmp / "clips", clips, frames)
        rgb = load_frames(root / "clip_000.mp4", np.arange(probe(root / "clip_000.mp4").num_frames)).numpy()
        h, w = target_size(rgb.shape[1], rgb.shape[2], SHORT_SIDE)
        pairs = clips * (rgb.shape[0] - 1)
        print(f"flow benchmark: {clips} clips x {rgb.shape[0]} frames of {args.video.name}, flow at {w}x{h} "
              f"(short side {SHORT_SIDE}); {pairs} frame pairs per end-to-end run; {cv2.__version__=}")
        print(f"{'':<18} {'':>11} {'end to end, 1 worker':>22} {'end to end, 2 workers':>22}")
        print(f"{'method':<18} {'flow alone':>11} {'steady':>10} {'wall':>11} {'steady':>10} {'wall':>11}"
              "   (frame pairs/s)")
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
                work = sum(r.get("seconds", 0.0) for r in FlowFolder(out).finished().values())
                rates += [summary.pairs / (work / workers) if work > 0 else float("nan"), summary.pairs / seconds]
                if sizes is None:
                    files = sorted(out.rglob("*.flow.zip"))
                    stored = sum(f.stat().st_size for f in files)
                    q = np.concatenate([load_quantized(f)[0] for f in files])
                    sizes = (method, preset, stored / len(q), jpeg_bytes(q) / len(q))
            print(f"{method + ' ' + preset:<18} {alone:>11.0f} " + " ".join(f"{r:>10.0f} " for r in rates))
        method, preset, ours, jpg = sizes
        print(f"bytes per frame pair ({method} {preset}): flow file {ours:.0f} (lossless PNG in zip), "
              f"mmaction2 JPEG q95 {jpg:.0f} (lossy): ratio {ours / jpg:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
