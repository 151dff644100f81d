"""`eleatt extract`: per-frame features of a timm backbone for every video of a list, into a feature folder.

One code path for one process, several GPUs and several nodes: a Lightning `Trainer.predict` over a stream of
frame batches (decoded and transformed in DataLoader workers, so decoding overlaps the network) and a prediction
writer that assembles each video's features and stores them through `FeatureFolder` (atomic file, then manifest
record). Each rank takes a disjoint strided share of the videos not finished yet and writes its own manifest and
failure shards, so a run killed at any moment resumes, with any number of ranks, with every video exactly once.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.data.features import (MAX_STACK, PRECISIONS, FeatureFolder, FeatureSettings, SettingsMismatchError,
                                    number_in)
from pipeline.data.flow_files import FlowFile, FlowFolder, FlowOptions, flow_data_config
from pipeline.data.video import backend_names, close_readers
from pipeline.data.views import DECODE_CHUNK, video_views
from pipeline.data.lists import read_list
from pipeline.data.sampling import Sampling
from pipeline.data.transforms import VIEW_COUNTS
from pipeline.devices import resolve_device
from pipeline.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, InputNotFoundError, UsageError
from pipeline.nn.backbone import FrameEncoder

from pipeline.paths import check_not_input, ensure_writable_dir

VIEWS = tuple(VIEW_COUNTS)
MODALITIES = ("rgb", "flow")
DEFAULT_STACK = 5  # flow fields per flow-stream input (TSN's L)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# What to extract
# --------------------------------------------------------------------------------------------------------------
def make_settings(encoder: FrameEncoder, sampling: Sampling, views: str, precision: str) -> FeatureSettings:
    """The feature folder's settings for RGB frames encoded by `encoder`."""
    return FeatureSettings(
        modality="rgb", backbone=encoder.name, weights=encoder.weights, data_config=encoder.data_config,
        in_chans=encoder.in_chans, sampling=sampling, views=views, dtype="float16", dim=encoder.num_features,
        precision=precision,
    )


def make_flow_settings(encoder: FrameEncoder, flow: FeatureSettings, stack: int, sampling: Sampling, views: str,
                       precision: str) -> FeatureSettings:
    """The feature folder's settings for stacks of `stack` flow fields from a flow folder with settings `flow`,
    encoded by `encoder` (in_chans = 2 * stack). The flow folder's options (method, preset, short side, bound, ...)
    are kept, so that classify can compute a new video's flow the same way."""
    return FeatureSettings(
        modality="flow", backbone=encoder.name, weights=encoder.weights,
        data_config=flow_data_config(encoder.data_config, stack), in_chans=encoder.in_chans, sampling=sampling,
        views=views, dtype="float16", dim=encoder.num_features, precision=precision, stack=stack,
        options=FlowOptions.of(flow).to_options(),
    )


def open_flow_folder(root: str | os.PathLike) -> FeatureSettings:
    """The settings of the flow folder `root` (--root with --modality flow), or a clear error."""
    settings = FlowFolder(root).settings
    if settings is None or settings.modality != "flow":
        what = "has no settings.json" if settings is None else f"holds {settings.modality!r} features"
        raise InputNotFoundError(f"--modality flow: --root '{root}' is not a flow folder ({what}); compute one with "
                                "`eleatt flow --list LIST --root VIDEOS --out FLOW_DIR` and pass --root FLOW_DIR")
    FlowOptions.of(settings, FlowFolder(root).settings_path)  # readable options, or a clear error
    return settings


