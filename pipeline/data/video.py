"""Frame-accurate decoding: probe a video file or a raw-frame folder, and load frames by index.

Frame ``i`` of a video is, by definition, the ``i``-th frame that decoding the first video stream from start to end
yields (presentation order); ``probe`` counts those frames. Three sources sit behind the same two functions:

- **PyAV** (bundles its own FFmpeg; reads everything FFmpeg reads) -- the reference, exact by construction:

  * Opening a file decodes its first frame and demuxes its packets once (a few ms for a 10 s clip) into an
    *index*: the presentation timestamps (pts) of the packets with a payload, sorted, so that ``pts[i]`` names frame
    ``i``; the keyframes; and the frame count, ``len(pts)``. Container frame counts (``stream.frames``, AVI headers,
    MKV durations) are often wrong or absent, so they are only used to detect truncation (fewer packets than the
    container declares, or a packet flagged corrupt).
  * Reads decode forward and seek only when the next wanted frame lies at or beyond the next keyframe (decoding on
    would pass through that keyframe anyway; the seek lands on the last keyframe before the wanted frame and skips at
    least ``SEEK_MIN_SKIP`` frames), *identifying every frame by its pts* (never by counting after a seek). A sparse
    read thus costs at most a forward decode from the start to its last frame, and less where keyframes let it skip. Seeking is used only in
    containers whose packets carry real presentation timestamps (MP4/MOV, Matroska/WebM) and whose pts are unique;
    AVI packets carry decode-order counters, so AVI files are always decoded sequentially from the start. Every frame
    decoded is checked against the index (a known pts, consecutive indices, not past the target); any mismatch drops
    that file to sequential decoding (remembered), so a wrong index costs time, never a wrong frame.
  * Only the asked frames are converted to RGB; frame and slice threads (see ``PYAV_THREAD_TYPE``).

- **decord** (0.6.0, where installed): not exact on every file -- on ``h265_video.mp4`` random access returns frame
  ``i + 1`` -- and it can abort the process on input it dislikes. It is only ever given files PyAV has already opened
  and indexed. ``backend="auto"`` uses it for *dense* reads (at least ``DENSE_READ_FRACTION`` of a file's frames, e.g.
  feature extraction of every frame) of files up to 720p (``DECORD_MAX_PIXELS``) where it has passed a check, run on
  the file's first dense read: decord must report the index's frame count and return, where its seeking goes wrong
  (up to 3 keyframes and the frame after each), the frames PyAV returns (mean absolute difference <=
  ``SAME_FRAME_TOL`` and no closer to the next frame). The check costs one small sparse read with each backend; the
  verdict is cached per ``(path, size, mtime)``. Files that fail it, or that decord cannot open (AV1), are read with
  PyAV, and so is a file on which decord fails after passing. ``backend="decord"`` is raw decord (frame-count check
  only), for comparison.

  Why this split: accuracy must not depend on decord, and it does not. Measured with
  ``python -m pipeline.benchmarks.decode`` (docs/benchmarks.md), PyAV with the index and frame threads
  is as fast as decord for segment sampling (8 frames of ``test.mp4``: 0.96-1.03x the faster of decord and a forward
  decode, loaded 2-core machine; with slice threads only it was 1.7-2.3x decord); decord was faster when decoding
  whole small videos (~20% before frame threads) and 2-3x slower on the 1080p NTU clip. So sparse reads -- every
  training sample -- go to PyAV with no check to pay, and decord is used where it is verified and faster.

- **Raw-frame folders** (``img_00001.jpg``, ``img_00002.jpg``, ...; the mmaction2/TSN layout, numbered from 1,
  ``.jpg``/``.jpeg``/``.png``): frame ``i`` is ``img_{i+1:05d}``. A folder has no frame rate, so ``probe`` reports
  the ``fps`` argument, else ``DEFAULT_RAWFRAME_FPS`` (30, the rate most raw-frame datasets were extracted at).

No reader is opened at import or kept between calls: each call opens its own (safe before and after DataLoader
workers fork; decord is imported on first use). The only state is a small in-process cache of indices and decord
verdicts (plain data, keyed by path, size and mtime, so an edited file is re-indexed; ``clear_cache()`` empties it).
``decord.bridge`` is never set (frames come out through ``.asnumpy()``; a bridge the user set is tolerated).
"""
from __future__ import annotations

