"""Pure frame-index samplers: (number of frames, settings, train/test, rng) -> int64 indices into a video.

Every sampler returns a 1-D ``np.ndarray`` of dtype int64 with values in ``[0, num_frames)``, in temporal order
(non-decreasing, except where ``pad="loop"`` wraps around). Randomness comes only from the ``rng`` argument
(a ``np.random.Generator``); test mode (``train=False``) is deterministic and ignores ``rng``. Videos shorter than
asked never crash: segment samplers repeat frames, clip samplers follow an explicit ``pad`` policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
from pipeline.errors import UsageError

__all__ = ["Pad", "PAD_POLICIES", "VIEW_COUNTS", "segment_indices", "clip_indices", "fps_indices", "fps_frames",
           "fps_times", "sequence_indices", "Sampling"]

Pad = Literal["loop", "repeat_last"]
PAD_POLICIES: tuple[str, ...] = ("loop", "repeat_last")
# Test-time spatial views per sampled frame (centre crop, three crops, ten crops) -> crops per frame. Here, with no
# torch import, so that feature-folder settings (and `eleatt flow`) can check a views name without loading torch.
VIEW_COUNTS = {"center": 1, "three": 3, "ten": 10}


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    """`value` as an int >= minimum, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        what = "video/sequence is empty" if name in ("num_frames", "length") else "nothing to sample"
        raise UsageError(f"{name} must be >= {minimum}, got {value} ({what}; check the input or the setting)")
    return int(value)


def _train_rng(rng: np.random.Generator | None, fn: str) -> np.random.Generator:
    if rng is None:
        raise UsageError(
            f"{fn}(train=True) needs a random generator: pass rng=np.random.default_rng(seed) "
            "(or train=False for deterministic test-mode sampling)"
        )
    return rng


def segment_indices(
    num_frames: int, num_segments: int, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
    """TSN segment sampling: split ``[0, num_frames)`` into ``num_segments`` equal spans, one frame from each.

    Training draws a uniformly random frame inside each span; testing takes each span's centre frame
    (TSN's ``int(tick / 2 + tick * k)``). Spans are real-valued, so a video with fewer frames than segments
    still works: neighbouring segments then share (repeat) frames, and the result stays non-decreasing.

    Returns:
        int64 ``(num_segments,)``, non-decreasing, values in ``[0, num_frames)``.
    """
    num_frames = _check_count("num_frames", num_frames)
    num_segments = _check_count("num_segments", num_segments)
    span = num_frames / num_segments
    starts = np.arange(num_segments, dtype=np.float64) * span
    if train:
        offsets = _train_rng(rng, "segment_indices").random(num_segments) * span  # in [0, span)
    else:
        offsets = np.full(num_segments, span / 2.0)
    idx = np.floor(starts + offsets).astype(np.int64)
    # floor(start + u * span) < end <= num_frames mathematically; the clip guards float round-off only.
    return np.clip(idx, 0, num_frames - 1)


def clip_indices(
    num_frames: int,
    clip_len: int,
    frame_interval: int = 1,
    num_clips: int = 1,
    train: bool = False,
    rng: np.random.Generator | None = None,
    pad: Pad = "loop",
) -> np.ndarray:
    """Dense clips (mmaction2 ``SampleFrames``): ``num_clips`` clips of ``clip_len`` frames, ``frame_interval`` apart.

    A clip spans ``(clip_len - 1) * frame_interval + 1`` frames. The valid start range ``[0, num_frames - span]``
    is cut into ``num_clips`` equal slots; training draws a random start inside each slot (one random start over
    the whole video when ``num_clips == 1``), testing takes each slot's centre (evenly spaced clips, the middle
    clip when ``num_clips == 1``).

    A video shorter than one clip follows ``pad``: ``"loop"`` wraps around to the first frame
    (``index % num_frames``; training also draws a random start frame), ``"repeat_last"`` reads the whole video
    from frame 0 and repeats its last frame.

    Returns:
        int64 ``(num_clips * clip_len,)``, clip after clip, values in ``[0, num_frames)``.
    """
    num_frames = _check_count("num_frames", num_frames)
    clip_len = _check_count("clip_len", clip_len)
    frame_interval = _check_count("frame_interval", frame_interval)
    num_clips = _check_count("num_clips", num_clips)
    if pad not in PAD_POLICIES:
        raise UsageError(f"pad must be one of {PAD_POLICIES}, got {pad!r}")
    steps = np.arange(clip_len, dtype=np.int64) * frame_interval  # (clip_len,)
    span = int(steps[-1]) + 1

    if num_frames >= span:
        slot = (num_frames - span + 1) / num_clips  # width of each clip's start slot, > 0
        base = np.arange(num_clips, dtype=np.float64) * slot
        if train:
            offsets = _train_rng(rng, "clip_indices").random(num_clips) * slot
        else:
            offsets = np.full(num_clips, slot / 2.0)
        starts = np.minimum(np.floor(base + offsets).astype(np.int64), num_frames - span)
        return (starts[:, None] + steps[None, :]).reshape(-1)

    # Shorter than one clip: every clip covers the whole video, padded by the policy.
    if pad == "loop":
        if train:
            starts = _train_rng(rng, "clip_indices").integers(0, num_frames, size=num_clips)
        else:
            starts = np.zeros(num_clips, dtype=np.int64)
        idx = (starts[:, None] + steps[None, :]) % num_frames
    else:  # repeat_last
        idx = np.broadcast_to(np.minimum(steps, num_frames - 1), (num_clips, clip_len))
    return np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)


