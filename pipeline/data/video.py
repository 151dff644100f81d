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

- **torchcodec** (where installed with the system's FFmpeg libraries; the ``torchcodec`` extra): checked per file
  exactly as decord is (its frame count and its frames at the keyframes against PyAV's) and used by ``auto`` for the
  dense reads of files where it passed, before decord (it decodes whole files faster; docs/benchmarks.md). It
  rotates frames by the container's rotation but ignores mirroring, so its rotation is undone and the file's own
  orientation applied, as for every backend. ``backend="torchcodec"`` is raw torchcodec (frame-count check only).

**Display orientation.** Phones store portrait video as landscape frames plus a display matrix (rotation by a
multiple of 90 degrees, possibly mirrored). The matrix is read once per file, from the first decoded frame's side
data, and every backend's frames are turned to the displayed orientation (``np.rot90`` and flips on ``(T, H, W,
3)``); ``probe`` reports the displayed size. The per-file checks of decord and torchcodec compare frames before it,
like with like.

**Variable frame rate.** Where the index's presentation timestamps are not evenly spaced, ``probe`` reports the
mean rate over the file and each frame's time (``VideoInfo.times``, seconds from the first frame), and fps sampling
(``pipeline.data.sampling``) picks the frame shown at each step time from those times, not from a nominal rate.

**Decoding a bad file cannot hang the caller.** ``probe`` and ``load_frames`` run the decoding in a helper process
(``pipeline.data.decode_guard``: one per thread that reads, kept warm) under a deadline proportional to the work;
a read that does not finish in time, or whose decoder dies or outgrows its memory bound, becomes a
``VideoReadError`` naming the file, and the helper is killed and replaced. ``ELEATT_DECODE_TIMEOUT`` sets the
deadline's floor (``off`` decodes in the calling process, as tests of these internals do).

No reader is opened at import or kept between calls: each call opens its own (safe before and after DataLoader
workers fork; decord is imported on first use). The only state is a small in-process cache of indices and decord
verdicts (plain data, keyed by path, size and mtime, so an edited file is re-indexed; ``clear_cache()`` empties it).
``decord.bridge`` is never set (frames come out through ``.asnumpy()``; a bridge the user set is tolerated).
torch is imported only by ``load_frames`` (the decoding process and ``read_frames``, used by optical-flow workers,
do not need it).
"""
from __future__ import annotations

import bisect
import importlib
import os
import re
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from pipeline.errors import UsageError, UserError

if TYPE_CHECKING:  # torch is imported by load_frames only: the decoding process never needs it; PyAV when a file is
    import av  # opened (a command's --help, which lists the backends, loads no media package)
    import torch

__all__ = [
    "BACKENDS",
    "DEFAULT_RAWFRAME_FPS",
    "VideoInfo",
    "VideoReadError",
    "backend_names",
    "clear_cache",
    "close_readers",
    "decord_available",
    "load_frames",
    "read_frames",
    "probe",
    "register_backend",
    "torchcodec_available",
]

Backend = Literal["auto", "decord", "pyav", "rawframes", "torchcodec"]
BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav", "rawframes", "torchcodec")
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
# auto's dense-read backends, in order of preference (each only where installed and verified on the file):
# torchcodec decodes whole files faster than decord and PyAV (docs/benchmarks.md).
DENSE_BACKENDS: tuple[str, ...] = ("torchcodec", "decord")
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
# A file is variable-frame-rate when some frame lasts more than this fraction longer or shorter than the median
# frame (timestamps rounded to the time base jitter by a tick; a dropped frame counts: its neighbour lasts twice).
VFR_TOLERANCE = 0.1


class VideoReadError(UsageError):
    """A video file or raw-frame folder that cannot be read as asked; the message names it, the reason and the fix."""


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` reports: the frame count sequential decoding yields, frames/s, and the displayed frame size.

    ``rotation`` (degrees counter-clockwise, 0/90/180/270) and ``mirrored`` (flipped left-right after the rotation)
    are the display orientation the container asks for, already applied to ``height``/``width`` and to the frames
    ``load_frames`` returns. ``times``: for a variable-frame-rate file, each frame's presentation time in seconds
    from the first frame (float64 ``(num_frames,)``; ``fps`` is then the mean rate), else None.
    """

    num_frames: int
    fps: float
    height: int
    width: int
    rotation: int = 0
    mirrored: bool = False
    times: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, eq=False)
