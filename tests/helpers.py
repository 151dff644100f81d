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


def write_rotated_video(path: str | os.PathLike, frames: np.ndarray, degrees: int = 90, fps: int = 12) -> None:
    """A lossless H.264 .mp4 of uint8 (T, H, W, 3) `frames` stored as given, with a display matrix that rotates them
    by `degrees` counter-clockwise (a phone's portrait video stored landscape). Shown as FFmpeg shows it, frame t is
    `np.rot90(frames[t], degrees // 90)`. Needs PyAV's `set_display_rotation` (PyAV 14+)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        stream.set_display_rotation(degrees)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


ROTATED_FRAMES = dict(name="grow", index=77)  # the rotated video's frames: render_video(name, video_seed(0, name, i))


def make_video_folder(root: Path, per_class: int = 4, frames: int = 12, size: int = 32, bad: bool = True) -> dict:
    """A folder of class sub-folders of your own videos, as `eleatt run` takes it: `per_class` generated videos in
    each of grow, shrink and brighten; with `bad`, also a damaged file (the first half of a video), a one-frame
    video, `brighten/twin.avi` beside `brighten/twin.mp4`, and a video stored landscape with a 90-degree display
    rotation. Returns {"root", "damaged", "one_frame", "twins", "rotated", "rotated_frames" (as stored)}."""
    from preprocessing.synthetic import render_video, video_seed, write_lossless_video

    for name in ("grow", "shrink", "brighten"):
        for k in range(per_class):
            write_lossless_video(root / name / f"{name}_{k}.mp4", render_video(name, video_seed(0, name, k), frames, size))
    out = {"root": root}
    if not bad:
        return out
    data = (root / "grow" / "grow_0.mp4").read_bytes()
    (root / "grow" / "damaged.mp4").write_bytes(data[: len(data) // 2])
    write_lossless_video(root / "shrink" / "one_frame.mp4", render_video("shrink", video_seed(0, "shrink", 99), frames,
                                                                         size)[:1])
    write_lossless_video(root / "brighten" / "twin.mp4", render_video("brighten", video_seed(0, "brighten", 50),
                                                                      frames, size))
    write_lossless_video(root / "brighten" / "twin.avi", render_video("brighten", video_seed(0, "brighten", 51),
                                                                      frames, size))
    stored = render_video(ROTATED_FRAMES["name"], video_seed(0, ROTATED_FRAMES["name"], ROTATED_FRAMES["index"]),
                          frames, size + size // 4)[:, :, size // 8: size + size // 8]  # (T, 5/4 size, size): taller
    # than wide, shown size high (the smallest side DIS flow takes at size 32)
    write_rotated_video(root / "grow" / "rotated.mp4", stored)
    out.update(damaged="grow/damaged.mp4", one_frame="shrink/one_frame.mp4",
               twins=("brighten/twin.avi", "brighten/twin.mp4"), rotated="grow/rotated.mp4", rotated_frames=stored)
    return out
