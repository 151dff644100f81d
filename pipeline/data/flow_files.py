"""Stored optical flow: quantisation, the per-video flow file, flow folders, JPEG folders, and flow stacks.

No flow is computed here (that is `preprocessing/flow.py`); this module reads and writes what it computes.

**Quantisation** (mmaction2/denseflow): ``q = round((clip(f, -bound, bound) + bound) / (2 * bound) * 255)`` as uint8,
``f = q / 255 * 2 * bound - bound`` back (a step is ``2 * bound / 255`` px, 0.157 px at the default bound 20; zero
motion is stored as 128, i.e. +0.078 px). A horizontal mirror maps ``q -> 255 - q`` exactly (``hflip(flow=True)``).

**The flow file** (``<video stem>.flow.zip``): an uncompressed (stored) zip -- readable with any unzip tool --
holding ``meta.json`` (``format``, ``version``, ``bound``, ``pairs``, ``height``, ``width``) and one 8-bit greyscale
PNG per frame pair ``i`` (0-based), ``000000.png``, ``000001.png``, ...: the x plane on top of the y plane, an image
``(2H, W)``. PNG is lossless; with the Paeth filter and zlib's run-length strategy at level 1 it encodes ~1000
pairs/s at 340x256 on one core and takes 1.5-1.9x the bytes of mmaction2's lossy JPEG (quality 95) frames of the same
flow (``python -m pipeline.benchmarks.flow``). The zip's central directory gives each pair's offset, so reading
pairs ``indices`` decodes only those PNGs.

**Reading is validated** (a flow file is untrusted input): before any pixel is read, ``meta.json`` must hold values
in range (a finite bound in (0, 1e4), pairs, a frame size of at most ``MAX_FLOW_PIXELS``, a finite positive fps)
and the zip must hold exactly ``meta.json`` and the ``pairs`` PNGs, each stored (never compressed: a zip bomb fails
before inflating anything), unencrypted and no larger than a PNG of that frame size can be; each PNG's header must
give that size before it is decoded. Memory is bounded by the pairs asked for plus one member. A violation raises
`FlowFileError` naming the file, the reason and the fix.

**Flow stacks** (the flow stream's input, TSN): for a sampled frame ``t`` the ``L`` pairs ``t .. t+L-1`` (the last
pair repeated past the end), channels interleaved ``x1, y1, ..., xL, yL``. The network sees flow divided by the
bound (``normalize_flow``: pixels -> [-1, 1], zero motion ~0), recorded as ``"flow_norm": "bound"``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pipeline.data.features import FeatureFolder, FeatureSettings, SettingsFormatError, number_in
from pipeline.paths import atomic_write
from pipeline.errors import InputNotFoundError, UsageError

__all__ = [
    "DEFAULT_BOUND",
    "FLOW_SUFFIX",
    "FlowArray",
    "FlowFile",
    "FlowFileError",
    "FlowFolder",
    "FlowOptions",
    "FlowWriter",
    "dequantize",
    "export_jpg",
    "flow_data_config",
    "flow_folder_settings",
    "flow_info",
    "flow_stack",
    "jpeg_bytes",
    "load_flow",
    "load_quantized",
    "normalize_flow",
    "quantize",
    "read_jpg_folder",
    "stack_indices",
    "stack_levels",
]

DEFAULT_BOUND = 20.0
MAX_BOUND = 1e4  # pixels: a larger bound is damage (1e39 would overflow float32 and dequantize to NaN)
MAX_FLOW_SIDE = 8192  # the stored frame's height or width, in pixels
MAX_FLOW_PIXELS = 4096 * 4096  # height x width of a stored frame (a 4K frame is 8.3 M)
MAX_PAIRS = 10_000_000  # frame pairs in one file (~46 hours at 60 fps)
META_BYTES = 4096  # meta.json is ~120 bytes
FLOW_SUFFIX = ".flow.zip"
FORMAT = "eleatt-flow-png-zip"
VERSION = 1
META = "meta.json"
FLOW_NORM = "bound"  # flow stacks are divided by the bound: pixels -> [-1, 1]
# PNG settings measured in the module docstring: Paeth + RLE is both the smallest and among the fastest here.
_PNG_PARAMS = None  # filled on first use (cv2 is imported lazily: `import pipeline.data` must not need OpenCV)
_JPG_RE = re.compile(r"^(flow_)?([xy])_(\d+)\.(jpg|jpeg)$", re.IGNORECASE)


@dataclass(frozen=True)
class FlowOptions:
    """How a flow folder's flow was computed: the ``options`` of its `FeatureSettings` (modality "flow"), and of
    every flow-stream feature folder made from it, so that classify computes a new video's flow the same way.

    Fields:
        method: "dis", "farneback", "tvl1", "raft", or "jpg" (imported mmaction2/denseflow JPEGs: not recomputable).
        preset: "fast" or "medium" ("none" for imported flow).
        short_side: frames resized to this short side before the flow (None: the decoded size).
        bound: the quantisation bound in pixels.
        format: the flow file format (``eleatt-flow-png-zip``).
        flow_norm: what the network sees: "bound" (flow divided by the bound, in [-1, 1]).
        raft: RAFT's variant ("large", "small"), None for other methods.
        weights: the RAFT weights file's name, None for other methods.
    """

    method: str = "dis"
    preset: str = "fast"
    short_side: int | None = 256
    bound: float = DEFAULT_BOUND
    format: str = FORMAT
    flow_norm: str = FLOW_NORM
    raft: str | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        _check_bound(self.bound)
        object.__setattr__(self, "bound", float(self.bound))
        checks = (("method", self.method in ("dis", "farneback", "tvl1", "raft", "jpg")),
                  ("preset", self.preset in ("fast", "medium", "none")),
                  ("short_side", self.short_side is None or (isinstance(self.short_side, int) and not isinstance(
                      self.short_side, bool) and 1 <= self.short_side <= MAX_FLOW_SIDE)),
                  ("format", self.format == FORMAT), ("flow_norm", self.flow_norm == FLOW_NORM),
                  ("raft", self.raft is None or isinstance(self.raft, str)),
                  ("weights", self.weights is None or isinstance(self.weights, str)))
        for name, ok in checks:
            if not ok:
                raise UsageError(f"flow option {name} {str(getattr(self, name))[:60]!r} is not one this version "
                                 f"knows (short_side: 1..{MAX_FLOW_SIDE} or null)")

    def to_options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, settings: FeatureSettings, source: str | os.PathLike = "<settings>") -> "FlowOptions":
        """The flow options recorded in ``settings`` (a flow folder's or a flow-stream feature folder's)."""
        if settings.modality != "flow":
            raise SettingsFormatError(f"'{source}': settings of modality {settings.modality!r} record no flow options")
        options = dict(settings.options)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(options) - known), sorted(known - set(options) - {"raft", "weights"})
        if unknown or missing:
            raise SettingsFormatError(f"'{source}': flow options with unknown keys {unknown}, missing keys {missing} "
                                      f"(known: {sorted(known)}); make the flow folder again with `eleatt flow`")
        try:
            return cls(**options)
        except (TypeError, ValueError, OverflowError) as err:
            raise SettingsFormatError(f"'{source}': bad flow options: {err}") from None


def flow_folder_settings(options: FlowOptions) -> FeatureSettings:
    """The settings of a flow folder: modality "flow", no backbone, one flow field (x, y: 2 channels) per item."""
    return FeatureSettings(modality="flow", in_chans=2, options=options.to_options())


def flow_data_config(data_config: Mapping[str, Any], stack: int) -> dict[str, Any]:
    """A backbone's data config for flow stacks of ``stack`` fields: ``2 * stack`` channels, mean 0.5, std 0.5.

    The flow stream feeds the stored uint8 levels ``q`` (so resizing and cropping run on uint8, as for RGB); with
    mean 0.5 and std 0.5 per channel, ``(q / 255 - 0.5) / 0.5 = f / bound`` (``normalize_flow``): the network sees
    flow divided by the bound, in [-1, 1], zero motion at ~0 (``flow_norm: "bound"``). A flip maps ``q -> 255 - q``,
    which is exactly ``-f / bound``.
    """
    chans = 2 * int(stack)
    size = tuple(data_config["input_size"])
    return {**dict(data_config), "input_size": (chans, *size[1:]), "mean": (0.5,) * chans, "std": (0.5,) * chans}


def _cv2():
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise ImportError("OpenCV is needed for flow files: pip install opencv-python-headless") from err
    return cv2


def _png_params() -> list[int]:
    global _PNG_PARAMS
    if _PNG_PARAMS is None:
        cv2 = _cv2()
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
        if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11; older builds let libpng choose the filter
            params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]
        # OpenCV's libpng can be bound to another library's older zlib (decord's, when decord was loaded before
        # cv2): it then reports success and writes damaged PNGs. One round trip per process catches that before
        # any flow file is written, instead of leaving files that fail only when read.
        probe = np.arange(64 * 32, dtype=np.uint32).reshape(64, 32).astype(np.uint8)
        ok, png = cv2.imencode(".png", probe, params)
        back = cv2.imdecode(png, cv2.IMREAD_UNCHANGED) if ok else None
        if back is None or not np.array_equal(back, probe):
            raise RuntimeError(
                "OpenCV's PNG codec is broken in this process (libpng is bound to an incompatible zlib, typically "
                "because decord was imported before cv2), so flow files cannot be written or read here; import "
                "cv2 (or pipeline.data.video) before decord, or run the flow step in a fresh process")
        _PNG_PARAMS = params
    return _PNG_PARAMS


def _check_bound(bound: float) -> float:
    bound = float(bound)
    if not (np.isfinite(bound) and 0 < bound < MAX_BOUND):
        raise UsageError(f"flow bound {bound}: must be a positive number of pixels below {MAX_BOUND:g} (default "
                         f"{DEFAULT_BOUND})")
    return bound


class FlowFileError(UsageError):
    """A flow file that exists but cannot be used: not a zip, damaged, values out of range, members that are not
    the format's (compressed, encrypted, extra, missing or too large)."""


