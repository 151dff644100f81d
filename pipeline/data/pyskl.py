"""pyskl / mmaction2 skeleton annotation files, read without letting the pickle run code.

The format (pyskl's `ntu60_3danno.pkl`, `ntu120_3danno.pkl`, `ntu60_hrnet.pkl`, ..., and mmaction2's skeleton
datasets): a pickle of `{"split": {name: [frame_dir, ...]}, "annotations": [{...}, ...]}`, one annotation per
sample with `frame_dir` (the sample's name, e.g. `S001C001P001R001A001`), `label` (0-based), `keypoint` float
(M, T, V, C) (M bodies, T frames, V joints, C = 3 for x/y/z in metres or 2 for x/y in pixels), and for 2D files
`keypoint_score` (M, T, V) and `img_shape` (height, width). Absent bodies are zeros.

A pickle can run any code when loaded, so `load_pickle` never uses `pickle.load` as is: its unpickler builds only
dicts, lists, tuples, strings, numbers, sets and numpy arrays / dtypes / scalars (through small wrappers that refuse
object arrays and allocations the data does not carry), and refuses every other global with one line naming the
file and the global, before anything is called.

`sample_features(annotation)` turns one annotation into the stored form of the skeleton stream, like
`pipeline.data.skeleton.load_skeleton` does for a `.skeleton` file: the first two bodies of the file (pyskl stores
the main actor first, after the dataset authors' denoising), frames without a body dropped, then for 3D the
coordinates relative to joint 2 of the first frame with a body (`centre_and_flatten`); for 2D each coordinate
scaled to [-1, 1] by the image size, as pyskl's PreNormalize2D, with the keypoint score as third value per joint.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.data.skeleton import NUM_BODIES, centre_and_flatten
from pipeline.errors import InputNotFoundError, UsageError

MAX_BODIES_READ = 64  # M above this is refused (a real file has a few)
MAX_JOINTS = 256
MAX_LABEL = 99_999  # a label above is refused: non-NTU class lists are built up to the largest label
MAX_NAME = 240  # characters of a frame_dir (file names of 255 bytes at most, with the .npy ending)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=@,-]*$")  # one component of a frame_dir


class PysklFormatError(UsageError):
    """A pyskl/mmaction2 annotation file (or one of its samples) does not follow the format; names the file."""


class UnsafePickleError(UsageError):
    """The pickle asks for a global that builds more than plain data; nothing of it was called."""


# ----------------------------------------------------------------------------------------------- the unpickler
def _dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
    if dtype.hasobject or dtype.kind not in "biufcSUV":
        raise _Refused(f"numpy.dtype({spec!r})", "an array of Python objects")
    return dtype


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and its data as the BUILD state that follows
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or int(np.prod(shape)) > 1:
        raise _Refused("numpy's _reconstruct with other arguments than numpy writes", "an array it did not describe")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype) if not isinstance(dtype, np.dtype) else dtype)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    # protocol 5: the array's bytes, its dtype (built by _dtype), its shape; no allocation beyond the bytes
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or order not in "CFA":
        raise _Refused("numpy's _frombuffer with other arguments than numpy writes", "an array it did not describe")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise _Refused("numpy's scalar with other arguments than numpy writes", "an object")
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar(dtype, data)


def _latin1(text: Any, encoding: str = "utf-8") -> bytes:
    # protocols 0-2 write bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}", "other than bytes")
    return text.encode("latin-1")


def _bytes(data: Any = b"", encoding: str | None = None) -> bytes:
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)):  # bytes(10**12) would allocate a terabyte
        raise _Refused("bytes() of a size", "an allocation the file does not carry")
    return bytes(data)


def _bytearray(data: Any = b"", encoding: str | None = None) -> bytearray:
    return bytearray(_bytes(data, encoding))


class _NdarrayToken:
    """Stands for numpy.ndarray in the pickle: accepted as `_reconstruct`'s first argument, and nothing else (a
    call such as ndarray((10**12,)) would allocate what the file does not carry)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("numpy.ndarray called directly", "an array the file does not carry")


_NDARRAY = _NdarrayToken()

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytearray,
}
_RENAMED = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric",
            "__builtin__": "builtins"}  # numpy 1.x's module names; Python 2's


class _Refused(Exception):
    """Internal: raised inside the unpickler, turned into UnsafePickleError naming the file."""

    def __init__(self, what: str, builds: str) -> None:
        super().__init__(what, builds)
        self.what, self.builds = what, builds


