"""Training throughput: `python -m pipeline.benchmarks.train [--quick]`.

Trains for a few steps on a generated video dataset (lossless H.264, `preprocessing.synthetic`), on the CPU
(`--device cuda`: one GPU):

- **end to end**: `VideoDataModule` (decode -> segment sampling -> TSN augmentation in `--workers` DataLoader
  processes) feeding `VideoEleAttClassifier` (a timm backbone, fine-tuned, in front of an EleAtt-LSTM);
- **features**: `FeatureDataModule` over a feature folder of the same videos (random float16 features of the
  backbone's size, so that only the data path and the stack are timed) feeding `EleAttClassifier`.

For each it prints clips/s (training clips per second of step time) and the share of each step spent waiting for
data (from the end of one step to the start of the next: the DataLoader's `next()`, which is all a step waits for
when the workers keep up). The first `--warmup` steps (worker start-up, allocator warm-up) are not counted.
Target (issue 18): with 2 workers, data waiting under 20% of the step time for a resnet18-sized backbone at
8 x 112^2 clips.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.errors import quiet_broken_pipe


class StepTimer(pl.Callback):
    """Wall time of each training step, split into waiting for the batch and computing on it."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.waits: list[float] = []
        self.computes: list[float] = []
        self._end: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._end is not None and batch_idx >= self.warmup:
            self.waits.append(now - self._end)
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx >= self.warmup and self._end is not None:
            self.computes.append(now - self._start)
        self._end = now

    def summary(self, batch_size: int) -> dict:
        n = min(len(self.waits), len(self.computes))
        wait, compute = sum(self.waits[:n]), sum(self.computes[:n])
        total = wait + compute
        return {"steps": n, "clips_per_s": n * batch_size / total if total else float("nan"),
                "wait_share": wait / total if total else float("nan"),
                "step_ms": 1e3 * statistics.median([w + c for w, c in zip(self.waits, self.computes)]) if n else 0.0}


def accelerator(device: str) -> str:
    """A torch device name -> Lightning's accelerator name (cuda, cuda:N -> gpu)."""
    kind = torch.device(device).type
    return "gpu" if kind == "cuda" else kind


def _trainer(steps: int, timer: StepTimer, root: Path, device: str = "cpu") -> pl.Trainer:
    return pl.Trainer(accelerator=accelerator(device), devices=1, max_steps=steps, max_epochs=-1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer], default_root_dir=root)


def make_videos(root: Path, videos_per_class: int, frames: int, size: int) -> Path:
    from preprocessing.synthetic import make_dataset

    make_dataset(root, videos_per_class=videos_per_class, num_frames=frames, size=size, seed=0)
    return root


def bench_end_to_end(videos: Path, args, root: Path) -> dict:
    from pipeline.training.clip_data import VideoDataModule
    from pipeline.training.end_to_end import VideoEleAttClassifier

    pl.seed_everything(0, verbose=False)
    dm = VideoDataModule(str(videos), train_list=str(videos / "train.txt"), backbone=args.backbone,
                         frame_size=args.frame_size, num_segments=args.segments, batch_size=args.batch_size,
                         num_workers=args.workers)
    model = VideoEleAttClassifier(num_classes=dm.num_classes, backbone=args.backbone, weights="none",
                                  hidden_size=args.hidden_size, lr_patience=0, extraction_settings=dm.extraction_settings)
    timer = StepTimer(args.warmup)
    _trainer(args.warmup + args.steps, timer, root, getattr(args, "device", "cpu")).fit(model, dm)
    return timer.summary(args.batch_size)


def bench_features(videos: Path, args, root: Path, dim: int) -> dict:
    from pipeline.training.feature_data import FeatureDataModule
    from pipeline.data.features import FeatureFolder
    from pipeline.data.lists import read_list
    from pipeline.training.module import EleAttClassifier

    folder = FeatureFolder(root / "features")
    rng = np.random.default_rng(0)
    for entry in read_list(videos / "train.txt"):
        folder.write(entry.path, rng.normal(size=(args.frames, dim)).astype(np.float16))
    pl.seed_everything(0, verbose=False)
    dm = FeatureDataModule(str(root / "features"), train_list=str(videos / "train.txt"), num_steps=args.segments,
                           batch_size=args.batch_size, num_workers=args.workers)
    model = EleAttClassifier(input_size=dm.feature_dim, num_classes=dm.num_classes, hidden_size=args.hidden_size)
    timer = StepTimer(args.warmup)
    _trainer(args.warmup + args.steps, timer, root, getattr(args, "device", "cpu")).fit(model, dm)
    return timer.summary(args.batch_size)


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.train",
        description="Clips/s and the share of each step spent waiting for data, for end-to-end training (videos -> "
                    "backbone -> EleAtt stack) and for training on stored features, on the CPU or one GPU.")
    parser.add_argument("--backbone", default="resnet18", help="timm backbone (default resnet18; random weights)")
    parser.add_argument("--frame-size", type=int, default=112, help="input height = width (default 112)")
    parser.add_argument("--segments", type=int, default=8, help="frames per clip, one per segment (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per step (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--hidden-size", type=int, default=512, help="EleAtt-LSTM hidden size (default 512)")
    parser.add_argument("--frames", type=int, default=64, help="frames per generated video (default 64)")
    parser.add_argument("--video-size", type=int, default=128, help="generated video height = width (default 128)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (one GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: test_resnet, 64 px, 4 segments, batch 2, 3 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.frame_size, args.segments, args.batch_size = "test_resnet", 64, 4, 2
        args.steps, args.warmup, args.hidden_size, args.frames, args.video_size = 3, 1, 64, 16, 64
    for name in ("frame_size", "segments", "batch_size", "steps", "hidden_size", "frames", "video_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0 or args.warmup < 1:
        parser.error("--workers must be >= 0 and --warmup >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|eval mode at the start|LeafSpec).*")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

    from pipeline.nn.backbone import FrameEncoder

    dim = FrameEncoder(args.backbone, weights="none").num_features
    needed = args.batch_size * (args.warmup + args.steps)
    per_class = max(4, -(-2 * needed // 10))  # 10 classes, about half of each in train.txt: one epoch covers the run
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; backbone "
          f"{args.backbone} (D={dim}, random weights, fine-tuned), clips {args.segments} x {args.frame_size}^2, "
          f"batch {args.batch_size}, {args.workers} workers, {args.steps} timed steps after {args.warmup}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="eleatt-bench-train-") as tmp:
        root = Path(tmp)
        videos = make_videos(root / "videos", per_class, args.frames, args.video_size)
        rows = [("end to end", bench_end_to_end(videos, args, root)),
                ("features", bench_features(videos, args, root, dim))]
    print(f"{'training':<12} {'steps':>5} {'clips/s':>8} {'step ms':>8} {'data wait':>9}")
    for name, r in rows:
        print(f"{name:<12} {r['steps']:>5} {r['clips_per_s']:>8.2f} {r['step_ms']:>8.1f} {100 * r['wait_share']:>8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