# ---------------------------------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------------------------------
def quantize(flow: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """Float flow in pixels (any shape) -> uint8 levels, clipped to +-bound (the mmaction2 formula)."""
    bound = _check_bound(bound)
    flow = np.asarray(flow, dtype=np.float32)
    q = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return np.rint(q).astype(np.uint8)


def dequantize(q: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """uint8 levels -> float32 flow in pixels (the inverse of `quantize` within half a step)."""
    bound = _check_bound(bound)
    return np.asarray(q, dtype=np.float32) * np.float32(2.0 * bound / 255.0) - np.float32(bound)


def normalize_flow(flow, bound: float = DEFAULT_BOUND):
    """Flow in pixels (numpy or torch) -> the network's input: divided by the bound, in [-1, 1]."""
    return flow / _check_bound(bound)


# ---------------------------------------------------------------------------------------------------------------------
# The flow file
# ---------------------------------------------------------------------------------------------------------------------
class FlowWriter:
    """Writes one flow file pair by pair (memory stays one pair), e.g. to a temporary path later renamed.

    Usage: ``with FlowWriter(path, bound) as w: w.add(q)`` for each pair ``q`` uint8 ``(2, H, W)`` (x, y). `path`
    may also be a binary file open for writing (see `FlowFolder.writer`, which writes whole files or none).
    """

    def __init__(self, path, bound: float = DEFAULT_BOUND, fps: float | None = None):
        self.bound = _check_bound(bound)
        self.fps = None if fps is None else float(fps)  # the source's frame rate (fps sampling of flow stacks)
        self.pairs = 0
        self.shape: tuple[int, int] | None = None
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED)

    def add(self, q: np.ndarray) -> None:
        q = np.asarray(q)
        if q.dtype != np.uint8 or q.ndim != 3 or q.shape[0] != 2:
            raise UsageError(f"a flow pair must be uint8 (2, H, W) (x, y), got {q.dtype} {tuple(q.shape)}")
        if self.shape is None:
            h, w = int(q.shape[1]), int(q.shape[2])
            if max(h, w) > MAX_FLOW_SIDE or h * w > MAX_FLOW_PIXELS:
                raise UsageError(f"flow frames of {w}x{h} are larger than a flow file holds (at most "
                                 f"{MAX_FLOW_PIXELS} pixels, {MAX_FLOW_SIDE} a side); compute the flow at a smaller "
                                 "size (--short-side)")
            self.shape = (h, w)
        elif q.shape[1:] != self.shape:
            raise UsageError(f"flow pair {self.pairs} is {q.shape[1]}x{q.shape[2]}, the file's pairs are "
                             f"{self.shape[0]}x{self.shape[1]}")
        ok, png = _cv2().imencode(".png", q.reshape(2 * q.shape[1], q.shape[2]), _png_params())  # (2H, W)
        if not ok:
            raise UsageError(f"PNG encoding of flow pair {self.pairs} failed")
        self._zip.writestr(f"{self.pairs:06d}.png", png.tobytes())
        self.pairs += 1

    def close(self) -> None:
        if self._zip is None:
            return
        h, w = self.shape or (0, 0)
        meta = {"format": FORMAT, "version": VERSION, "bound": self.bound, "pairs": self.pairs,
                "height": h, "width": w}
        if self.fps is not None:
            meta["fps"] = self.fps
        self._zip.writestr(META, json.dumps(meta, sort_keys=True))
        self._zip.close()
        self._zip = None

    def __enter__(self) -> "FlowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_flow(path: str | os.PathLike, q: np.ndarray, bound: float = DEFAULT_BOUND) -> None:
    """Writes a whole uint8 ``(N, 2, H, W)`` quantised flow array to ``path`` (not atomic; see FlowFolder)."""
    with FlowWriter(path, bound) as w:
        for pair in q:
            w.add(pair)


# What reading a damaged zip can raise besides BadZipFile: a truncated or garbled directory (struct, EOF, seek
# and decoding errors), an unknown compression method.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError, IndexError,
               OverflowError, NotImplementedError, RuntimeError, struct.error)