def shard(videos: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This rank's disjoint strided share of `videos` (every video in exactly one share, any count)."""
    return list(videos[rank::world_size])


# --------------------------------------------------------------------------------------------------------------
# Frames in: decoding and preprocessing in DataLoader workers, packed into batches of images
# --------------------------------------------------------------------------------------------------------------
class FrameBatches(IterableDataset):
    """Streams batches of at most `batch_size` preprocessed images from the frames of `videos`.

    A batch packs consecutive pieces of videos (a long video spans several batches, short ones share a batch),
    so that the network always sees full batches. Each worker takes a strided share of the videos.

    Yields dicts:
        images: float32 (N, C, H, W), N <= batch_size (at least one frame's V views); per piece the images of
            its `count` frames, view-major: (V, count) flattened.
        pieces: list of {video, start, count, total, views, source_frames, source_fps}: frames
            [start, start + count) of `total` sampled frames of `video`.
        errors: list of (video, message) of videos that failed (decoding, sampling, preprocessing).
    """

    def __init__(self, root: str | os.PathLike, videos: Sequence[str], settings: FeatureSettings,
                 batch_size: int = 64, backend: str = "auto") -> None:
        super().__init__()
        self.root = Path(root)
        self.videos = list(videos)
        self.settings = settings
        self.num_views = settings.num_views
        self.batch_size = batch_size
        self.backend = backend
        self.flow_fps: dict[str, float] = {}
        self.chunk = DECODE_CHUNK
        if settings.modality == "flow":
            # Flow files written before they recorded the frame rate: the flow folder's manifest has it (a value
            # that is not a positive frame rate is damage, and ignored: the file's own or none).
            records = FlowFolder(self.root).finished(verify=False)
            self.flow_fps = {v: float(r["source_fps"]) for v, r in records.items() if number_in(r.get("source_fps"), 0)}
            # A position reads `stack` flow fields: fewer positions per chunk for longer stacks, so that a chunk
            # holds as many fields (and images as many values) as DECODE_CHUNK positions of TSN's 5.
            self.chunk = max(1, min(DECODE_CHUNK, DECODE_CHUNK * DEFAULT_STACK // settings.stack))

    def source(self, video: str):
        """The input of `video`: its video file (RGB), or its flow file in the flow folder `root` (flow)."""
        if self.settings.modality == "flow":
            return FlowFile(FlowFolder(self.root).feature_path(video), fps=self.flow_fps.get(video))
        return self.root / video

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        mine = self.videos if worker is None else self.videos[worker.id::worker.num_workers]
        images: list[torch.Tensor] = []
        pieces: list[dict] = []
        errors: list[tuple[str, str]] = []
        filled = 0

        def flush() -> dict:
            nonlocal images, pieces, errors, filled
            batch = {"images": torch.cat(images) if images else torch.empty(0), "pieces": pieces, "errors": errors}
            images, pieces, errors, filled = [], [], [], 0
            return batch

        for video in mine:
            try:
                for chunk in video_views(self.source(video), self.settings, backend=self.backend,
                                         chunk=self.chunk):
                    piece = {"video": video, "total": chunk.total, "views": self.num_views,
                             "source_frames": chunk.source.num_frames, "source_fps": chunk.source.fps}
                    t0, count = 0, chunk.views.shape[1]
                    while t0 < count:
                        # As many frames as fill this batch (at least one frame's views), so batches stay full.
                        k = max(1, (self.batch_size - filled) // self.num_views)
                        if filled and filled + k * self.num_views > self.batch_size:
                            yield flush()
                            continue
                        x = chunk.views[:, t0:t0 + k]  # (V, k, C, H, W)
                        v, k = x.shape[:2]
                        images.append(x.reshape(v * k, *x.shape[2:]))  # view-major (V * k, C, H, W)
                        pieces.append({**piece, "start": chunk.start + t0, "count": int(k)})
                        filled += v * k
                        t0 += k
                        if filled >= self.batch_size:
                            yield flush()
            except Exception as err:  # a bad video is reported with its reason and the run goes on
                errors.append((video, f"{type(err).__name__}: {err}"))
        if images or errors:
            yield flush()


# --------------------------------------------------------------------------------------------------------------
# Network and features out
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoaderSpec:
    """How to build a rank's DataLoader; built inside the rank's process, once its rank is known."""

    root: Path
    remaining: list[str]  # the videos of the list not finished before this run, the same on every rank
    settings: FeatureSettings
    batch_size: int
    backend: str
    workers: int
    pin_memory: bool

    def build(self, rank: int, world_size: int) -> DataLoader:
        videos = shard(self.remaining, rank, world_size)
        dataset = FrameBatches(self.root, videos, self.settings, self.batch_size, self.backend)
        return DataLoader(dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                          prefetch_factor=4 if self.workers else None)


class EncoderModule(pl.LightningModule):
    """A thin LightningModule around the frame encoder: images (N, C, H, W) -> features (N, D).

    Its predict dataloader is built from `loader` with the trainer's rank, so that the share of each rank is
    right under every launcher (one process per device, torchrun, srun, spawn).
    """

    def __init__(self, encoder: FrameEncoder, loader: LoaderSpec, compile: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.loader = loader
        self.compiled = compile
        self.batch_size = loader.batch_size
        self.network_seconds = 0.0  # time in the network after the first batch (CPU only: CUDA runs async)
        if compile:
            self.encoder.model = torch.compile(self.encoder.model)

    def predict_dataloader(self) -> DataLoader:
        return self.loader.build(self.trainer.global_rank, self.trainer.world_size)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["images"]  # (N, C, H, W)
        n = images.shape[0]
        if n == 0:  # only errors in this batch
            return images.new_zeros((0, self.encoder.num_features))
        if self.compiled and self.batch_size and n < self.batch_size:
            # A compiled graph is specialised to its batch size: pad the last batch instead of recompiling.
            images = torch.cat([images, images.new_zeros((self.batch_size - n, *images.shape[1:]))])
        start = time.perf_counter()
        # The stored precision: autocast and float16 round trip as classify does them (FrameEncoder.encode_stored).
        feats = self.encoder.encode_stored(images, self.loader.settings.precision, self.loader.settings.dtype)[:n]
        if batch_idx > 0 and feats.device.type == "cpu":
            self.network_seconds += time.perf_counter() - start
        return feats


@dataclass
class RunStats:
    """What one rank did in this run."""

    videos: int = 0
    frames: int = 0  # sampled frames of the videos written
    failed: int = 0
    seconds: float = 0.0  # from the start of the predict loop to its end
    images: int = 0  # images (frames x views) through the network
    steady_images: int = 0  # ... after the first batch (worker start-up, compilation and warm-up excluded)
    steady_seconds: float = 0.0
    network_seconds: float = 0.0  # ... of which in the network (CPU runs only); the rest is pipeline overhead

    @property
    def steady_rate(self) -> float:
        """Images per second after the first batch."""
        return self.steady_images / self.steady_seconds if self.steady_seconds > 0 else 0.0


class FeatureWriter(BasePredictionWriter):
    """Assembles the features of each video from its pieces and stores them (atomically) in the feature folder.

    Runs on every rank, writing to that rank's manifest/failure shards. The device-to-host copy of a batch is
    started when it arrives and consumed one batch later, so the accelerator is not stalled waiting for it.
    """

    def __init__(self, out: str | os.PathLike, progress: bool | None = None) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.progress = progress
        self.stats = RunStats()
        self.folder: FeatureFolder | None = None
        self._partial: dict[str, list[tuple[int, np.ndarray]]] = {}
        self._received: dict[str, int] = {}
        self._pending: tuple[dict, torch.Tensor, Any] | None = None
        self._bar: tqdm | None = None
        self._start = 0.0
        self._first: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.folder = FeatureFolder(self.out, rank=trainer.global_rank if trainer.world_size > 1 else None)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        if trainer.is_global_zero:
            expected = len(trainer.predict_dataloaders.dataset.videos)  # this rank's share
            ranks = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
            self._bar = tqdm(total=expected, unit="video", desc=f"extract{ranks}",
                             disable=True if self.progress is False else None, file=sys.stderr)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        meta = {"pieces": batch["pieces"], "errors": batch["errors"]}
        feats = prediction.detach()  # (N, D)
        self.stats.images += feats.shape[0]
        if self._first is None:
            self._first = time.perf_counter()
        else:
            self.stats.steady_images += feats.shape[0]
        event = None
        if feats.device.type == "cuda":
            host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(feats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            feats = host
        else:
            feats = feats.float()
        self._drain()
        self._pending = (meta, feats, event)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drain()
        for video in list(self._partial):  # cannot happen unless a worker died mid-video: never write half
            self._fail(video, f"RuntimeError: only {self._received[video]} frames of the video arrived")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        self.stats.seconds = now - self._start
        if self._first is not None:
            self.stats.steady_seconds = now - self._first
        self.stats.network_seconds = getattr(pl_module, "network_seconds", 0.0)
        if self._bar is not None:
            self._bar.close()
        trainer.strategy.barrier("extract-done")  # every rank's files are written before anyone summarises

    def _drain(self) -> None:
        if self._pending is None:
            return
        meta, feats, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        feats = feats.numpy()
        offset = 0
        for piece in meta["pieces"]:
            v, k = piece["views"], piece["count"]
            chunk = feats[offset:offset + v * k].reshape(v, k, -1)  # (V, k, D)
            offset += v * k
            self._add(piece, chunk)
        assert offset == feats.shape[0], (offset, feats.shape)
        for video, error in meta["errors"]:
            self._fail(video, error)

    def _add(self, piece: dict, chunk: np.ndarray) -> None:
        video = piece["video"]
        self._partial.setdefault(video, []).append((piece["start"], chunk))
        self._received[video] = self._received.get(video, 0) + piece["count"]
        if self._received[video] < piece["total"]:
            return
        parts = sorted(self._partial.pop(video), key=lambda p: p[0])
        del self._received[video]
        feats = np.concatenate([p[1] for p in parts], axis=1)  # (V, T, D)
        assert feats.shape[1] == piece["total"], (video, feats.shape, piece["total"])
        try:
            self.folder.write(video, feats[0] if feats.shape[0] == 1 else feats,
                              source_frames=piece["source_frames"], source_fps=piece["source_fps"])
        except ValueError as err:  # features not finite in float16: this video fails, the run goes on
            self._fail(video, f"{type(err).__name__}: {err}")
            return
        self.stats.videos += 1
        self.stats.frames += piece["total"]
        self._tick()

    def _fail(self, video: str, error: str) -> None:
        self._partial.pop(video, None)
        self._received.pop(video, None)
        self.folder.record_failure(video, error)
        self.stats.failed += 1
        self._tick()

    def _tick(self) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix(frames_s=f"{self.stats.frames / elapsed:.1f}", failed=self.stats.failed, refresh=False)


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """The state of the list in the feature folder after a run (the same on every rank)."""

    total: int
    done: int
    skipped: int
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    rank: int = 0  # global rank of this process
    stats: RunStats = field(default_factory=RunStats)  # what this rank did in this run

    @property
    def frames(self) -> int:
        return self.stats.frames

    @property
    def seconds(self) -> float:
        return self.stats.seconds

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed or self.missing else EXIT_OK


def default_workers(accelerator: str) -> int:
    """DataLoader workers by default (measured with `python -m pipeline.benchmarks.extract`, README).

    On a CPU the network already uses every core and one worker decodes far faster than it consumes (~430
    frames/s against ~23 for resnet50 on 2 cores): on a quiet 2-core machine 1 and 2 workers ran alike (end to
    end 0.98 of the backbone alone), but under load two workers stalled the network's OpenMP threads (0.57-0.66
    against 0.73-1.04 with one). A GPU consumes frames much faster, so it gets more workers, one core kept free.
    """
    cpus = os.cpu_count() or 1
    if accelerator in ("cuda", "gpu", "mps"):
        return min(8, max(1, cpus - 1))
    return 1 if cpus > 1 else 0


def _device_args(device: str, devices: str) -> tuple[str, Any]:
    """--device/--devices -> Lightning's (accelerator, devices); "cuda:1" names one GPU."""
    dev = resolve_device(device)
    return dev.type, ([dev.index] if dev.index is not None else devices)


def extract(list_path: str | os.PathLike, root: str | os.PathLike, out: str | os.PathLike, backbone: str,
            weights: str = "imagenet", fps: float | None = None, num_segments: int | None = None,
            views: str = "center", batch_size: int = 64, workers: int | None = None, device: str = "auto",
            devices: str = "1", num_nodes: int = 1, strategy: str = "auto", precision: str = "32",
            compile: bool = False, backend: str = "auto", progress: bool | None = None, modality: str = "rgb",
            stack: int | None = None) -> Summary:
    """Extracts the features of every video of `list_path` not yet in `out`; see `eleatt extract --help`.

    `modality="flow"`: `root` is a flow folder (`eleatt flow`); each list path's flow file (named as
    `FlowFolder.feature_path` names it) gives stacks of `stack` (default 5) flow fields, 2 * stack channels.

    Raises ValueError / FileNotFoundError (incl. SettingsMismatchError, MissingWeightsError) on bad arguments.
    Returns the summary of the list's state after the run.
    """
    if views not in VIEWS:
        raise UsageError(f"--views {views!r}: expected one of {', '.join(VIEWS)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if modality not in MODALITIES:
        raise UsageError(f"--modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    if stack is None:
        stack = DEFAULT_STACK if modality == "flow" else 1
    if isinstance(stack, bool) or not isinstance(stack, int) or stack < 1:
        raise UsageError(f"--stack {stack}: must be an integer >= 1 (flow fields per input; TSN uses 5)")
    if stack > MAX_STACK:
        # Memory grows with the stack: every image has 2L channels (a batch of 64 images at L = 1000 would be
        # 25 GB), while a clip's fields beyond its end only repeat its last one.
        raise UsageError(f"--stack {stack}: at most {MAX_STACK} flow fields per input (each input image has 2L "
                         "channels, so memory grows with L; TSN uses 5, two-stream networks 10)")
    if modality == "rgb" and stack != 1:
        raise UsageError(f"--stack {stack} is for --modality flow (stacks of flow fields); RGB frames are not stacked")
    sampling = Sampling(fps=fps, num_segments=num_segments)
    root = Path(root)
    if not root.is_dir():
        what = "flow folder" if modality == "flow" else "video root"
        raise InputNotFoundError(f"{what} '{root}' is not a folder (--root: the folder the list's paths are relative to)")
    check_not_input(out, [root, list_path], "--out feature folder")
    flow_settings = open_flow_folder(root) if modality == "flow" else None
    entries = read_list(list_path)
    videos = list(dict.fromkeys(e.path for e in entries))  # a video listed twice is extracted once
    accelerator, devices = _device_args(device, devices)
    workers = default_workers(accelerator) if workers is None else workers
    if workers < 0:
        raise UsageError(f"--workers {workers}: must be >= 0")

    ensure_writable_dir(out, "--out feature folder")
    folder = FeatureFolder(out)
    targets: dict[Path, str] = {}
    for video in videos:  # every path must map under the folder, each to its own file: fail before any work
        target = folder.feature_path(video)
        if target in targets:
            raise UsageError(
                f"list '{list_path}': videos '{targets[target]}' and '{video}' would both be stored as "
                f"'{folder.relative(target)}' (feature files are named by the list path without its extension); "
                "rename one of them, or extract them into separate folders (--out) from separate lists"
            )
        targets[target] = video

    # The trainer first: a device/strategy the machine cannot run is a usage error and must leave no folder behind.
    try:
        trainer = pl.Trainer(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
            precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False, inference_mode=True,
        )
    except (MisconfigurationException, TypeError) as err:
        raise UsageError(
            f"--device {device} --devices {devices} --num-nodes {num_nodes} --strategy {strategy}: {err} "
            "(check the device flags against the machine: --device cpu, or a count of GPUs it has)"
        ) from None
    encoder = FrameEncoder(backbone, weights=weights, in_chans=2 * stack if modality == "flow" else 3)
    # One writer per folder: a second `extract` (or `flow`) into it is refused while this one runs. Rank 0 holds the
    # lock for all the ranks of this run; the system drops it when the process ends, however it ends.
    held = folder.lock("extract") if trainer.global_rank == 0 else contextlib.nullcontext()
    with held:
        wanted = (make_flow_settings(encoder, flow_settings, stack, sampling, views, precision)
                  if modality == "flow" else make_settings(encoder, sampling, views, precision))
        settings = folder.check_settings(wanted)
        # Every process reads the folder *before* joining the process group (inside predict; spawned ranks get this
        # list from their parent) and no rank writes before all have joined, so all ranks see the same remaining
        # videos and their strided shares are disjoint.
        before = folder.finished()
        remaining = [v for v in videos if v not in before]
        if trainer.global_rank == 0:
            stale = folder.remove_stale_temporaries()  # left by a killed run; nobody writes yet
            if stale:
                log.info("removed %d temporary files left by an interrupted run", stale)

        stats = RunStats()
        if remaining:
            spec = LoaderSpec(root, remaining, settings, batch_size, backend, workers,
                              pin_memory=accelerator in ("cuda", "gpu"))
            writer = FeatureWriter(out, progress=progress)
            trainer.callbacks.append(writer)
            try:
                trainer.predict(EncoderModule(encoder, spec, compile=compile), return_predictions=False)
            finally:
                close_readers()  # this process's decoding processes (DataLoader workers stop their own)
            stats = writer.stats

        # Each file is checked once per run: those found whole before it are not checked again, only the new ones.
        after = folder.finished(known=before)
        failed_now = folder.failed(finished=after)
    return Summary(
        total=len(videos),
        done=sum(1 for v in remaining if v in after),
        skipped=len(videos) - len(remaining),
        failed={v: failed_now[v] for v in videos if v not in after and v in failed_now},
        missing=[v for v in videos if v not in after and v not in failed_now],
        rank=trainer.global_rank,
        stats=stats,
    )


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser

    p = command_parser(
        prog="eleatt extract",
        description="Extract per-frame features of a timm backbone for every video of a list into a feature folder "
                    "(--modality flow: per-position features of flow stacks read from a flow folder) "
                    "(one float16 .npy per video, (T, D) or (V, T, D) with views, plus settings.json and manifest). "
                    "Resumable: finished videos are skipped, failed ones retried; a killed run restarts cleanly.",
        epilog="exit status: 0 all videos done, 3 some failed (each listed), 2 usage error or refused run. "
               "Several GPUs: --devices 4; several nodes: launch one process per GPU with torchrun or srun "
               "and pass --devices/--num-nodes (see the README).",
    )
    p.add_argument("--list", required=True, help="list file: '<relative path> <label>' per line")
    p.add_argument("--root", required=True,
                   help="folder the list's video paths are relative to; with --modality flow, the flow folder of "
                        "`eleatt flow` (each list path's .flow.zip)")
    p.add_argument("--modality", choices=MODALITIES, default="rgb",
                   help="rgb (video frames, default) or flow (stacks of optical flow fields from a flow folder)")
    p.add_argument("--stack", type=int, default=None,
                   help=f"--modality flow: flow fields per input, interleaved x1, y1, ..., xL, yL = 2L channels "
                        f"(default {DEFAULT_STACK}, as TSN); the backbone's first conv takes 2L channels")
    p.add_argument("--out", required=True, help="feature folder to create or resume")
    p.add_argument("--backbone", required=True, help="timm model name, e.g. resnet50, efficientnet_b0, vit_small_patch16_224")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (timm's pretrained weights; needs the hub or its cache), none (random), or PATH "
                        "to a .safetensors/.pth/.bin state dict (default: imagenet)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fps", type=float, default=None,
                       help="resample every video to F frames per second (a video at or below F keeps every frame)")
    group.add_argument("--num-segments", type=int, default=None, help="N frames per video, at the centres of N equal segments")
    p.add_argument("--views", choices=VIEWS, default="center",
                   help="spatial views per frame: center crop (stored (T, D)), three or ten crops (stored (V, T, D))")
    p.add_argument("--batch-size", type=int, default=64, help="images (frames x views) per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes decoding and transforming (default: 1 on a CPU, "
                        "min(8, CPUs - 1) on a GPU; 0: in process)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N or mps")
    p.add_argument("--devices", default="1", help="devices per node: a count, 'auto', or ids like '0,1' (default 1)")
    p.add_argument("--num-nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy for several devices, e.g. ddp (default auto)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="32",
                   help="32, or bf16 / 16 autocast of the network (default 32; recorded in the settings)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (pays off on long runs)")
    p.add_argument("--backend", choices=[b for b in backend_names() if b != "rawframes"], default="auto",
                   help="video decoder (default auto: PyAV, or torchcodec/decord for dense reads where verified); "
                        "a read that does not finish within its deadline fails that video (floor: "
                        "ELEATT_DECODE_TIMEOUT seconds, default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def quiet_extraction_logs() -> None:
    """Lightning's banners and tips (GPU available, litlogger, process-group set-up) would bury our own output."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*infer the batch indices.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_extraction_logs()
    try:
        summary = extract(
            args.list, args.root, args.out, args.backbone, weights=args.weights, fps=args.fps,
            num_segments=args.num_segments, views=args.views, batch_size=args.batch_size, workers=args.workers,
            device=args.device, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
            precision=args.precision, compile=args.compile, backend=args.backend,
            progress=False if args.no_progress else None, modality=args.modality, stack=args.stack,
        )
    except (ValueError, FileNotFoundError) as err:
        kind = "refused" if isinstance(err, SettingsMismatchError) else "error"
        print(f"eleatt extract: {kind}: {err}", file=sys.stderr)
        return EXIT_USAGE
    if summary.rank == 0:
        _print_summary(summary, args.out)
    return summary.exit_code


def _print_summary(s: Summary, out: str) -> None:
    rate = f"; {s.frames / s.seconds:.1f} frames/s on this process" if s.seconds > 0 and s.frames else ""
    print(f"extract: {s.done} done, {s.skipped} skipped, {len(s.failed)} failed of {s.total} videos -> {out}{rate}")
    for video, error in s.failed.items():
        print(f"  failed: {video}: {error}")
    for video in s.missing:
        print(f"  missing (no record; rerun to retry): {video}")
    if s.failed or s.missing:
        print("rerun the same command to retry them (finished videos are skipped)")


if __name__ == "__main__":
    sys.exit(main())