def fps_indices(num_frames: int, src_fps: float, target_fps: float | None = None,
                times: np.ndarray | None = None) -> np.ndarray:
    """All frames resampled to ``target_fps``: the frame shown at each time ``k / target_fps`` of the video.

    ``target_fps`` None or 0 keeps every frame; a target at or above ``src_fps`` also keeps every frame
    (frames are never duplicated to raise the rate). Otherwise returns
    ``ceil(num_frames * target_fps / src_fps)`` indices ``floor(k * src_fps / target_fps)``, strictly increasing.

    ``times``: for a variable-frame-rate video (``VideoInfo.times``), each frame's presentation time in seconds from
    the first; the rule then reads them instead of a rate (:func:`fps_times`).

    Returns:
        int64 ``(T',)``, strictly increasing, values in ``[0, num_frames)``.
    """
    num_frames = _check_count("num_frames", num_frames)
    if target_fps is None or target_fps == 0:
        return np.arange(num_frames, dtype=np.int64)
    if not (isinstance(target_fps, (int, float, np.number)) and math.isfinite(target_fps) and target_fps > 0):
        raise UsageError(f"target_fps must be a positive number (or None/0 for all frames), got {target_fps!r}")
    if times is not None:
        return fps_times(times, target_fps, num_frames)
    if not (isinstance(src_fps, (int, float, np.number)) and math.isfinite(src_fps) and src_fps > 0):
        raise UsageError(
            f"src_fps must be a positive number, got {src_fps!r} (the video reports no usable frame rate; "
            "sample all frames with target_fps=None or re-encode the video with a frame rate)"
        )
    return fps_frames(num_frames, src_fps, target_fps)


def fps_frames(end: int, src_fps: float, target_fps: float, first_step: int = 0) -> np.ndarray:
    """The rule of :func:`fps_indices`, from any step on: step k takes frame ``floor(k * src_fps / target_fps)``
    (frame k when ``target_fps >= src_fps``: frames are never duplicated). Returns the frames of the steps
    ``first_step, first_step + 1, ...`` that come before frame ``end``; a stream (`pipeline.serving.streaming`)
    continues from the step after the last one it took.

    Returns:
        int64, strictly increasing, values in ``[0, end)``.
    """
    step = max(float(src_fps) / float(target_fps), 1.0)  # >= 1 source frames per output frame
    # The 1e-9 keeps exact multiples (30 -> 10 fps: 0, 3, 6, ...) from flooring one frame early.
    stop = math.floor(end / step) + 2  # past the last step whose frame can come before `end` (kept by the filter)
    idx = np.floor(np.arange(first_step, max(stop, first_step), dtype=np.float64) * step + 1e-9).astype(np.int64)
    return idx[idx < end]