_REDO = "delete it and rerun `eleatt flow` (it resumes)"


def _png_bytes(height: int, width: int) -> int:
    """The most bytes a PNG of one stored pair (8-bit grey, (2H, W)) can take: its rows with their filter bytes,
    zlib's stored blocks at worst, chunk headers, and room for small ancillary chunks."""
    return int(2 * height * (width + 1) * 1.01) + 4096


def _int_in(meta: dict, key: str, low: int, high: int) -> bool:
    value = meta.get(key)
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_meta(meta: Any, path: Path) -> dict:
    """meta.json's values within range, or FlowFileError naming the first that is not."""
    if not isinstance(meta, dict):
        raise FlowFileError(f"'{path}': meta.json is not a JSON object; {_REDO}")
    if meta.get("format") != FORMAT or not _int_in(meta, "version", 1, 1 << 30):
        raise FlowFileError(f"'{path}': not a flow file (format {str(meta.get('format'))[:60]!r}, version "
                            f"{str(meta.get('version'))[:20]!r}; expected {FORMAT!r}); {_REDO}")
    if meta["version"] > VERSION:
        raise FlowFileError(f"'{path}': flow format version {meta['version']} is newer than this version reads "
                            f"({VERSION}); upgrade eleatt")
    bound = meta.get("bound")
    if not number_in(bound, 0, MAX_BOUND):
        raise FlowFileError(f"'{path}': meta.json bound {str(bound)[:30]} is not a number of pixels in (0, "
                            f"{MAX_BOUND:g}); {_REDO}")
    pairs_ok = _int_in(meta, "pairs", 0, MAX_PAIRS)
    empty = pairs_ok and meta["pairs"] == 0
    sides_ok = all(_int_in(meta, k, 0 if empty else 1, MAX_FLOW_SIDE) for k in ("height", "width"))
    if not (pairs_ok and sides_ok) or meta["height"] * meta["width"] > MAX_FLOW_PIXELS:
        raise FlowFileError(f"'{path}': meta.json pairs {str(meta.get('pairs'))[:30]}, height "
                            f"{str(meta.get('height'))[:30]}, width {str(meta.get('width'))[:30]} are not counts in "
                            f"range (pairs <= {MAX_PAIRS}, frames of at most {MAX_FLOW_SIDE} px a side and "
                            f"{MAX_FLOW_PIXELS} pixels); {_REDO}")
    fps = meta.get("fps")
    if fps is not None and not number_in(fps, 0, 1e4):
        raise FlowFileError(f"'{path}': meta.json fps {str(fps)[:30]} is not a positive frame rate; {_REDO}")
    return meta