class _Index:
    """A video file's frame index, from one demux pass (no decoding beyond the first frame)."""

    num_frames: int
    fps: float
    height: int  # as decoded (before the display orientation)
    width: int
    pts: np.ndarray  # (N,) int64 presentation timestamps in presentation order; pts[i] names frame i
    key_index: np.ndarray  # (K,) int64 sorted frame indices of keyframes (first is 0 when seekable)
    seekable: bool  # pts identify frames (unique, from a container that stores presentation times)
    orient: tuple[int, bool] = (0, False)  # display: np.rot90 by k quarter turns, then mirrored left-right
    times: np.ndarray | None = None  # (N,) seconds from the first frame, for variable-frame-rate files only

    def info(self) -> VideoInfo:
        k, mirrored = self.orient
        h, w = (self.width, self.height) if k % 2 else (self.height, self.width)
        return VideoInfo(self.num_frames, self.fps, h, w, 90 * k, mirrored, self.times)

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
_torchcodec_ok: OrderedDict[tuple, bool] = OrderedDict()
_no_seek: set[tuple] = set()
# What probe reported, in the calling process (the index itself lives where the decoding runs).
_info_cache: OrderedDict[tuple, VideoInfo] = OrderedDict()


def clear_cache() -> None:
    """Forget every cached index and verdict, here and in this thread's decoding process (benchmarks use it to
    time a first open)."""
    _clear_local()
    from pipeline.data import decode_guard

    decode_guard.clear_remote_cache("pipeline.data.video:_clear_local")


def _clear_local() -> None:
    """``clear_cache`` of this process only (the decoding process runs it)."""
    with _lock:
        for cache in (_index_cache, _decord_ok, _torchcodec_ok, _info_cache, _tc_decoders):
            cache.clear()
        _no_seek.clear()


def close_readers() -> None:
    """Stop this process's decoding processes (commands call it when they end; the next read starts one again)."""
    from pipeline.data import decode_guard

    decode_guard.shutdown()


def _remember(cache: OrderedDict, key: tuple, value: Any, limit: int = _CACHE_SIZE) -> None:
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)


def _lookup(cache: OrderedDict, key: tuple) -> Any:
    with _lock:
        return cache.get(key)


_decord_module: Any = None
_torchcodec_module: Any = None
_torchcodec_missing = ""  # why torchcodec cannot be used here, once its import was tried


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


def _torchcodec() -> Any:
    """torchcodec's decoders module, imported on first use (None when torchcodec or the FFmpeg libraries it loads
    are missing; ``_torchcodec_missing`` says which)."""
    global _torchcodec_module, _torchcodec_missing
    if _torchcodec_module is None:
        try:
            from torchcodec import decoders
        except ImportError:
            _torchcodec_module, _torchcodec_missing = False, "the torchcodec package is not installed"
        except Exception as e:  # RuntimeError: it found no FFmpeg libraries it can load
            _torchcodec_module = False
            _torchcodec_missing = f"torchcodec cannot load FFmpeg ({str(e).strip().splitlines()[0][:120]})"
        else:
            _torchcodec_module = decoders
    return _torchcodec_module or None


def torchcodec_available() -> bool:
    """True when torchcodec and the system FFmpeg libraries it needs can be loaded (``pip install eleatt[torchcodec]``
    and, on Debian/Ubuntu, ``apt-get install ffmpeg``)."""
    return _torchcodec() is not None


# Backends added with register_backend: name -> "module:function" (imported where the decoding runs).
_PLUGINS: dict[str, str] = {}
_plugin_functions: dict[str, Any] = {}


def register_backend(name: str, target: str | None) -> None:
    """Add a video-file backend ``name`` (None removes it): ``target`` is ``"module:function"``, a function
    ``(path: str, indices: np.ndarray) -> uint8 (U, H, W, 3)`` returning the sorted distinct frames ``indices`` as
    decoded (before the display orientation, which is applied to its output as to every backend's). It is imported
    by name in the process that decodes, so it must be importable there (a module, not a lambda). Commands offer
    the backends registered before their parser is built (``--backend``)."""
    if name in BACKENDS:
        raise UsageError(f"backend {name!r} is built in; choose another name")
    if target is None:
        _PLUGINS.pop(name, None)
        return
    if not re.fullmatch(r"[\w.]+:\w+", target):
        raise UsageError(f"backend {name!r}: target {target!r} must be 'module:function'")
    _PLUGINS[name] = target


