"""Feature extraction speed: end-to-end frames/s of `eleatt extract` next to the backbone alone, same process.

    python -m pipeline.benchmarks.extract            # a light backbone and resnet50 at 224, speed switches
    python -m pipeline.benchmarks.extract --quick    # a smaller, faster run of the same table

For each configuration the backbone alone runs on random tensors of the extraction's batch shape, then the whole
extraction (decoding generated lossless H.264 videos, resizing, cropping, the network, writing the feature folder)
runs in the same process with the same batch size. `ratio` = end-to-end / backbone alone, both in steady state
(end to end: after the first batch, so worker start-up and compilation are excluded; `cold` includes them).
Target: ratio >= 0.85 for resnet50 (decoding and writing hidden behind the network). `busy` (CPU runs) is the
share of the end-to-end loop spent inside the network: unlike the ratio it does not drift with the load of a
shared machine, and 1 - busy is the pipeline overhead that was not hidden. Weights are random (`--weights none`):
speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from pipeline.errors import quiet_broken_pipe
from pipeline.nn.backbone import FrameEncoder
from preprocessing.extract import quiet_extraction_logs, default_workers, extract
from preprocessing.synthetic import CLASSES, render_video, video_seed, write_lossless_video


def make_videos(root: Path, num_videos: int, num_frames: int, size: int) -> Path:
    """`num_videos` generated videos of `num_frames` frames, `size` x `size`, and a list of them; returns the list."""
    lines = []
    for k in range(num_videos):
        name = CLASSES[k % len(CLASSES)]
        rel = f"videos/{name}_{k}.mp4"
        write_lossless_video(root / rel, render_video(name, video_seed(0, name, k), num_frames, size), fps=25)
        lines.append(f"{rel} {k % len(CLASSES)}\n")
    path = root / "bench.txt"
    path.write_text("".join(lines))
    return path


def backbone_alone(name: str, batch_size: int, device: str, precision: str, compile: bool, seconds: float) -> float:
    """Images/s of the encoder on random (B, 3, H, W) input at its data config's size, after warm-up."""
    encoder = FrameEncoder(name, weights="none").to(device)
    model = torch.compile(encoder) if compile else encoder
    _, h, w = encoder.data_config["input_size"]
    x = torch.randn(batch_size, 3, h, w, device=device)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())

    def step() -> None:
        with torch.inference_mode(), autocast:
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        step()
        n += 1
    return n * batch_size / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> int:
    quiet_extraction_logs()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.videos} videos x {args.frames} frames of {args.size}x{args.size} (lossless H.264)")
    configs = []
    for name in args.backbones:
        configs.append((name, "32", False, args.workers[0]))
        if not args.quick:
            configs += [(name, "32", False, w) for w in args.workers[1:]]
            configs += [(name, p, False, args.workers[0]) for p in args.precisions if p != "32"]
            if args.compile:
                configs.append((name, "32", True, args.workers[0]))
    header = (f"{'backbone':<16}{'prec':>5}{'compile':>8}{'workers':>8}{'batch':>6} | {'alone':>9} "
              f"{'end2end':>9} {'cold':>9} {'ratio':>6} {'busy':>6}   (frames/s; busy: network share of the loop)")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="eleatt-bench-") as tmp:
        root = Path(tmp)
        list_path = make_videos(root, args.videos, args.frames, args.size)
        for i, (name, precision, compile, workers) in enumerate(configs):
            # The backbone alone before and after the extraction, averaged: on a shared machine the load drifts.
            before = backbone_alone(name, args.batch_size, device, precision, compile, args.seconds / 2)
            start = time.perf_counter()
            summary = extract(list_path, root, root / f"out{i}", name, weights="none", batch_size=args.batch_size,
                              workers=workers, device=device, precision=precision, compile=compile, progress=False)
            wall = time.perf_counter() - start
            alone = (before + backbone_alone(name, args.batch_size, device, precision, compile, args.seconds / 2)) / 2
            assert summary.done == args.videos and not summary.failed, summary
            stats = summary.stats
            e2e = stats.steady_rate
            cold = stats.images / stats.seconds
            busy = f"{stats.network_seconds / stats.steady_seconds:.2f}" if stats.network_seconds else "-"
            print(f"{name:<16}{precision:>5}{'yes' if compile else 'no':>8}{workers:>8}{args.batch_size:>6} | "
                  f"{alone:>9.1f} {e2e:>9.1f} {cold:>9.1f} {e2e / alone:>6.2f} {busy:>6}   (whole command {wall:.1f} s)",
                  flush=True)
    return 0


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, shorter videos; only the default switches")
    p.add_argument("--backbones", nargs="+", default=None,
                   help="timm names (default: resnet18 resnet50; --quick: test_resnet resnet50)")
    p.add_argument("--videos", type=int, default=None, help="generated videos (default 12; --quick 4)")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default 48; --quick 16)")
    p.add_argument("--size", type=int, default=256, help="video side in pixels (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="DataLoader workers to compare; the first is used for the other switches "
                        "(default: the command's default, then 0, 1, 2)")
    p.add_argument("--precisions", nargs="+", default=["32", "bf16"], help="precisions to compare (default 32 bf16)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the backbone")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seconds", type=float, default=None, help="time per backbone-alone measurement (default 5; --quick 2)")
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    first = default_workers(device)
    args.workers = args.workers or [first] + [w for w in (0, 1, 2) if w != first]
    args.backbones = args.backbones or (["test_resnet", "resnet50"] if args.quick else ["resnet18", "resnet50"])
    args.videos = args.videos or (4 if args.quick else 12)
    args.frames = args.frames or (16 if args.quick else 48)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