def _check_members(zf: zipfile.ZipFile, meta: dict, path: Path) -> None:
    """The zip holds meta.json and pairs PNGs named 000000.png, ..., each stored, unencrypted, within size."""
    infos = zf.infolist()
    pairs, limit = meta["pairs"], _png_bytes(meta["height"], meta["width"])
    if len(infos) != pairs + 1:
        raise FlowFileError(f"'{path}' holds {len(infos)} members, but a flow file of {pairs} pairs (its meta.json) "
                            f"holds {pairs + 1}: meta.json and a PNG per pair; {_REDO}")
    for info in infos:
        name = info.filename
        if name != META and not (len(name) == 10 and name.endswith(".png") and name[:6].isdigit()
                                 and name[:6].isascii() and int(name[:6]) < pairs):
            raise FlowFileError(f"'{path}': member {name[:60]!r} is not one of the format's (meta.json, "
                                f"000000.png .. {pairs - 1:06d}.png); {_REDO}")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise FlowFileError(f"'{path}': member {name!r} is compressed or encrypted; flow files store their "
                                f"members as they are (a zip bomb is refused before inflating); {_REDO}")
        if info.file_size != info.compress_size or info.file_size > (META_BYTES if name == META else limit):
            raise FlowFileError(f"'{path}': member {name!r} declares {info.file_size} bytes, more than a "
                                f"{'meta.json' if name == META else 'PNG of the frame size'} can take; {_REDO}")
    if len({info.filename for info in infos}) != len(infos):
        raise FlowFileError(f"'{path}' names a member twice; {_REDO}")