def backend_names() -> tuple[str, ...]:
    """The built-in backends and those registered (``register_backend``), for ``--backend`` choices."""
    return BACKENDS + tuple(_PLUGINS)


def _plugin(target: str) -> Any:
    fn = _plugin_functions.get(target)
    if fn is None:
        module, name = target.split(":")
        fn = _plugin_functions[target] = getattr(importlib.import_module(module), name)
    return fn


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def probe(path: str | Path, fps: float | None = None) -> VideoInfo:
    """Frame count, frames/s, displayed height and width of a video file or raw-frame folder.

    ``num_frames`` is the number of frames sequential decoding yields (for a file: its video packets with a payload,
    counted by demuxing, not the container's header). ``fps`` is only used for raw-frame folders (which have no
    rate; default ``DEFAULT_RAWFRAME_FPS``); for files it is ignored and the stream's average rate is reported (the
    mean rate, with per-frame ``times``, for a variable-frame-rate file). Height and width are those displayed (after
    the container's rotation). Raises ``VideoReadError`` for missing, empty, truncated or unreadable inputs, and for
    one whose decoding does not finish within the deadline (``pipeline.data.decode_guard``).
    """
    from pipeline.data import decode_guard

    guarded = decode_guard.enabled()  # checks the setting on every call
    path = Path(path)
    if path.is_dir():
        if guarded:
            return decode_guard.call("pipeline.data.video:_probe_local", (path, fps), path,
                                     decode_guard.probe_deadline(0), "probe", VideoReadError)
        return _rawframe_info(path, fps)
    st = _stat(path)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    info = _lookup(_info_cache, key)
    if info is None:
        info = (decode_guard.call("pipeline.data.video:_probe_local", (path, fps), path,
                                  decode_guard.probe_deadline(st.st_size), "probe", VideoReadError)
                if guarded else _probe_local(path, fps))
        _remember(_info_cache, key, info)
    return info


def load_frames(
    path: str | Path, indices: Sequence[int] | np.ndarray | torch.Tensor, backend: Backend | str = "auto"
) -> torch.Tensor:
    """Frames ``indices`` of a video file or raw-frame folder as ``uint8 (T, H, W, 3)`` RGB, in the order asked, in
    the displayed orientation.

    ``indices``: 1-D integers in ``[0, num_frames)``; repeats and any order are allowed (each distinct frame is
    decoded once). ``backend``: ``"auto"`` (PyAV for sparse reads; for dense ones torchcodec or decord where verified
    exact on this file; raw-frame reader for folders), ``"pyav"``, ``"decord"`` / ``"torchcodec"`` (raw, unverified),
    ``"rawframes"``, or one added with ``register_backend``. An index out of range raises ``VideoReadError`` naming
    it, the frame count and the file; nothing is clamped. So does a read that does not finish within its deadline or
    whose frames would exceed the memory bound (``pipeline.data.decode_guard``).
    """
    import torch

    return torch.from_numpy(read_frames(path, indices, backend))


