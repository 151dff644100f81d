"""The data side of the path from an input to features: a source (a video) and its `FeatureSettings` -> the
backbone's evaluation views, in bounded chunks. `eleatt extract`, `classify` and streaming all call this.

The one place that knows how each modality's source is read: `open_source` (the branch per modality).
Everything after it (chunking, views, normalisation) is shared, and the model side (`FrameEncoder`) only sees
images `(N, in_chans, H, W)`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.data.features import FeatureSettings
from pipeline.data.flow_files import FlowArray, FlowFile, stack_levels
from pipeline.data.transforms import eval_views
from pipeline.data.video import load_frames, probe
from pipeline.errors import UsageError

__all__ = ["DECODE_CHUNK", "ViewChunk", "SourceInfo", "open_source", "video_views"]

# Source frames read at once: bounds the memory of one long video (64 frames of 1080p RGB ~ 400 MB).
DECODE_CHUNK = 64


@dataclass(frozen=True)
class SourceInfo:
    """What sampling needs to know of a source: its length in items (frames) and their rate (for a
    variable-frame-rate video, the mean rate, and `times`: each frame's time in seconds, which fps sampling follows)."""

    num_frames: int
    fps: float
    times: np.ndarray | None = None


@dataclass
class ViewChunk:
    """Steps `[start, start + views.shape[1])` of a source's `total` sampled steps, as backbone inputs.

    views: float32 `(V, t, C, H, W)`, normalised, V = the settings' views, C = `in_chans`.
    """

    start: int
    total: int
    views: torch.Tensor
    source: SourceInfo


def open_source(path: str | os.PathLike | FlowFile | FlowArray, settings: FeatureSettings,
                backend: str = "auto") -> tuple[SourceInfo, Callable[[np.ndarray], torch.Tensor]]:
    """The source at `path` for a stream of `settings.modality`: its length and rate, and a reader that returns the
    images of sampled steps, `indices` int64 (t,) -> `(t, H, W, in_chans)` (uint8, or float in [0, 1]), before views.

    The one branch per modality on the way to features; everything after it (sampling, chunks, views,
    normalisation, the backbone) is shared. RGB decodes frames. Flow (`path`: a `.flow.zip` file, a `FlowFile` or a
    `FlowArray` in memory) is sampled over its T - 1 flow fields like frames, and each sampled position `t` reads
    the `settings.stack` (L) fields t .. t+L-1 (the last repeated near the end) as uint8 levels interleaved
    x1, y1, ..., xL, yL: 2L channels (`stack_levels`).
    """
    if settings.modality == "rgb":
        info = probe(path)
        return (SourceInfo(int(info.num_frames), float(info.fps), info.times),
                lambda idx: load_frames(path, idx, backend=backend))
    if settings.modality == "flow":
        source = path if isinstance(path, (FlowFile, FlowArray)) else FlowFile(path)
        if source.pairs < 1:
            raise UsageError(f"'{source}' has no flow fields (its video has fewer than 2 frames)")
        if settings.sampling.mode == "fps" and not source.fps:
            raise UsageError(f"'{source}' records no frame rate, which fps sampling needs; compute the flow again "
                             "with `eleatt flow`, or extract with --num-segments or every field")
        if settings.in_chans != 2 * settings.stack:
            raise UsageError(f"flow settings with stack {settings.stack} need in_chans {2 * settings.stack}, "
                             f"not {settings.in_chans}")
        return (SourceInfo(source.pairs, float(source.fps or 0.0)),
                lambda idx: torch.from_numpy(stack_levels(source, idx, settings.stack)))
    raise UsageError(f"modality {settings.modality!r} has no input path to a backbone (supported: 'rgb', 'flow')")


def video_views(path: str | os.PathLike | FlowFile | FlowArray, settings: FeatureSettings, backend: str = "auto",
                chunk: int = DECODE_CHUNK) -> Iterator[ViewChunk]:
    """The evaluation views of every sampled step of the source at `path`, in temporal order.

    Reads at most `chunk` source steps at a time and yields them as views of at most `max(1, chunk // V)` steps
    (so at most about `chunk` images per yield whatever the views). Raises (VideoReadError, ValueError, ...)
    for an unreadable source.
    """
    if chunk < 1:
        raise UsageError(f"chunk must be >= 1, got {chunk}")
    if settings.data_config is None:
        raise UsageError("settings without a data_config cannot make backbone views (no backbone recorded)")
    info, read = open_source(path, settings, backend)
    indices = settings.sampling.indices(info.num_frames, info.fps, info.times)  # (T,)
    total = int(len(indices))
    per_yield = max(1, chunk // settings.num_views)
    for d0 in range(0, total, chunk):
        frames = read(indices[d0:d0 + chunk])  # (t, H, W, C)
        for t0 in range(0, frames.shape[0], per_yield):
            views = eval_views(frames[t0:t0 + per_yield], settings.data_config, settings.views,
                               flow=settings.modality == "flow")  # (V, t, C, H, W)
            yield ViewChunk(d0 + t0, total, views, info)