def _open(path: Path) -> tuple[zipfile.ZipFile, dict]:
    """The open zip and its validated meta.json (see the module's "Reading is validated")."""
    if not path.is_file():
        raise InputNotFoundError(f"flow file '{path}' not found (compute it with `eleatt flow`)")
    zf = None
    try:
        zf = zipfile.ZipFile(path)
        info = zf.getinfo(META)
        if info.file_size > META_BYTES or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise FlowFileError(f"'{path}': its meta.json is compressed, encrypted or {info.file_size} bytes long; "
                                f"{_REDO}")
        meta = _check_meta(json.loads(zf.read(META).decode("utf-8")), path)
        _check_members(zf, meta, path)
        return zf, meta
    except FlowFileError:
        if zf is not None:
            zf.close()
        raise
    except (*_ZIP_ERRORS, RecursionError) as err:  # JSON and UTF-8 errors are ValueErrors
        if zf is not None:
            zf.close()
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
        raise FlowFileError(f"'{path}' is not a flow file or is damaged ({reason}); {_REDO}") from None


def _png_size(png: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) from a PNG's IHDR chunk, or None when it is not a PNG."""
    if len(png) < 33 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        return None
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big"), png[24], png[25]


def flow_info(path: str | os.PathLike) -> dict:
    """The header of a flow file: ``bound``, ``pairs``, ``height``, ``width`` (and ``format``, ``version``; ``fps``,
    the source's frame rate, in files written by `eleatt flow` since the flow stream)."""
    zf, meta = _open(Path(path))
    zf.close()
    return meta


def _indices(indices: Sequence[int] | np.ndarray | None, pairs: int, path: Path) -> np.ndarray:
    if indices is None:
        return np.arange(pairs)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise UsageError(f"{path}: flow pair indices must be 1-D integers, got {idx.dtype} {tuple(idx.shape)}")
    if idx.size and (idx.min() < 0 or idx.max() >= pairs):
        bad = int(idx[(idx < 0) | (idx >= pairs)][0])
        raise UsageError(f"{path}: flow pair index {bad} out of range: the file has {pairs} pairs (0..{pairs - 1})")
    return idx.astype(np.int64)


def load_quantized(path: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None
                   ) -> tuple[np.ndarray, float]:
    """The stored levels uint8 ``(N, 2, H, W)`` (x, y) of pairs ``indices`` (default all), and the file's bound.

    Only the asked pairs are read and decoded (each distinct one once; repeats and any order allowed).
    """
    path = Path(path)
    zf, meta = _open(path)
    with zf:
        idx = _indices(indices, int(meta["pairs"]), path)
        h, w = int(meta["height"]), int(meta["width"])
        out = np.empty((len(idx), 2, h, w), dtype=np.uint8)
        cv2 = _cv2()
        _png_params()  # the codec's self-test: a broken libpng must not pass for a damaged file
        first: dict[int, int] = {}  # pair -> where it was decoded into `out` (a repeat is copied from there)
        for k, i in enumerate(idx.tolist()):
            if i in first:
                out[k] = out[first[i]]
                continue
            damaged = f"'{path}': flow pair {i} is damaged"
            try:
                png = zf.read(f"{i:06d}.png")
            except _ZIP_ERRORS as err:
                raise FlowFileError(f"{damaged} ({type(err).__name__}: {str(err)[:100]}); {_REDO}") from None
            if _png_size(png) != (2 * h, w, 8, 0):  # checked before decoding: the header sizes the allocation
                raise FlowFileError(f"{damaged} (not an 8-bit grey PNG of {2 * h}x{w}); {_REDO}")
            try:
                img = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            except cv2.error:
                img = None
            if img is None or img.shape != (2 * h, w) or img.dtype != np.uint8:
                raise FlowFileError(f"{damaged} (its PNG data do not decode); {_REDO}")
            out[k] = img.reshape(2, h, w)
            first[i] = k
    return out, float(meta["bound"])