def read_frames(
    path: str | Path, indices: Sequence[int] | np.ndarray | torch.Tensor, backend: Backend | str = "auto"
) -> np.ndarray:
    """``load_frames`` as a numpy array (the same frames; torch is not imported: optical-flow workers use it)."""
    from pipeline.data import decode_guard

    if backend not in BACKENDS and backend not in _PLUGINS:
        raise UsageError(f"unknown video backend {backend!r}; use one of {', '.join(backend_names())}")
    path = Path(path)
    idx = _as_indices(indices, path)
    is_dir = path.is_dir()
    if backend == "rawframes" and not is_dir:
        raise VideoReadError(f"{path}: backend 'rawframes' needs a folder of img_00001.jpg ... frames, this is "
                             f"{'a file' if path.exists() else 'missing'}; check the path (use backend='auto' for "
                             f"video files)")
    if is_dir and backend not in ("auto", "rawframes"):
        raise VideoReadError(f"{path}: is a folder; backend {backend!r} reads video files; use backend='auto' or "
                             f"'rawframes' for raw-frame folders")
    guarded = decode_guard.enabled()
    if is_dir and not guarded:
        return _load_rawframes(path, idx)
    info = probe(path)  # unguarded: in this process, cached per file
    _check_range(idx, info.num_frames, path)
    wanted = np.unique(idx)  # sorted, distinct
    if len(wanted) == 0:
        return np.empty((0, info.height, info.width, 3), dtype=np.uint8)
    if not guarded:
        return _gather(_load_local(path, wanted, backend, _PLUGINS.get(backend)), wanted, idx)
    decode_guard.check_read_size(path, len(wanted), info.height, info.width, VideoReadError)
    return decode_guard.call("pipeline.data.video:_load_local", (path, wanted, backend, _PLUGINS.get(backend)), path,
                             decode_guard.read_deadline(int(wanted[-1]), info.height, info.width), "read",
                             VideoReadError, shape=(len(wanted), info.height, info.width, 3),
                             pos=np.searchsorted(wanted, idx))


def _probe_local(path: Path, fps: float | None = None) -> VideoInfo:
    """``probe`` in this process (no deadline)."""
    if path.is_dir():
        return _rawframe_info(path, fps)
    return _index(path)[0].info()


def _load_local(path: Path, wanted: np.ndarray, backend: str, plugin: str | None = None) -> np.ndarray:
    """Frames ``wanted`` (sorted, distinct, in range) of a video file or raw-frame folder in this process (no
    deadline): uint8 ``(U, H, W, 3)`` in the displayed orientation."""
    if path.is_dir():
        return _load_rawframes(path, wanted)
    index, key = _index(path)
    _check_range(wanted, index.num_frames, path)
    if backend == "decord":
        frames = _decode_decord(path, index, wanted)
    elif backend == "torchcodec":
        frames = _decode_torchcodec(path, index, wanted, key)
    elif plugin is not None:
        frames = _decode_plugin(path, index, wanted, plugin)
    elif backend == "auto" and (dense := _dense_backend(path, index, key, len(wanted))) is not None:
        decode, verdicts = dense
        try:
            frames = decode(path, index, wanted, key)
        except VideoReadError:  # it failed on this read after all: PyAV from now on
            _remember(verdicts, key, False)
            frames = _decode_pyav(path, index, wanted, key)
    else:
        frames = _decode_pyav(path, index, wanted, key)
    return _orient(frames, index.orient)


def _orient(frames: np.ndarray, orient: tuple[int, bool]) -> np.ndarray:
    """(T, H, W, C) as decoded -> as displayed: ``k`` quarter turns counter-clockwise, then mirrored left-right."""
    k, mirrored = orient
    if k % 4:
        frames = np.rot90(frames, k, axes=(1, 2))
    if mirrored:
        frames = frames[:, :, ::-1]
    return np.ascontiguousarray(frames)


# ---------------------------------------------------------------------------------------------------------------------
# Checks and helpers
# ---------------------------------------------------------------------------------------------------------------------


def _as_indices(indices: Sequence[int] | np.ndarray | torch.Tensor, path: Path) -> np.ndarray:
    if hasattr(indices, "detach"):  # a torch tensor
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


def _av_time_base() -> int:
    import av

    return av.time_base