import bisect
import os
import re
import stat
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import av
import numpy as np
from pipeline.errors import UsageError

if TYPE_CHECKING:  # torch is imported by load_frames only: `read_frames` (optical flow workers) never loads it
    import torch

__all__ = [
    "BACKENDS",
    "DEFAULT_RAWFRAME_FPS",
    "VideoInfo",
    "VideoReadError",
    "clear_cache",
    "decord_available",
    "load_frames",
    "probe",
]

Backend = Literal["auto", "decord", "pyav", "rawframes"]
BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav", "rawframes")
DEFAULT_RAWFRAME_FPS = 30.0
# Mean absolute difference (0..255 scale) under which two RGB decodes count as the same frame. decord and PyAV both
# convert with swscale and agree exactly on the test videos; kept tight because consecutive frames of a static scene
# can differ by little more (a decord build that converts colours differently then fails the check: slower, not wrong).
SAME_FRAME_TOL = 1.0
# Seek only when the wanted frame lies at or beyond the next keyframe (decoding on would have to pass through that
# keyframe anyway) and the seek skips at least this many frames (a seek drains the decoder's frame-thread pipeline).
SEEK_MIN_SKIP = 4
# decord check: keyframes probed per file, and how far into a file PyAV may decode sequentially for references.
_PROBE_KEYFRAMES = 3
_SEQUENTIAL_PROBE_SPAN = 64
# auto reads with decord (where verified) only when a read asks for at least this fraction of a file's frames (set
# above 1 to never use decord), and only up to this frame size: on the 1920x1080 NTU clip decord was 2-3x slower.
DENSE_READ_FRACTION = 0.5
DECORD_MAX_PIXELS = 1280 * 720
# PyAV threading: frame and slice threads, a few per reader. Most H.264 files have one slice per frame, so slice
# threads alone leave decoding single-threaded: measured with `python -m pipeline.benchmarks.decode`, frame threads make
# a forward decode of test.mp4 2-3x faster even on a loaded 2-core machine (and as fast as decord, which threads too).
# Capped so that DataLoader workers (one reader each) do not oversubscribe the cores many times over.
PYAV_THREAD_TYPE = "AUTO"
PYAV_THREADS = max(1, min(4, os.cpu_count() or 1))
# Containers whose packets carry presentation timestamps (FFmpeg demuxer names).
_PTS_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"})
_RAWFRAME_RE = re.compile(r"^img_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_CACHE_SIZE = 1024  # files; an index holds 8 bytes per frame


class VideoReadError(UsageError):
    """A video file or raw-frame folder that cannot be read as asked; the message names it, the reason and the fix."""


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` reports: the frame count sequential decoding yields, frames/s, and the decoded frame size."""

    num_frames: int
    fps: float
    height: int
    width: int


@dataclass(frozen=True, eq=False)
class _Index:
    """A video file's frame index, from one demux pass (no decoding beyond the first frame)."""

    num_frames: int
    fps: float
    height: int
    width: int
    pts: np.ndarray  # (N,) int64 presentation timestamps in presentation order; pts[i] names frame i
    key_index: np.ndarray  # (K,) int64 sorted frame indices of keyframes (first is 0 when seekable)
    seekable: bool  # pts identify frames (unique, from a container that stores presentation times)

    def info(self) -> VideoInfo:
        return VideoInfo(self.num_frames, self.fps, self.height, self.width)

    def frame_at(self, pts: int | None) -> int | None:
        """The index of the frame with presentation timestamp ``pts``, None when no frame has it."""
        if pts is None:
            return None
        i = int(np.searchsorted(self.pts, pts))
        return i if i < self.num_frames and self.pts[i] == pts else None


class _SeekMismatch(Exception):
    """A decoded frame disagreed with the index after a seek; the caller redoes the read sequentially."""


# In-process caches of plain data (no readers), keyed by (path, size, mtime_ns). Safe to inherit across fork.
_lock = threading.Lock()
_index_cache: OrderedDict[tuple, _Index] = OrderedDict()
_decord_ok: OrderedDict[tuple, bool] = OrderedDict()
_no_seek: set[tuple] = set()


def clear_cache() -> None:
    """Forget every cached index and decord verdict (benchmarks use it to time a first open)."""
    with _lock:
        _index_cache.clear()
        _decord_ok.clear()
        _no_seek.clear()


def _remember(cache: OrderedDict, key: tuple, value: Any) -> None:
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)


def _lookup(cache: OrderedDict, key: tuple) -> Any:
    with _lock:
        return cache.get(key)


_decord_module: Any = None


def _decord() -> Any:
    """The decord module, imported on first use (None when it is not installed)."""
    global _decord_module
    if _decord_module is None:
        try:
            # OpenCV first: decord's wheel bundles an old zlib whose soname is libz.so.1; loaded before cv2, it
            # becomes the libz of cv2's libpng, whose PNG decoding then fails ("libpng error: bad parameters to
            # zlib"), which breaks reading flow files in any process that decoded video with decord first.
            try:
                import cv2  # noqa: F401
            except ImportError:  # pragma: no cover - a dependency of the project
                pass
            import decord
        except ImportError:
            _decord_module = False
        else:
            _decord_module = decord
    return _decord_module or None


def decord_available() -> bool:
    """True when decord can be imported (it has no wheels for macOS arm64 / Linux aarch64)."""
    return _decord() is not None


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def probe(path: str | Path, fps: float | None = None) -> VideoInfo:
    """Frame count, frames/s, height and width of a video file or raw-frame folder.

    ``num_frames`` is the number of frames sequential decoding yields (for a file: its video packets with a payload,
    counted by demuxing, not the container's header). ``fps`` is only used for raw-frame folders (which have no
    rate; default ``DEFAULT_RAWFRAME_FPS``); for files it is ignored and the stream's average rate is reported.
    Raises ``VideoReadError`` for missing, empty, truncated or unreadable inputs.
    """
    path = Path(path)
    if path.is_dir():
        return _rawframe_info(path, fps)
    return _index(path)[0].info()


def load_frames(
    path: str | Path, indices: Sequence[int] | np.ndarray | torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """Frames ``indices`` of a video file or raw-frame folder as ``uint8 (T, H, W, 3)`` RGB, in the order asked.

    ``indices``: 1-D integers in ``[0, num_frames)``; repeats and any order are allowed (each distinct frame is
    decoded once). ``backend``: ``"auto"`` (decord where verified exact on this file, else PyAV; raw-frame reader for
    folders), ``"pyav"``, ``"decord"`` (raw decord, unverified) or ``"rawframes"``. An index out of range raises
    ``VideoReadError`` naming it, the frame count and the file; nothing is clamped.
    """
    import torch

    return torch.from_numpy(read_frames(path, indices, backend))


def read_frames(
    path: str | Path, indices: Sequence[int] | np.ndarray | torch.Tensor, backend: Backend = "auto"
) -> np.ndarray:
    """``load_frames`` as a numpy array (the same frames; torch is not imported)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown video backend {backend!r}; use one of {', '.join(BACKENDS)}")
    path = Path(path)
    idx = _as_indices(indices, path)
    is_dir = path.is_dir()
    if backend == "rawframes" and not is_dir:
        raise VideoReadError(f"{path}: backend 'rawframes' needs a folder of img_00001.jpg ... frames, this is "
                             f"{'a file' if path.exists() else 'missing'}; check the path (use backend='auto' for "
                             f"video files)")
    if is_dir and backend in ("pyav", "decord"):
        raise VideoReadError(f"{path}: is a folder; backend {backend!r} reads video files; use backend='auto' or "
                             f"'rawframes' for raw-frame folders")
    if is_dir:
        return _load_rawframes(path, idx)
    index, key = _index(path)
    _check_range(idx, index.num_frames, path)
    wanted = np.unique(idx)  # sorted, distinct
    if len(wanted) == 0:
        return np.empty((0, index.height, index.width, 3), dtype=np.uint8)
    if backend == "decord":
        frames = _decode_decord(path, index, wanted)
    elif backend == "auto" and _use_decord(path, index, key, len(wanted)):
        try:
            frames = _decode_decord(path, index, wanted)
        except VideoReadError:  # decord failed on this read after all: PyAV from now on
            _remember(_decord_ok, key, False)
            frames = _decode_pyav(path, index, wanted, key)
    else:
        frames = _decode_pyav(path, index, wanted, key)
    return _gather(frames, wanted, idx)


# ---------------------------------------------------------------------------------------------------------------------
# Checks and helpers
# ---------------------------------------------------------------------------------------------------------------------


def _as_indices(indices: Sequence[int] | np.ndarray | torch.Tensor, path: Path) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded; without it there is none to convert
    if torch is not None and isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise UsageError(f"{path}: frame indices must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise UsageError(f"{path}: frame indices must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_range(idx: np.ndarray, num_frames: int, path: Path) -> None:
    bad = idx[(idx < 0) | (idx >= num_frames)]
    if bad.size:
        raise VideoReadError(f"{path}: frame index {int(bad[0])} is out of range; the video has {num_frames} frames "
                             f"(valid indices 0..{num_frames - 1}); sample indices with num_frames from probe()")


def _gather(frames: np.ndarray, wanted: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """frames (U, H, W, 3) for sorted distinct ``wanted`` -> (T, H, W, 3) in the order of ``idx``."""
    pos = np.searchsorted(wanted, idx)
    return np.ascontiguousarray(frames[pos])


def _stat(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoReadError(f"{path}: no such file; check the path (and the --root / video_root the list is "
                             f"relative to)") from None
    except OSError as e:
        raise VideoReadError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block FFmpeg forever
        raise VideoReadError(f"{path}: is not a regular file; pass a video file or a raw-frame folder")
    if st.st_size == 0:
        raise VideoReadError(f"{path}: the file is empty (0 bytes); re-download or re-extract it")
    return st


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise VideoReadError(f"{path}: not a video FFmpeg can read ({_reason(e)}); check that it is a complete video "
                             f"file (re-download or re-encode it)") from None


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _decord_reason(e: BaseException) -> str:
    """decord's first message line without its "[time] file.cc:line: " prefix."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", line)[:200]


# ---------------------------------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------------------------------


def _index(path: Path) -> tuple[_Index, tuple]:
    """The file's index (cached) and its cache key ``(resolved path, size, mtime_ns)``."""
    st = _stat(path)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    index = _lookup(_index_cache, key)
    if index is None:
        index = _build_index(path)
        _remember(_index_cache, key, index)
    return index, key


def _build_index(path: Path) -> _Index:
    # 1) Decode the first frame: proves a decoder exists and gives the size frames really come out at.
    with _open(path) as c:
        if not c.streams.video:
            raise VideoReadError(f"{path}: has no video stream; check that it is a video, not audio or another file")
        stream = c.streams.video[0]
        try:
            first = next(iter(c.decode(stream)), None)
        except av.FFmpegError as e:
            raise VideoReadError(f"{path}: its video stream cannot be decoded ({_reason(e)}); re-encode it "
                                 f"(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
        if first is None:
            raise VideoReadError(f"{path}: contains no decodable video frames; re-download or re-encode it")
        height, width = first.height, first.width

    # 2) Demux every packet (no decoding): pts of the frames, keyframes, corruption.
    with _open(path) as c:
        stream = c.streams.video[0]
        fmt = c.format.name
        declared = int(stream.frames or 0)
        declared_s = c.duration / av.time_base if c.duration and c.duration > 0 else None
        time_base = float(stream.time_base) if stream.time_base else None
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        pts_list: list[int | None] = []
        keys: list[tuple[int | None, int]] = []  # (pts, packet ordinal) of keyframe packets
        last_dur = 0
        total = 0
        try:
            for pkt in c.demux(stream):
                if pkt.size == 0:  # the flush packet demux ends with
                    continue
                total += 1
                if pkt.is_corrupt:
                    raise VideoReadError(f"{path}: packet {total - 1} of its video stream is corrupt or cut off "
                                         f"(the file looks truncated); re-download or re-encode it")
                if pkt.is_discard:  # before an edit list's start: decoders drop these
                    continue
                if pkt.is_keyframe:
                    keys.append((pkt.pts, len(pts_list)))
                pts_list.append(pkt.pts)
                last_dur = pkt.duration or last_dur
        except av.FFmpegError as e:
            raise VideoReadError(f"{path}: reading its packets failed ({_reason(e)}); the file is damaged or "
                                 f"truncated; re-download or re-encode it") from None

    num_frames = len(pts_list)
    if num_frames == 0:
        raise VideoReadError(f"{path}: contains no video frames; re-download or re-encode it")
    if declared > total:
        raise VideoReadError(f"{path}: its header declares {declared} frames but only {total} are present (the file "
                             f"looks truncated); re-download or re-encode it")
    fps = float(rate) if rate else 0.0
    has_pts = all(p is not None for p in pts_list)
    pts = np.array([p if p is not None else -1 for p in pts_list], dtype=np.int64)
    if declared == 0 and declared_s and has_pts and time_base and fps > 0:
        # No frame count in the header (Matroska): compare the span the packets cover with the declared duration.
        covered = (pts.max() - pts.min() + last_dur) * time_base
        if covered < 0.9 * declared_s - 2.0 / fps:
            raise VideoReadError(f"{path}: its packets cover {covered:.2f} s of the {declared_s:.2f} s the container "
                                 f"declares (the file looks truncated); re-download or re-encode it")
    pts.sort()
    seekable = (fmt in _PTS_CONTAINERS and has_pts and bool(keys) and all(k[0] is not None for k in keys)
                and len(np.unique(pts)) == num_frames)
    if seekable:
        # Seek targets are keyframe pts: FFmpeg's MP4 and Matroska seeking compare against presentation times (with a
        # keyframe's dts it lands a GOP early). Frame 0 is always reachable by decoding from the start.
        key_index = np.unique(np.concatenate([[0], np.searchsorted(pts, [k[0] for k in keys])])).astype(np.int64)
    else:  # decode-order positions: only a guide to where decord's seeking is exercised, never used to seek
        key_index = np.array(sorted({k[1] for k in keys} | {0}), dtype=np.int64)
    if fps <= 0:
        fps = (num_frames - 1) / ((pts[-1] - pts[0]) * time_base) if has_pts and time_base and pts[-1] > pts[0] else 0.0
    return _Index(num_frames, fps, height, width, pts, key_index, seekable)


# ---------------------------------------------------------------------------------------------------------------------
# PyAV
# ---------------------------------------------------------------------------------------------------------------------


def _set_threads(stream: av.video.stream.VideoStream) -> None:
    stream.thread_type = PYAV_THREAD_TYPE
    stream.thread_count = PYAV_THREADS


def _seek(c: av.container.InputContainer, stream: av.video.stream.VideoStream, pts: int) -> None:
    """Seek to the keyframe with presentation timestamp ``pts`` (one place, so tests can count seeks)."""
    c.seek(pts, stream=stream, backward=True, any_frame=False)


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8


def _decode_pyav(path: Path, index: _Index, wanted: np.ndarray, key: tuple) -> np.ndarray:
    """Frames ``wanted`` (sorted, distinct, in range) -> (U, H, W, 3) uint8, as sequential decoding yields them."""
    if index.seekable and key not in _no_seek:
        try:
            return _decode_seeking(path, index, wanted)
        except _SeekMismatch:
            with _lock:
                _no_seek.add(key)
    return _decode_sequential(path, index, wanted)


def _decode_sequential(path: Path, index: _Index, wanted: np.ndarray) -> np.ndarray:
    out: list[np.ndarray] = []
    targets = iter(wanted.tolist())
    target = next(targets)
    count = 0
    with _open(path) as c:
        stream = c.streams.video[0]
        _set_threads(stream)
        try:
            for i, frame in enumerate(c.decode(stream)):
                count = i + 1
                if i == target:
                    out.append(_rgb(frame))
                    target = next(targets, None)
                    if target is None:
                        break
        except av.FFmpegError as e:
            raise VideoReadError(f"{path}: decoding failed after {count} frames ({_reason(e)}); the file is damaged; "
                                 f"re-download or re-encode it") from None
    if target is not None:
        raise VideoReadError(f"{path}: decoding yields only {count} frames, its packets list {index.num_frames} (the "
                             f"file is damaged or truncated); re-download or re-encode it")
    return np.stack(out)


def _decode_seeking(path: Path, index: _Index, wanted: np.ndarray) -> np.ndarray:
    """Decode forward through the targets, seeking to the keyframe before a target only when decoding on would pass
    through a keyframe first; every frame is identified by its pts."""
    out: list[np.ndarray] = []
    with _open(path) as c:
        stream = c.streams.video[0]
        _set_threads(stream)
        frames = None  # the running decode, continued between targets
        pos = 0  # index of the next frame it yields; -1 right after a seek (the landing frame is checked instead)
        try:
            for target in wanted.tolist():
                k = bisect.bisect_right(index.key_index, target) - 1
                key_pos = int(index.key_index[k])  # the last keyframe at or before the target
                here = pos if frames is not None else 0
                # key_pos > here: the next keyframe after the decoder's position lies at or before the target.
                if key_pos > here and key_pos - here >= SEEK_MIN_SKIP:
                    _seek(c, stream, int(index.pts[key_pos]))
                    frames, pos = c.decode(stream), -1
                elif frames is None:
                    frames, pos = c.decode(stream), 0
                for frame in frames:
                    j = index.frame_at(frame.pts)
                    if j is None or (pos >= 0 and j != pos) or (pos < 0 and j > target):
                        raise _SeekMismatch
                    pos = j + 1
                    if j == target:
                        out.append(_rgb(frame))
                        break
                else:
                    raise _SeekMismatch  # ran out of frames before the target: let sequential decoding decide
        except av.FFmpegError:
            raise _SeekMismatch from None
    return np.stack(out)


# ---------------------------------------------------------------------------------------------------------------------
# decord
# ---------------------------------------------------------------------------------------------------------------------


def _decord_reader(path: Path, index: _Index) -> Any:
    decord = _decord()
    if decord is None:
        raise VideoReadError(f"{path}: backend 'decord' needs the decord package (pip install decord; Linux x86_64 "
                             f"and Windows only); or use backend='auto' or 'pyav'")
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as e:  # DECORDError, RuntimeError: decord reports C++ check failures as several types
        raise VideoReadError(f"{path}: decord cannot read it ({_decord_reason(e)}); use backend='auto' "
                             f"or 'pyav'") from None
    if len(vr) != index.num_frames:
        raise VideoReadError(f"{path}: decord sees {len(vr)} frames, sequential decoding yields {index.num_frames}; "
                             f"its frame indices would be wrong; use backend='auto' or 'pyav'")
    return vr


def _decode_decord(path: Path, index: _Index, wanted: np.ndarray, vr: Any = None) -> np.ndarray:
    vr = vr if vr is not None else _decord_reader(path, index)
    try:
        batch = vr.get_batch(wanted.tolist())
        # Native NDArray normally; a bridge the user set globally (torch, ...) must not break us, and we never set one.
        if hasattr(batch, "asnumpy"):
            frames = batch.asnumpy()
        else:
            frames = np.asarray(batch.cpu() if hasattr(batch, "cpu") else batch)
    except Exception as e:
        raise VideoReadError(f"{path}: decord failed to decode frames ({_decord_reason(e)}); use "
                             f"backend='auto' or 'pyav'") from None
    if frames.shape != (len(wanted), index.height, index.width, 3):
        raise VideoReadError(f"{path}: decord returned frames of shape {frames.shape}, expected "
                             f"{(len(wanted), index.height, index.width, 3)}; use backend='auto' or 'pyav'")
    return frames


def _probe_positions(index: _Index) -> np.ndarray:
    """Where decord's random access goes wrong, if anywhere: at a keyframe it seeks to, and the frame after.

    Up to ``_PROBE_KEYFRAMES`` keyframes spread over the file (``[0, 1]`` when frame 0 is the only one). Where PyAV
    cannot seek (AVI) its reference means decoding from the start, so only keyframes in the first
    ``_SEQUENTIAL_PROBE_SPAN`` frames are probed there.
    """
    n = index.num_frames
    span = n if index.seekable else _SEQUENTIAL_PROBE_SPAN
    later = [k for k in index.key_index.tolist() if 0 < k < span]
    chosen = [later[round(t)] for t in np.linspace(0, len(later) - 1, min(_PROBE_KEYFRAMES, len(later)))] or [0]
    pos = {p for k in chosen for p in (k, k + 1) if p < n}
    return np.array(sorted(pos), dtype=np.int64)


def _use_decord(path: Path, index: _Index, key: tuple, num_wanted: int) -> bool:
    """``auto``'s choice for this read: decord for dense reads (at least ``DENSE_READ_FRACTION`` of the frames) of
    files up to ``DECORD_MAX_PIXELS`` where it has passed the check (run on the file's first dense read); PyAV for
    everything else."""
    if num_wanted < DENSE_READ_FRACTION * index.num_frames or index.height * index.width > DECORD_MAX_PIXELS:
        return False
    verdict = _lookup(_decord_ok, key)
    if verdict is None:
        verdict = _verify_decord(path, index, key)
        _remember(_decord_ok, key, verdict)
    return verdict


def _verify_decord(path: Path, index: _Index, key: tuple) -> bool:
    if _decord() is None:
        return False
    try:
        vr = _decord_reader(path, index)
        probes = _probe_positions(index)
        got = _decode_decord(path, index, probes, vr).astype(np.int16)
    except VideoReadError:
        return False
    # References: the probes and the frame after each (one more decoded frame; the one before could cost a GOP).
    ref_pos = np.unique(np.minimum(np.concatenate([probes, probes + 1]), index.num_frames - 1))
    ref = _decode_pyav(path, index, ref_pos, key).astype(np.int16)
    for g, p in zip(got, probes.tolist()):
        d_same = float(np.abs(g - ref[np.searchsorted(ref_pos, p)]).mean())
        d_next = float(np.abs(g - ref[np.searchsorted(ref_pos, p + 1)]).mean()) if p + 1 < index.num_frames else np.inf
        if d_same > SAME_FRAME_TOL or d_same > d_next:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Raw-frame folders
# ---------------------------------------------------------------------------------------------------------------------


def _rawframe_files(folder: Path) -> list[Path]:
    numbered = {}
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise VideoReadError(f"{folder}: cannot list the raw-frame folder ({e.strerror}); check its "
                             f"permissions") from None
    for name in names:
        m = _RAWFRAME_RE.match(name)
        if m:
            numbered[int(m.group(1))] = folder / name
    if not numbered:
        raise VideoReadError(f"{folder}: is a folder without frames named img_00001.jpg, img_00002.jpg, ... (the "
                             f"mmaction2 raw-frame layout); extract frames into it or point to a video file")
    n = len(numbered)
    missing = sorted(set(range(1, n + 1)) - numbered.keys())
    if missing:
        raise VideoReadError(f"{folder}: raw frames must be numbered img_00001 .. img_{n:05d} without gaps; "
                             f"img_{missing[0]:05d} is missing; re-extract the frames")
    return [numbered[i] for i in range(1, n + 1)]


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise VideoReadError(f"{path}: not a readable image ({e}); re-extract the frames") from None


def _rawframe_info(folder: Path, fps: float | None) -> VideoInfo:
    files = _rawframe_files(folder)
    from PIL import Image

    try:
        with Image.open(files[0]) as im:
            width, height = im.size
    except OSError as e:
        raise VideoReadError(f"{files[0]}: not a readable image ({e}); re-extract the frames") from None
    return VideoInfo(len(files), float(fps) if fps else DEFAULT_RAWFRAME_FPS, height, width)


def _load_rawframes(folder: Path, idx: np.ndarray) -> np.ndarray:
    files = _rawframe_files(folder)
    _check_range(idx, len(files), folder)
    wanted = np.unique(idx)
    if len(wanted) == 0:
        info = _rawframe_info(folder, None)
        return np.empty((0, info.height, info.width, 3), dtype=np.uint8)
    frames = [_read_image(files[i]) for i in wanted.tolist()]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoReadError(f"{folder}: raw frames differ in size ({sorted(shapes)}); re-extract them at one size")
    return _gather(np.stack(frames), wanted, idx)