def load_flow(path: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Flow of pairs ``indices`` (default all) as float32 ``(N, 2, H, W)`` in pixels, x first.

    Pair ``i`` is the motion from frame ``i`` to frame ``i + 1`` (a video of T frames has T - 1 pairs).
    """
    q, bound = load_quantized(path, indices)
    return dequantize(q, bound)


# ---------------------------------------------------------------------------------------------------------------------
# Flow stacks (the flow stream's input)
# ---------------------------------------------------------------------------------------------------------------------
def stack_indices(positions: Sequence[int] | np.ndarray, num_pairs: int, length: int = 5) -> np.ndarray:
    """int64 ``(P, L)``: pairs ``t, t+1, ..., t+L-1`` for each sampled frame ``t``, clamped to the last pair.

    Positions are frame indices (as the RGB sampling gives them); a position at or past the last pair starts at
    the last pair, so a stack near the end repeats it.
    """
    if length < 1:
        raise UsageError(f"flow stack length {length}: must be >= 1 (TSN uses 5)")
    if num_pairs < 1:
        raise UsageError("the video has no flow pairs (it needs at least 2 frames)")
    pos = np.asarray(positions, dtype=np.int64).reshape(-1, 1)  # (P, 1)
    return np.clip(pos + np.arange(length)[None], 0, num_pairs - 1)  # (P, L)


def flow_stack(path: str | os.PathLike, positions: Sequence[int] | np.ndarray, length: int = 5,
               normalize: bool = True) -> np.ndarray:
    """Flow stacks float32 ``(P, 2L, H, W)`` interleaved ``x1, y1, ..., xL, yL`` for sampled frames ``positions``.

    Read with ``load_flow(path, indices)`` (only the pairs needed); ``normalize`` divides by the file's bound
    (``normalize_flow``, [-1, 1]), else pixels. Flip a stack with ``transforms.hflip(stack, flow=True)``.
    """
    info = flow_info(path)
    idx = stack_indices(positions, int(info["pairs"]), length)  # (P, L)
    q, bound = load_quantized(path, idx.reshape(-1))  # (P * L, 2, H, W)
    flow = dequantize(q, bound)
    p, h, w = idx.shape[0], flow.shape[-2], flow.shape[-1]
    stack = flow.reshape(p, 2 * length, h, w)  # (P, L, 2, H, W) -> (P, 2L, H, W): x1, y1, x2, y2, ...
    return normalize_flow(stack, bound) if normalize else stack


class FlowFile:
    """A stored flow file as the flow stream's source: ``pairs``, ``bound``, ``fps``; ``quantized(indices)`` reads
    only the pairs asked for. ``fps`` (the source video's rate) comes from the file, else from the argument
    (e.g. the flow folder's manifest record), else None."""

    def __init__(self, path: str | os.PathLike, fps: float | None = None) -> None:
        self.path = Path(path)
        meta = flow_info(self.path)
        self.pairs, self.bound = int(meta["pairs"]), float(meta["bound"])
        recorded = meta.get("fps")
        self.fps = float(recorded) if recorded else (float(fps) if fps else None)

    def quantized(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return load_quantized(self.path, indices)[0]  # (N, 2, H, W) uint8

    def __str__(self) -> str:
        return str(self.path)


class FlowArray:
    """Quantised flow held in memory (a new video's, computed by classify) as the flow stream's source."""

    def __init__(self, q: np.ndarray, bound: float, fps: float | None = None, name: str = "<flow>") -> None:
        q = np.asarray(q)
        if q.dtype != np.uint8 or q.ndim != 4 or q.shape[1] != 2:
            raise UsageError(f"flow levels must be uint8 (N, 2, H, W), got {q.dtype} {tuple(q.shape)}")
        self.q, self.bound, self.pairs, self.name = q, _check_bound(bound), int(q.shape[0]), name
        self.fps = float(fps) if fps else None

    def quantized(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.q[_indices(indices, self.pairs, Path(self.name))]  # (N, 2, H, W) uint8

    def __str__(self) -> str:
        return self.name


def stack_levels(source: FlowFile | FlowArray, positions: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """The flow stream's images: uint8 levels ``(P, H, W, 2L)`` channels-last, ``x1, y1, ..., xL, yL`` per
    sampled position (the last pair repeated near the end), as ``eval_views`` takes frames. The levels are the
    stored ones exactly; the data config's mean/std (``flow_data_config``) turn them into ``f / bound``."""
    idx = stack_indices(positions, source.pairs, length)  # (P, L)
    q = source.quantized(idx.reshape(-1))  # (P * L, 2, H, W)
    p, h, w = idx.shape[0], q.shape[-2], q.shape[-1]
    return np.ascontiguousarray(q.reshape(p, 2 * length, h, w).transpose(0, 2, 3, 1))  # (P, H, W, 2L)


# ---------------------------------------------------------------------------------------------------------------------
# Flow folders
# ---------------------------------------------------------------------------------------------------------------------
class FlowFolder(FeatureFolder):
    """A flow folder: the feature-folder layout (settings, manifest, failed) with one ``.flow.zip`` per video."""

    suffix = FLOW_SUFFIX
    kind = "flow folder"
    what, command = "flow", "eleatt flow"

    @contextlib.contextmanager
    def writer(self, video: str, bound: float, fps: float | None = None) -> Iterator[FlowWriter]:
        """`with folder.writer(video, bound) as w: w.add(q)...`: the video's flow file, written whole (through the
        folder's temporary folder, as every feature file is) or not at all; the manifest record comes after."""
        target = self.feature_path(video)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "wb", tmp_dir=self.tmp_dir) as f:
            with FlowWriter(f, bound, fps=fps) as w:
                yield w
            if w.pairs == 0:
                raise UsageError(f"'{video}': no frame pairs to store")

    def record(self, video: str, **extra) -> dict:
        """Appends the manifest record of a committed video: ``video``, ``feature``, ``pairs``, ... (from the file)."""
        target = self.feature_path(video)
        meta = flow_info(target)
        stat = target.stat()  # what a resume compares instead of reading the file again (see `_whole`)
        record = {"video": video, "feature": self.relative(target), "pairs": int(meta["pairs"]),
                  "height": int(meta["height"]), "width": int(meta["width"]), **extra,
                  "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self._append(self.manifest_path, record)
        return record

    def write_quantized(self, video: str, q: np.ndarray | Iterable[np.ndarray], bound: float, **extra) -> dict:
        """Stores uint8 pairs ``(N, 2, H, W)`` (or an iterable of ``(2, H, W)``) atomically, then records them."""
        with self.writer(video, bound) as w:
            for pair in q:
                w.add(pair)
        return self.record(video, **extra)

    def _whole(self, record: dict) -> bool:
        """A flow file is whole when its zip directory reads, validates (`_open`: every pair's member, in range)
        and counts the pairs of its record (a truncated or overwritten file is redone by a rerun, as the feature
        folder's .npy checks do).

        That full check reads the zip's directory (a member per pair). A file whose size and modification time are
        the ones its record noted when it was written (`bytes`, `mtime_ns`) has not been written since: it is
        whole without being opened, so that a resume costs a `stat` per file, not a read of every pair's name.
        Any other file (deleted, truncated, rewritten, copied elsewhere, or recorded before these fields) gets the
        full check."""
        path = self.record_path(record, self._dirs)
        if path is None:
            return False
        try:
            stat = path.stat()
        except OSError:
            return False
        size, mtime = record.get("bytes"), record.get("mtime_ns")
        if (type(size) is int and type(mtime) is int and stat.st_size == size and stat.st_mtime_ns == mtime
                and type(record.get("pairs")) is int and record["pairs"] >= 1):
            return True
        try:
            zf, meta = _open(path)
            zf.close()
        except (OSError, ValueError):
            return False
        pairs = meta["pairs"]
        return pairs >= 1 and record.get("pairs", pairs) == pairs

    def load(self, video: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:  # type: ignore[override]
        """``load_flow`` of the video's file: float32 ``(N, 2, H, W)`` pixels; a clear error when it is missing."""
        return load_flow(self.existing(video), indices)


# ---------------------------------------------------------------------------------------------------------------------
# mmaction2 / denseflow JPEG folders
# ---------------------------------------------------------------------------------------------------------------------
def jpg_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The x and y JPEGs of a folder (``x_00001.jpg``/``y_...`` or ``flow_x_00001.jpg``/``flow_y_...``), in order.

    Raises ValueError when the folder has none, mixes both namings, or the x and y numbers differ.
    """
    folder = Path(folder)
    found: dict[tuple[str, str], dict[int, Path]] = {}
    for p in folder.iterdir():
        m = _JPG_RE.match(p.name)
        if m and p.is_file():
            found.setdefault((m.group(1) or "", m.group(2).lower()), {})[int(m.group(3))] = p
    prefixes = {prefix for prefix, _ in found}
    if not found:
        raise UsageError(f"'{folder}' holds no flow JPEGs (x_00001.jpg/y_00001.jpg or flow_x_00001.jpg/"
                         "flow_y_00001.jpg)")
    if len(prefixes) > 1:
        raise UsageError(f"'{folder}' mixes x_*.jpg and flow_x_*.jpg names; keep one naming per folder")
    prefix = prefixes.pop()
    xs, ys = found.get((prefix, "x"), {}), found.get((prefix, "y"), {})
    if sorted(xs) != sorted(ys):
        only = sorted(set(xs) ^ set(ys))
        raise UsageError(f"'{folder}': x and y flow JPEGs do not match (e.g. number {only[0]} has only one of them)")
    numbers = sorted(xs)
    return [xs[n] for n in numbers], [ys[n] for n in numbers]


def read_jpg_folder(folder: str | os.PathLike) -> Iterator[np.ndarray]:
    """The quantised pairs uint8 ``(2, H, W)`` of a JPEG flow folder, in number order (one pair in memory)."""
    cv2 = _cv2()
    xs, ys = jpg_files(folder)
    shape = None
    for px, py in zip(xs, ys):
        _check_image_size(px)
        _check_image_size(py)
        x = cv2.imread(str(px), cv2.IMREAD_GRAYSCALE)
        y = cv2.imread(str(py), cv2.IMREAD_GRAYSCALE)
        if x is None or y is None:
            raise UsageError(f"'{px if x is None else py}' is not a readable JPEG")
        if x.shape != y.shape or (shape is not None and x.shape != shape):
            raise UsageError(f"'{px}' and '{py}' differ in size from the folder's first frame ({shape or x.shape})")
        shape = x.shape
        yield np.stack([x, y])  # (2, H, W)


def _check_image_size(path: Path) -> None:
    """Refuses, from its header alone, an image larger than a stored flow frame may be (a JPEG whose header claims
    65535x65535 would make the decoder allocate gigabytes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        raise UsageError(f"'{path}' is not a readable JPEG") from None
    if max(h, w) > MAX_FLOW_SIDE or h * w > MAX_FLOW_PIXELS:
        raise UsageError(f"'{path}' is {w}x{h}: larger than a flow frame may be (at most {MAX_FLOW_PIXELS} pixels, "
                         f"{MAX_FLOW_SIDE} a side); resize the flow before importing it")


def export_jpg(path: str | os.PathLike, dest: str | os.PathLike, prefix: str = "", quality: int = 95) -> int:
    """Writes a flow file as mmaction2 JPEGs ``dest/{prefix}x_00001.jpg``, ``{prefix}y_00001.jpg``, ...

    ``prefix``: ``""`` (``x_00001.jpg``, mmaction2's rawframes) or ``"flow_"`` (denseflow). JPEG is lossy (the
    levels come back within ~2 at quality 95). Each JPEG is written atomically. Returns the number of pairs written.
    """
    if prefix not in ("", "flow_"):
        raise UsageError(f"JPEG prefix {prefix!r}: use '' (x_00001.jpg) or 'flow_' (flow_x_00001.jpg)")
    cv2 = _cv2()
    q, _ = load_quantized(path)  # (N, 2, H, W)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    for i, pair in enumerate(q, 1):
        for c, name in enumerate("xy"):
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(pair[c]), params)
            if not ok:
                raise UsageError(f"JPEG encoding failed for pair {i} of '{path}'")
            with atomic_write(dest / f"{prefix}{name}_{i:05d}.jpg") as f:
                f.write(buf.tobytes())
    return len(q)


def jpeg_bytes(q: np.ndarray, quality: int = 95) -> int:
    """The bytes mmaction2/denseflow's layout takes for uint8 ``(N, 2, H, W)``: one JPEG per plane (no write)."""
    cv2 = _cv2()
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    return sum(len(cv2.imencode(".jpg", np.ascontiguousarray(plane), params)[1]) for pair in q for plane in pair)
