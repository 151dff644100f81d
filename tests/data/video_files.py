"""Small generated videos for the decoding tests: lossless (so decoded frames compare exactly), with a display
matrix, or at irregular presentation times."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

T, H, W, FPS = 30, 48, 64, 10
# (container, codec, pixel format, options): RGB-lossless, keyframe every 6 frames so that seeking is exercised.
LOSSLESS = {
    "mp4": ("libx264rgb", "rgb24", {"qp": "0", "x264-params": "keyint=6:min-keyint=6:scenecut=0"}),
    "mkv": ("ffv1", "bgr0", {"g": "6"}),
    "avi": ("ffv1", "bgr0", {"g": "6"}),  # AVI: no presentation timestamps, always decoded sequentially
}

def make_frames(num_frames: int = T) -> np.ndarray:
    """uint8 (T, H, W, 3): smooth patterns that move with t, so every frame differs from its neighbours."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([np.stack([(x * 4 + t * 7) % 256, (y * 5 + t * 3) % 256, ((x + y) * 2 + t * 11) % 256], -1)
                     for t in range(num_frames)]).astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, container: str = "mkv", rotation: int = 0, mirrored: bool = False,
                **open_options) -> Path:
    """A lossless video; ``rotation``/``mirrored``: a display matrix in its container (what phones write for portrait
    video), as av writes it (degrees counter-clockwise, then mirrored left-right)."""
    codec, pix_fmt, options = LOSSLESS[container]
    with av.open(str(path), "w", options=open_options) as c:
        stream = c.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = dict(options)
        stream.codec_context.gop_size = 6
        if rotation or mirrored:
            stream.set_display_rotation(rotation, hflip=mirrored)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path


VFR_MS = [0, 40, 80, 300, 320, 340, 360, 700, 740, 780]  # presentation times: bursts at 25 frames/s and gaps


def write_vfr(path: Path, stamps_ms: list[int]) -> Path:
    """Lossless frames at irregular presentation times (time base 1/1000), with a nominal rate of 30."""
    codec, pix_fmt, options = LOSSLESS[path.suffix[1:]]
    frames = make_frames(len(stamps_ms))
    with av.open(str(path), "w") as c:
        stream = c.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        stream.options = dict(options)
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for f, ms in zip(frames, stamps_ms):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path