def _open(path: Path) -> av.container.InputContainer:
    import av

    try:
        return av.open(str(path), mode="r")
    except Exception as e:  # av.FFmpegError, and PyAV's other errors on odd containers (metadata it cannot decode)
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
        except Exception as e:  # av.FFmpegError, or PyAV's ValueError/RuntimeError on odd streams: the file's fault
            raise VideoReadError(f"{path}: its video stream cannot be decoded ({_reason(e)}); re-encode it "
                                 f"(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
        if first is None:
            raise VideoReadError(f"{path}: contains no decodable video frames; re-download or re-encode it")
        height, width = first.height, first.width
        if height < 1 or width < 1:
            raise VideoReadError(f"{path}: its frames are {width}x{height} pixels; re-encode it")
        orient = _display_orientation(first, path)

    # 2) Demux every packet (no decoding): pts of the frames, keyframes, corruption.
    with _open(path) as c:
        stream = c.streams.video[0]
        fmt = c.format.name
        declared = int(stream.frames or 0)
        declared_s = c.duration / _av_time_base() if c.duration and c.duration > 0 else None
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
        except VideoReadError:
            raise
        except Exception as e:  # av.FFmpegError and PyAV's other errors on damaged input
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
    times = None
    if seekable and time_base and num_frames > 2 and _variable_rate(pts):
        times = (pts - pts[0]) * time_base  # (N,) seconds from the first frame
        fps = (num_frames - 1) / float(times[-1])  # the mean rate; the nominal one may be any of the rates used
    return _Index(num_frames, fps, height, width, pts, key_index, seekable, orient, times)


def _variable_rate(pts: np.ndarray) -> bool:
    """Whether sorted, distinct presentation timestamps are unevenly spaced: some frame lasts more than
    ``VFR_TOLERANCE`` away from the typical (median) duration, by more than a tick of rounding."""
    durations = np.diff(pts)
    typical = float(np.median(durations))
    return bool(np.any(np.abs(durations - typical) > max(1.0, VFR_TOLERANCE * typical)))


def _display_orientation(frame: av.VideoFrame, path: Path) -> tuple[int, bool]:
    """The display matrix of a decoded frame (the container's rotation and mirroring, FFmpeg's
    ``AV_FRAME_DATA_DISPLAYMATRIX``) as (k, mirrored): ``np.rot90`` by k quarter turns counter-clockwise, then
    mirrored left-right. (0, False) without one; a rotation that is not a multiple of 90 degrees is refused."""
    matrix = None
    try:
        for side in frame.side_data:
            if getattr(getattr(side, "type", None), "name", "") == "DISPLAYMATRIX" and len(bytes(side)) == 36:
                matrix = struct.unpack("=9i", bytes(side))
    except Exception:  # side data PyAV cannot list: no orientation, as a player without it would show
        matrix = None
    if matrix is None:
        return 0, False
    # (p, q) = (column, row) of a stored pixel goes to (a p + c q, b p + d q) on screen (16.16 fixed point).
    a, b, c, d = (matrix[i] / 65536.0 for i in (0, 1, 3, 4))
    signs = [round(v) if abs(abs(v) - 1) < 0.01 or abs(v) < 0.01 else None for v in (a, b, c, d)]
    if None in signs or sum(v != 0 for v in signs) != 2 or abs(signs[0] * signs[3] - signs[1] * signs[2]) != 1:
        angle = float(np.degrees(np.arctan2(b, a)))
        raise VideoReadError(f"{path}: its display matrix turns frames by {angle:.1f} degrees or scales them; only "
                             f"quarter turns and mirroring are applied; re-encode it upright (ffmpeg -i IN OUT.mp4 "
                             f"applies the matrix)")
    a, b, c, d = signs
    grid = np.arange(6).reshape(2, 3)  # a small asymmetric image: where each pixel lands tells the transform
    q, p = np.mgrid[0:2, 0:3]
    x, y = a * p + c * q, b * p + d * q
    shown = np.zeros((y.max() - y.min() + 1, x.max() - x.min() + 1), dtype=grid.dtype)
    shown[y - y.min(), x - x.min()] = grid
    for k in range(4):
        for mirrored in (False, True):
            candidate = np.rot90(grid, k)
            candidate = candidate[:, ::-1] if mirrored else candidate
            if candidate.shape == shown.shape and (candidate == shown).all():
                return k, mirrored
    raise AssertionError("a signed permutation matrix is one of the 8 orientations")  # pragma: no cover


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
        except Exception as e:  # av.FFmpegError, or PyAV's ValueError converting an odd frame: the file's fault
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
        except _SeekMismatch:
            raise
        except Exception:  # av.FFmpegError or another PyAV error: sequential decoding decides (and names it)
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
    if index.orient != (0, False):
        # decord 0.6 applies display matrices its own way: it turns half-turned and mirrored files by 180 degrees and
        # garbles quarter-turned ones (a frame buffer of the turned size filled as stored).
        raise VideoReadError(f"{path}: decord mis-decodes videos with a display rotation (this one is turned "
                             f"{90 * index.orient[0]} degrees{', mirrored' if index.orient[1] else ''}); use "
                             f"backend='auto', 'pyav' or 'torchcodec'")
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
    """Where a random-access backend goes wrong, if anywhere: at a keyframe it seeks to, and the frame after.

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


def _dense_backend(path: Path, index: _Index, key: tuple, num_wanted: int) -> tuple[Any, OrderedDict] | None:
    """``auto``'s choice for this read: for dense reads (at least ``DENSE_READ_FRACTION`` of the frames), the first
    of ``DENSE_BACKENDS`` that has passed the check on this file (``_passes``): its decode function and verdict
    cache. None (PyAV) for everything else."""
    if num_wanted < DENSE_READ_FRACTION * index.num_frames:
        return None
    for name in DENSE_BACKENDS:
        if _passes(name, path, index, key):
            return _DENSE[name]
    return None


def _passes(name: str, path: Path, index: _Index, key: tuple) -> bool:
    """Whether the random-access backend ``name`` is installed, suits this file, and has passed the per-file check
    (``_verify``, run once per file and cached). decord: files up to ``DECORD_MAX_PIXELS`` (its reader refuses files
    with a display matrix).
    torchcodec: files whose packets carry presentation timestamps (``_Index.seekable``), by which it identifies
    frames; on AVI files (decode-order counters) it returns the frame before, where its check may not look."""
    decode, verdicts = _DENSE[name]
    if name == "decord":
        if _decord() is None or index.height * index.width > DECORD_MAX_PIXELS:  # (its reader refuses rotated files)
            return False
    elif _torchcodec() is None or not index.seekable:
        return False
    verdict = _lookup(verdicts, key)
    if verdict is None:
        verdict = _verify(path, index, key, decode)
        _remember(verdicts, key, verdict)
    return verdict


def _verify(path: Path, index: _Index, key: tuple, decode: Any) -> bool:
    """The per-file check of a random-access backend: it reports the index's frame count (its reader checks) and
    returns the frames PyAV returns (mean absolute difference <= ``SAME_FRAME_TOL`` and no closer to the next frame)
    at ``_probe_positions``, read together, and at a frame between keyframes in the middle of the span those cover,
    read alone (torchcodec seeks one frame early in AVI files with a single keyframe, which reads from the start pass).
    Frames as decoded, before the display orientation: like with like."""
    probes = _probe_positions(index)
    span = index.num_frames if index.seekable else min(index.num_frames, _SEQUENTIAL_PROBE_SPAN)
    lone = [m for m in (span // 2, span // 2 + 1) if m not in index.key_index and m < index.num_frames][:1]
    try:
        got = decode(path, index, probes, key).astype(np.int16)
        if lone:
            got = np.concatenate([got, decode(path, index, np.array(lone, dtype=np.int64), key).astype(np.int16)])
    except VideoReadError:
        return False
    asked = np.concatenate([probes, np.array(lone, dtype=np.int64)])
    # References: the frames asked and the frame after each (one more decoded frame; the one before could cost a GOP).
    ref_pos = np.unique(np.minimum(np.concatenate([asked, asked + 1]), index.num_frames - 1))
    ref = _decode_pyav(path, index, ref_pos, key).astype(np.int16)
    for g, p in zip(got, asked.tolist()):
        d_same = float(np.abs(g - ref[np.searchsorted(ref_pos, p)]).mean())
        d_next = float(np.abs(g - ref[np.searchsorted(ref_pos, p + 1)]).mean()) if p + 1 < index.num_frames else np.inf
        if d_same > SAME_FRAME_TOL or d_same > d_next:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# torchcodec
# ---------------------------------------------------------------------------------------------------------------------

# Open torchcodec decoders, per (process, file): its exact mode scans the whole file when it opens, so the chunks of
# one dense read (extraction reads DECODE_CHUNK frames at a time) reuse one decoder. Small: each holds a decoder.
_tc_decoders: OrderedDict[tuple, Any] = OrderedDict()
_TC_OPEN = 2


def _torchcodec_decoder(path: Path, index: _Index, key: tuple) -> Any:
    decoders = _torchcodec()
    if decoders is None:
        raise VideoReadError(f"{path}: backend 'torchcodec' cannot be used: {_torchcodec_missing}; pip install "
                             f"'eleatt[torchcodec]' and the FFmpeg libraries (apt-get install ffmpeg), or use "
                             f"backend='auto' or 'pyav'")
    slot = (os.getpid(), key)
    dec = _lookup(_tc_decoders, slot)
    if dec is None:
        try:
            dec = decoders.VideoDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=PYAV_THREADS,
                                        seek_mode="exact", device="cpu")
            count = dec.metadata.num_frames
        except Exception as e:  # torchcodec reports FFmpeg failures as RuntimeError/ValueError
            raise VideoReadError(f"{path}: torchcodec cannot read it ({_decord_reason(e)}); use backend='auto' or "
                                 f"'pyav'") from None
        if count != index.num_frames:
            raise VideoReadError(f"{path}: torchcodec sees {count} frames, sequential decoding yields "
                                 f"{index.num_frames}; its frame indices would be wrong; use backend='auto' or 'pyav'")
        _remember(_tc_decoders, slot, dec, limit=_TC_OPEN)
    return dec


def _decode_torchcodec(path: Path, index: _Index, wanted: np.ndarray, key: tuple) -> np.ndarray:
    dec = _torchcodec_decoder(path, index, key)
    try:
        frames = dec.get_frames_at(wanted.tolist()).data.numpy()  # (U, H, W, 3) uint8, NHWC
        turned = round((dec.metadata.rotation or 0) / 90) % 4
    except Exception as e:
        with _lock:
            _tc_decoders.pop((os.getpid(), key), None)
        raise VideoReadError(f"{path}: torchcodec failed to decode frames ({_decord_reason(e)}); use "
                             f"backend='auto' or 'pyav'") from None
    if turned:  # torchcodec turns frames by the rotation but ignores mirroring: undo it, the file's own is applied
        frames = np.rot90(frames, -turned, axes=(1, 2))
    if frames.shape != (len(wanted), index.height, index.width, 3):
        raise VideoReadError(f"{path}: torchcodec returned frames of shape {frames.shape}, expected "
                             f"{(len(wanted), index.height, index.width, 3)}; use backend='auto' or 'pyav'")
    return frames


# auto's random-access backends: name -> (decode(path, index, wanted, key), verdict cache).
_DENSE: dict[str, tuple[Any, OrderedDict]] = {
    "decord": (lambda p, i, w, k: _decode_decord(p, i, w), _decord_ok),
    "torchcodec": (lambda p, i, w, k: _decode_torchcodec(p, i, w, k), _torchcodec_ok),
}


# ---------------------------------------------------------------------------------------------------------------------
# Backends added with register_backend
# ---------------------------------------------------------------------------------------------------------------------


def _decode_plugin(path: Path, index: _Index, wanted: np.ndarray, target: str) -> np.ndarray:
    try:
        fn = _plugin(target)
    except Exception as e:
        raise VideoReadError(f"{path}: the video backend {target} cannot be imported ({type(e).__name__}: {e}); "
                             f"check the register_backend target, or use backend='auto'") from None
    try:
        frames = np.asarray(fn(str(path), wanted.copy()))
    except UserError:
        raise
    except Exception as e:  # the backend's library failed on this file
        raise VideoReadError(f"{path}: the video backend {target} failed ({type(e).__name__}: {e}); use "
                             f"backend='auto' or 'pyav'") from None
    if frames.dtype != np.uint8 or frames.shape != (len(wanted), index.height, index.width, 3):
        raise VideoReadError(f"{path}: the video backend {target} returned {frames.dtype} frames of shape "
                             f"{frames.shape}, expected uint8 {(len(wanted), index.height, index.width, 3)}; use "
                             f"backend='auto' or 'pyav'")
    return frames


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
    except Exception as e:  # OSError, PIL's DecompressionBombError, ValueError: all the file's fault
        raise VideoReadError(f"{path}: not a readable image ({e}); re-extract the frames") from None


def _rawframe_info(folder: Path, fps: float | None) -> VideoInfo:
    files = _rawframe_files(folder)
    from PIL import Image

    try:
        with Image.open(files[0]) as im:
            width, height = im.size
    except Exception as e:  # OSError, PIL's DecompressionBombError: the file's fault
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
