"""Helpers the tests share (not part of the package): computing flow for frames in memory, a folder's flow stacks,
and a check that a plot is not blank."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.flow_estimation import DEFAULT_PRESET, DEFAULT_SHORT_SIDE, estimator_for, target_size
from pipeline.data.flow_files import FlowFolder, FlowOptions, flow_stack, quantize
from pipeline.errors import UsageError


def compute_flow(frames: np.ndarray, method: str = "dis", preset: str = DEFAULT_PRESET,
                 short_side: int | None = DEFAULT_SHORT_SIDE, bound: float = 20.0, estimator=None) -> np.ndarray:
    """Quantised flow uint8 ``(T-1, 2, h, w)`` (x, y) between consecutive frames uint8 ``(T, H, W, 3)`` RGB.

    The same computation as `eleatt flow` does per video (``video_flow`` in chunks): greyscale (RAFT: RGB) at the
    short side, flow from frame ``i`` to ``i + 1``, clipped and quantised with ``bound``. Pass ``estimator`` (e.g.
    a loaded RAFT) to reuse one; OpenCV's are made afresh (see ``preprocessing/flow.py``'s ``_estimator``).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise UsageError(f"compute_flow needs frames (T >= 2, H, W, 3), got {tuple(frames.shape)}: no frame pairs")
    if estimator is None:
        estimator = estimator_for(FlowOptions(method=method, preset=preset, short_side=short_side, bound=bound))
    size = target_size(frames.shape[1], frames.shape[2], short_side)
    images = estimator.prepare(frames, size)
    return np.stack([quantize(f.transpose(2, 0, 1), bound) for f in estimator.flows(images)])  # (T-1, 2, h, w)


def folder_stack(folder: FlowFolder, video: str, positions: Sequence[int] | np.ndarray, length: int = 5,
                 normalize: bool = True) -> np.ndarray:
    """``flow_stack`` of a flow folder's file for ``video``: float32 ``(P, 2L, H, W)``, x1, y1, ..., xL, yL."""
    return flow_stack(folder.existing(video), positions, length, normalize)


def image_is_blank(path: str | os.PathLike) -> bool:
    """True when a PNG is one colour (a failed plot); used by the tests and as a cheap self-check."""
    import matplotlib.image

    pixels = np.asarray(matplotlib.image.imread(path))
    return bool(np.all(pixels == pixels.reshape(-1, pixels.shape[-1])[0]))