class SafeUnpickler(pickle.Unpickler):
    """Builds only plain data: any global outside `_ALLOWED` raises before it is looked up or called."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((_RENAMED.get(module, module), name))
        if found is None:
            raise _Refused(f"{module}.{name}", "something other than plain data")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"a persistent id {str(pid)[:40]!r}", "an object of another program")


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickles `path` with `SafeUnpickler`. Raises InputNotFoundError, UnsafePickleError (a global outside the
    plain-data set, named; nothing of it is called) or PysklFormatError (not a whole pickle)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"annotation file '{path}' not found (a pyskl/mmaction2 .pkl file)")
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f).load()
    except _Refused as refused:
        raise UnsafePickleError(
            f"annotation file '{path}': refused, the pickle asks for {refused.what}, which builds {refused.builds} "
            "(loading a pickle can run code; this reader builds only dicts, lists, tuples, strings, numbers and "
            "numpy arrays); is it a pyskl/mmaction2 annotation file from a source you trust?") from None
    except OSError as err:
        raise InputNotFoundError(f"annotation file '{path}' cannot be read ({err.strerror or err})") from None
    except Exception as err:  # noqa: BLE001 -- untrusted bytes: any failure to parse them is the file's
        raise PysklFormatError(f"annotation file '{path}' is not a whole pickle ({type(err).__name__}: "
                               f"{str(err)[:120]}); re-download it (was it cut short?)") from None


# ----------------------------------------------------------------------------------------------- the format
@dataclass
class Annotations:
    """A validated annotation file: `split` {name: [frame_dir, ...]}, `samples` {frame_dir: annotation dict},
    `problems` (one line per annotation left out: each names the file, the sample and the reason)."""

    path: str
    split: dict[str, list[str]]
    samples: dict[str, dict]
    problems: list[str] = field(default_factory=list)
    bad: set[str] = field(default_factory=set)  # frame_dirs of the annotations left out

    @property
    def max_label(self) -> int:
        return max((int(a["label"]) for a in self.samples.values()), default=-1)


def _check_frame_dir(name: Any) -> str | None:
    """The reason `name` cannot name a sample (a feature file under the folder), or None."""
    if not isinstance(name, str) or not name:
        return f"frame_dir {name!r} is not a non-empty string"
    if len(name) > MAX_NAME:
        return f"frame_dir {name[:40]!r}... is {len(name)} characters long (at most {MAX_NAME})"
    parts = PurePosixPath(name).parts
    if name.startswith("/") or not all(_SAFE_NAME.match(p) and p not in (".", "..") for p in parts):
        return f"frame_dir {name[:80]!r} is not a relative name of letters, digits and _.+=@,- (no '..')"
    return None


def _integer(value: Any) -> int | None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def check_annotation(ann: Any, index: int) -> str | None:
    """The reason annotation `index` cannot be used, or None. Checks types, shapes and finite values."""
    if not isinstance(ann, dict):
        return f"annotation {index} is a {type(ann).__name__}, not a dict"
    name = ann.get("frame_dir")
    reason = _check_frame_dir(name)
    if reason:
        return f"annotation {index}: {reason}"
    label = _integer(ann.get("label"))
    if label is None or not 0 <= label <= MAX_LABEL:
        return f"{name}: label {str(ann.get('label'))[:40]} is not an integer in 0..{MAX_LABEL}"
    kp = ann.get("keypoint")
    if not isinstance(kp, np.ndarray) or kp.ndim != 4 or kp.dtype.kind not in "fiu":
        shape = getattr(kp, "shape", None)
        return f"{name}: keypoint is not a numeric (M, T, V, C) array (got {type(kp).__name__} {shape})"
    m, t, v, c = kp.shape
    if not (1 <= m <= MAX_BODIES_READ and t >= 1 and 1 <= v <= MAX_JOINTS and c in (2, 3)):
        return f"{name}: keypoint shape {kp.shape} is not (M bodies 1..{MAX_BODIES_READ}, T >= 1, V joints, C = 2 or 3)"
    if not np.isfinite(kp).all():
        return f"{name}: keypoint holds {int((~np.isfinite(kp)).sum())} non-finite values (NaN/inf)"
    score = ann.get("keypoint_score")
    if score is not None:
        if not isinstance(score, np.ndarray) or score.shape != (m, t, v) or score.dtype.kind not in "fiu":
            return f"{name}: keypoint_score {getattr(score, 'shape', type(score).__name__)} is not ({m}, {t}, {v})"
        if not np.isfinite(score).all():
            return f"{name}: keypoint_score holds non-finite values (NaN/inf)"
    if c == 2:
        shape = ann.get("img_shape")
        if (not isinstance(shape, (tuple, list)) or len(shape) != 2
                or any(_integer(s) is None or _integer(s) < 1 for s in shape)):
            return f"{name}: 2D keypoints need img_shape (height, width) in pixels, got {shape!r}"
    return None


def read_annotations(path: str | os.PathLike) -> Annotations:
    """Loads and validates an annotation file. Samples that fail `check_annotation` (or repeat a frame_dir) are
    left out, each with a line in `problems`; a file without the top-level structure raises PysklFormatError."""
    data = load_pickle(path)
    where = f"annotation file '{path}'"
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        kind = type(data).__name__
        raise PysklFormatError(f"{where} holds a {kind}, not {{'split': ..., 'annotations': [...]}} (the pyskl / "
                               "mmaction2 >= 1.0 format)")
    split = data.get("split")
    if not isinstance(split, dict) or not all(isinstance(k, str) and isinstance(v, (list, tuple))
                                              and all(isinstance(s, str) for s in v) for k, v in split.items()):
        raise PysklFormatError(f"{where}: 'split' is not a dict of split name -> list of frame_dir names")
    samples: dict[str, dict] = {}
    problems: list[str] = []
    bad: set[str] = set()
    for i, ann in enumerate(data["annotations"]):
        reason = check_annotation(ann, i)
        if reason is None and ann["frame_dir"] in samples:
            reason = f"{ann['frame_dir']}: a second annotation with this frame_dir (the first is kept)"
        if reason:
            problems.append(f"{Path(path).name}: {reason}")
            if isinstance(ann, dict) and isinstance(ann.get("frame_dir"), str) and ann["frame_dir"] not in samples:
                bad.add(ann["frame_dir"])
        else:
            samples[ann["frame_dir"]] = ann
    return Annotations(str(path), {k: list(v) for k, v in split.items()}, samples, problems, bad)


# ----------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class Layout:
    """What a stored pyskl sequence holds per body: `joints` V, `channels` ("x, y, z", "x, y, score" or "x, y")."""

    joints: int
    channels: str

    @property
    def values(self) -> int:
        return len(self.channels.split(", "))

    @property
    def score(self) -> bool:
        return self.channels.endswith("score")

    @property
    def dim(self) -> int:
        return NUM_BODIES * self.joints * self.values


def layout_of(ann: dict) -> Layout:
    _, _, v, c = ann["keypoint"].shape
    if c == 3:
        return Layout(v, "x, y, z")
    return Layout(v, "x, y, score" if ann.get("keypoint_score") is not None else "x, y")


def sample_features(ann: dict) -> np.ndarray:
    """One validated annotation -> float32 (T', NUM_BODIES x V x values), body-major, T' = frames with a body.

    The first NUM_BODIES bodies in the file's order; a body is present in a frame where any of its values is not
    zero (2D: or its score is); absent slots stay exactly zero. 3D: centred as `centre_and_flatten` does; 2D:
    x' = (x - w/2) / (w/2), y' = (y - h/2) / (h/2), then the score.
    """
    kp = np.asarray(ann["keypoint"], dtype=np.float64)[:NUM_BODIES]  # (M', T, V, C)
    m, t, v, c = kp.shape
    score = ann.get("keypoint_score")
    if c == 2 and score is not None:
        values = np.concatenate([kp, np.asarray(score, dtype=np.float64)[:NUM_BODIES, ..., None]], axis=-1)
    else:
        values = kp
    joints = np.zeros((t, NUM_BODIES, v, values.shape[-1]))
    joints[:, :m] = values.transpose(1, 0, 2, 3)
    present = joints.any(axis=(2, 3))  # (T, B)
    keep = present.any(axis=1)
    if not keep.any():
        raise PysklFormatError(f"{ann['frame_dir']}: no body in any frame (all its keypoints and scores are zero)")
    if c == 3:
        return centre_and_flatten(joints, present, str(ann["frame_dir"]))
    h, w = (float(s) for s in ann["img_shape"])
    joints[..., :2] = (joints[..., :2] - [w / 2, h / 2]) / [w / 2, h / 2]
    joints = np.where(present[:, :, None, None], joints, 0.0)[keep]
    return joints.reshape(len(joints), -1).astype(np.float32)