def fps_times(times: np.ndarray, target_fps: float, num_frames: int | None = None) -> np.ndarray:
    """:func:`fps_indices` from presentation times: the frame shown at each step time ``k / target_fps``, that is
    the last frame whose time is at or before it, for the step times before the video ends (the last frame's time
    plus its neighbour's duration); each frame once (a frame shown at several step times is not repeated).
    On evenly spaced times ``i / src_fps`` this is :func:`fps_frames`'s ``floor(k * src_fps / target_fps)``.

    Returns:
        int64, strictly increasing, values in ``[0, len(times))``.
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if num_frames is not None and len(t) != num_frames:
        raise UsageError(f"{len(t)} frame times for {num_frames} frames; probe the video again")
    if len(t) == 0 or not np.isfinite(t).all() or (np.diff(t) <= 0).any():
        raise UsageError("frame times must be finite, strictly increasing seconds; probe the video again")
    t = t - t[0]
    end = t[-1] + (t[-1] - t[-2] if len(t) > 1 else 1.0 / float(target_fps))  # when the last frame stops showing
    # The 1e-9 keeps a step time that equals a frame time (0.3 s at 10 fps) from landing on the frame before.
    steps = np.arange(math.ceil(end * target_fps - 1e-9), dtype=np.float64) / float(target_fps)
    shown = np.searchsorted(t, steps + 1e-9, side="right") - 1
    return np.unique(shown).astype(np.int64)


def sequence_indices(
    length: int, num_steps: int, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``num_steps`` steps from a stored ``(T, D)`` feature sequence of ``length`` rows, segment-style.

    The same rule as :func:`segment_indices`: a random row per span in training, the span centres in testing;
    sequences shorter than ``num_steps`` repeat rows (non-decreasing, so temporal order is kept).

    Returns:
        int64 ``(num_steps,)``, values in ``[0, length)``.
    """
    length = _check_count("length", length)
    num_steps = _check_count("num_steps", num_steps)
    if train:
        _train_rng(rng, "sequence_indices")
    return segment_indices(length, num_steps, train, rng)


@dataclass(frozen=True)
class Sampling:
    """The frames of a stream's source that become feature steps: all of them, resampled to `fps`, or
    `num_segments` segment centres. Part of a stream's `FeatureSettings`; test-time and deterministic."""

    fps: float | None = None
    num_segments: int | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and self.num_segments is not None:
            raise UsageError("--fps and --num-segments exclude each other; pass at most one")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps)
                                         and self.fps > 0):
            raise UsageError(f"--fps {self.fps}: must be a positive number of frames per second")
        if self.num_segments is not None and not (isinstance(self.num_segments, int) and self.num_segments >= 1):
            raise UsageError(f"--num-segments {self.num_segments}: must be an integer >= 1")

    @property
    def mode(self) -> str:
        return "fps" if self.fps is not None else "segments" if self.num_segments is not None else "all"

    def to_json(self) -> dict:
        return {"mode": self.mode, "fps": self.fps, "num_segments": self.num_segments}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "Sampling":
        """From `{"mode": "all" | "fps" | "segments", "fps": F, "num_segments": N}` (settings.json)."""
        if not isinstance(value, Mapping):
            raise UsageError(f"sampling must be an object with mode/fps/num_segments, got {value!r}")
        unknown = set(value) - {"mode", "fps", "num_segments"}
        if unknown:
            raise UsageError(f"sampling has unknown keys {sorted(unknown)} (known: mode, fps, num_segments)")
        mode = value.get("mode", "all")
        if mode == "fps":
            return cls(fps=float(value.get("fps")))
        if mode == "segments":
            return cls(num_segments=int(value.get("num_segments")))
        if mode == "all":
            return cls()
        raise UsageError(f"sampling mode {mode!r} is not one of 'all', 'fps', 'segments'")

    def indices(self, num_frames: int, src_fps: float, times: np.ndarray | None = None) -> np.ndarray:
        """int64 `(T,)` indices in `[0, num_frames)` of a source with `num_frames` frames at `src_fps` (for a
        variable-frame-rate source, `times`: each frame's time in seconds, which fps sampling then follows)."""
        if self.mode == "fps":
            return fps_indices(num_frames, src_fps, self.fps, times)
        if self.mode == "segments":
            return segment_indices(num_frames, self.num_segments, train=False)
        return np.arange(_check_count("num_frames", num_frames), dtype=np.int64)
