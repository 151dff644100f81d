"""The feature-folder format, the one place it is read and written (extraction, flow, skeletons, training).

Layout (docs/design.md, "Formats")::

    <root>/settings.json                 how the features were made; a rerun with other settings is refused
    <root>/<list path without ext>.npy   float16 (T, D) or (V, T, D); float32 where settings say so (skeletons)
    <root>/manifest.jsonl                one record per finished video (or manifest.rank<k>.jsonl per rank)
    <root>/failed.jsonl                  {video, error} per failure (or failed.rank<k>.jsonl)

Crash safety: an array is written under a temporary name in `<root>/.eleatt-tmp/` (a folder no list path may use,
so cleaning it up never deletes a user's file) and renamed into place *before* its manifest record is appended, so a
video is finished exactly when its record exists and its file is whole. A run killed at any moment and restarted
redoes only the videos without a record; a torn last manifest line is ignored. A file damaged since (truncated,
overwritten, another shape than its record says) is not finished: a rerun redoes it, and loading it raises
FeatureFileError naming the file and the fix. `FeatureFolder.lock()` (`folder_lock`) keeps a second writer out of a
folder.

Everything read back is untrusted (docs/design.md, "Formats"): settings.json is bounded in size and its values in
range (`FeatureSettings`), a manifest line that is not a whole JSON record of a string video is skipped (its video
is redone), and a record's file is the one its video names, inside the folder (`record_path`): a record naming
another path (`..`, absolute, or a symbolic link out of the folder) is not finished, and nothing outside the folder
is ever read or written through it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import stat as stat_module
import tempfile
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

import numpy as np

from pipeline.data.sampling import VIEW_COUNTS, Sampling
from pipeline.errors import InputNotFoundError, load_failure, UsageError
from pipeline.paths import TMP_PREFIX, atomic_write, file_mode

try:  # POSIX; elsewhere the lock is advisory only (see FeatureFolder.lock)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

SETTINGS = "settings.json"
TMP_DIR = TMP_PREFIX  # <root>/.eleatt-tmp/: the temporary files of writers; no list path may start with it
LOCK = ".eleatt-lock"  # <root>/.eleatt-lock: held (flock) by the process writing the folder
DTYPES = ("float16", "float32")
MODALITIES = ("rgb", "flow", "skeleton")
PRECISIONS = ("32", "bf16", "16")  # the backbone's arithmetic: float32, or bfloat16 / float16 autocast
SETTINGS_FORMAT = 1  # settings.json's "format"; files without one were written before it (read as legacy)
# Bounds of what a settings.json (or a checkpoint's copy) may hold: beyond them the file is damaged or hostile.
SETTINGS_BYTES = 1 << 20  # a settings.json is ~1 KB
MAX_STACK = 32  # flow fields per flow-stream input (TSN: 5; two-stream networks: 10); 2L input channels
MAX_IN_CHANS = 2 * MAX_STACK
MAX_DIM = 1 << 16  # feature size D (timm backbones: up to a few thousand)
MAX_IMAGE_SIDE = 4096  # the backbone's input image side
MAX_SEGMENTS = 100_000  # --num-segments
MAX_FPS = 1000.0  # --fps


class FeatureFileError(UsageError):
    """A feature file that exists but cannot be used: truncated, garbage, wrong shape, zero frames, not finite."""


class FolderLockedError(UsageError):
    """Another process is writing the feature folder."""


class SettingsMismatchError(UsageError):
    """A feature folder was made with other settings than the ones asked for now."""


class SettingsFormatError(UsageError):
    """A settings.json (or a checkpoint's copy of it) that cannot be read: missing or unknown keys, bad values."""


@dataclass(frozen=True)
class FeatureSettings:
    """How the inputs of a stream become the features an EleAtt stack reads: the one description of a stream.

    Written to `<folder>/settings.json` (`to_json`, with a `format` version) by whoever makes the folder, read
    back (`from_json`, validated) by training, classify and streaming, recorded in checkpoints as its plain-dict
    form (`hyper_parameters.extraction_settings`, so that checkpoints stay weights-only loadable).

    Fields:
        modality: "rgb" (video frames), "flow" (stacks of optical flow fields), "skeleton" (joint coordinates).
        backbone: the timm model that encodes images (None where no backbone is used, e.g. skeletons).
        weights: the backbone's weights source: "imagenet", "none" or an absolute file path.
        data_config: timm's eval data config of the backbone (input_size (C, H, W), mean, std, crop_pct,
            interpolation, crop_mode) as a plain dict; None without a backbone.
        in_chans: channels of one backbone input image (3 for RGB; 2 * stack for flow).
        sampling: which source frames become feature steps.
        views: spatial test-time views per step: "center" (stored (T, D)), "three" or "ten" (stored (V, T, D)).
        dtype: the stored array dtype, "float16" (default) or "float32".
        dim: D, the feature size.
        precision: the backbone's arithmetic at extraction: "32", or "bf16" / "16" autocast.
        stack: source items stacked into one input image (flow: L flow fields -> 2L channels); 1 for RGB.
        options: modality-specific extras, plain JSON values (e.g. a flow folder's quantisation bound).
    """

    modality: str = "rgb"
    backbone: str | None = None
    weights: str = "none"
    data_config: Mapping[str, Any] | None = None
    in_chans: int = 3
    sampling: Sampling = field(default_factory=Sampling)
    views: str = "center"
    dtype: str = "float16"
    dim: int | None = None
    precision: str = "32"
    stack: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value, allowed in (("modality", self.modality, MODALITIES), ("views", self.views, tuple(VIEW_COUNTS)),
                                     ("dtype", self.dtype, DTYPES), ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise SettingsFormatError(f"settings {name} {value!r} is not one of {allowed}")
        if not isinstance(self.sampling, Sampling):
            raise SettingsFormatError(f"settings sampling must be a Sampling, got {self.sampling!r}")
        for name in ("in_chans", "stack"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsFormatError(f"settings {name} must be an integer >= 1, got {value!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1):
            raise SettingsFormatError(f"settings dim must be an integer >= 1 (or null), got {self.dim!r}")
        for name, value, limit in (("in_chans", self.in_chans, MAX_IN_CHANS), ("stack", self.stack, MAX_STACK),
                                   ("dim", self.dim, MAX_DIM)):
            if value is not None and value > limit:
                raise SettingsFormatError(f"settings {name} {value} is beyond {limit}, the most this version handles")
        if self.backbone is not None and not isinstance(self.backbone, str):
            raise SettingsFormatError(f"settings backbone must be a timm model name (or null), got {self.backbone!r}")
        if not isinstance(self.weights, str):
            raise SettingsFormatError(f"settings weights must be 'imagenet', 'none' or a file path, got {self.weights!r}")
        if self.sampling.fps is not None and self.sampling.fps > MAX_FPS:
            raise SettingsFormatError(f"settings sampling fps {self.sampling.fps} is beyond {MAX_FPS:g} frames/s")
        if self.sampling.num_segments is not None and self.sampling.num_segments > MAX_SEGMENTS:
            raise SettingsFormatError(f"settings sampling num_segments {self.sampling.num_segments} is beyond "
                                      f"{MAX_SEGMENTS}")
        if self.data_config is not None:
            _check_data_config(self.data_config)
        if not isinstance(self.options, Mapping):
            raise SettingsFormatError(f"settings options must be an object, got {type(self.options).__name__}")
        # Stored as JSON would give them back (tuples as lists), so a folder's settings equal the ones asked for.
        object.__setattr__(self, "data_config", None if self.data_config is None else _canonical(dict(self.data_config)))
        object.__setattr__(self, "options", _canonical(dict(self.options)))

    @property
    def num_views(self) -> int:
        """V, the stored views per step."""
        return VIEW_COUNTS[self.views]

    @property
    def input_size(self) -> tuple[int, ...] | None:
        """(C, H, W) of one backbone input image, from the data config."""
        size = (self.data_config or {}).get("input_size")
        return None if size is None else tuple(size)

    def replace(self, **changes: Any) -> "FeatureSettings":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The settings.json form (and the checkpoint's): plain JSON types, with the format version."""
        out: dict[str, Any] = {"format": SETTINGS_FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_json() if isinstance(value, Sampling) else value
        size = self.input_size
        out["input_size"] = None if size is None else list(size)  # derived, for people reading the file
        return _canonical(out)

    @classmethod
    def from_checkpoint(cls, hparams: Mapping[str, Any], source: str | os.PathLike) -> "FeatureSettings | None":
        """The settings a checkpoint recorded (`hyper_parameters.extraction_settings`), or None where it has none."""
        recorded = hparams.get("extraction_settings")
        if not recorded:
            return None
        try:
            return cls.from_json(recorded, source)
        except SettingsFormatError as err:
            raise SettingsFormatError(f"checkpoint {err}") from None

    @classmethod
    def from_json(cls, value: Mapping[str, Any], source: str | os.PathLike = "<settings>") -> "FeatureSettings":
        """Reads a settings.json object; `source` names the file (or checkpoint) in errors.

        Format 1 needs every key and accepts no other. Objects without `format` come from folders and checkpoints
        made before it (keys backbone, weights, data_config, input_size, sampling, views, modality, dtype, dim,
        precision, all optional): they read with the defaults for what they lack and keep loading.
        """
        if isinstance(value, FeatureSettings):
            return value
        if not isinstance(value, Mapping):
            raise SettingsFormatError(f"'{source}': settings must be a JSON object, got {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        version = value.get("format")
        if version is None:
            known, required = _LEGACY_KEYS, set()
        elif version == SETTINGS_FORMAT:
            known = fields | {"format", "input_size"}
            required = known
        else:
            raise SettingsFormatError(
                f"'{source}': settings format {version!r} is not one this version reads ({SETTINGS_FORMAT}); "
                "upgrade the package, or make the folder again with this version"
            )
        unknown, missing = sorted(set(value) - known), sorted(required - set(value))
        if unknown or missing:
            raise SettingsFormatError(
                f"'{source}': settings {'with unknown keys ' + str(unknown) if unknown else ''}"
                f"{' and ' if unknown and missing else ''}{'missing keys ' + str(missing) if missing else ''} "
                f"(format {version if version is not None else 'before 1'}; known keys: {sorted(known)}); "
                "the file was edited or made by another tool: make the folder again with `eleatt extract`"
            )
        kwargs = {k: v for k, v in value.items() if k in fields}
        try:
            if "sampling" in kwargs:
                kwargs["sampling"] = Sampling.from_json(kwargs["sampling"])
            if version is None and kwargs.get("data_config") is None and value.get("input_size") is not None:
                kwargs["data_config"] = {"input_size": list(value["input_size"])}
            if version is None and kwargs.get("data_config") is not None:
                kwargs.setdefault("in_chans", int(kwargs["data_config"]["input_size"][0]))
            for name, default in (("modality", "rgb"), ("weights", "none"), ("views", "center"),
                                  ("dtype", "float16"), ("precision", "32")):
                if kwargs.get(name) is None:  # legacy files may hold null for these
                    kwargs[name] = default
            return cls(**kwargs)
        except (SettingsFormatError, ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
            raise SettingsFormatError(f"'{source}': bad settings: {err}") from None

    def differences(self, other: "FeatureSettings") -> list[str]:
        """`field: stored X, asked Y` for every field where `other` (asked) differs from these (stored)."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine == theirs:
                continue
            if f.name == "options":  # name the option that differs (e.g. a flow folder's bound), not the whole dict
                for key in sorted(set(mine) | set(theirs)):
                    if mine.get(key) != theirs.get(key):
                        out.append(f"options.{key}: stored {mine.get(key)!r}, asked {theirs.get(key)!r}")
            else:
                out.append(f"{f.name}: stored {_shown(mine)!r}, asked {_shown(theirs)!r}")
        return out


# The keys of settings.json files written before the format version (all optional when read).
_LEGACY_KEYS = frozenset({"backbone", "weights", "data_config", "input_size", "sampling", "views", "modality",
                          "dtype", "dim", "precision"})


def _shown(value: Any) -> Any:
    return value.to_json() if isinstance(value, Sampling) else value


def number_in(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """Whether a value read from a file is a finite number (an int or float, not a bool) with low < value < high."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        return False
    return math.isfinite(value) and low < value < high


def _finite_numbers(value: Any, length: tuple[int, int]) -> bool:
    return (isinstance(value, (list, tuple)) and length[0] <= len(value) <= length[1]
            and all(number_in(v) for v in value))


def _check_data_config(config: Any) -> None:
    """A backbone data config within range: input_size (C, H, W) of positive integers (C <= MAX_IN_CHANS, sides <=
    MAX_IMAGE_SIDE), finite mean and positive finite std (when given), a positive finite crop_pct (when given)."""
    if not isinstance(config, Mapping):
        raise SettingsFormatError(f"settings data_config must be an object, got {type(config).__name__}")
    size = config.get("input_size")
    if size is not None:
        limits = (MAX_IN_CHANS, MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= m for v, m in zip(size, limits))):
            raise SettingsFormatError(f"settings data_config input_size must be (C, H, W), C <= {MAX_IN_CHANS}, "
                                      f"H and W <= {MAX_IMAGE_SIDE}, got {size!r}")
    for key in ("mean", "std"):
        if config.get(key) is not None and not _finite_numbers(config[key], (1, MAX_IN_CHANS)):
            raise SettingsFormatError(f"settings data_config {key} must be a list of finite numbers, got "
                                      f"{config[key]!r}"[:300])
    if config.get("std") is not None and min(config["std"]) <= 0:
        raise SettingsFormatError(f"settings data_config std must be positive, got {config['std']!r}"[:300])
    crop = config.get("crop_pct")
    if crop is not None and not number_in(crop, 0, 10.000001):
        raise SettingsFormatError(f"settings data_config crop_pct must be a number in (0, 10], got {crop!r}")


def as_views(features: np.ndarray) -> np.ndarray:
    """Returns stored features as `(V, T, D)`: a `(T, D)` array becomes one view."""
    if features.ndim == 2:
        return features[None]
    if features.ndim == 3:
        return features
    raise UsageError(f"features must be (T, D) or (V, T, D), got shape {tuple(features.shape)}")


def _canonical(value: Any) -> Any:
    """JSON round trip, so that tuples and lists (and int/float keys) compare the way they are stored."""
    return json.loads(json.dumps(value, sort_keys=True))


# What numpy (2.4) raises on a damaged .npy: ValueError for most damage (a header that does not parse included: its
# SyntaxError becomes a ValueError), EOFError for a file cut in its header, and tokenize's TokenError, which escapes
# from the header filter numpy applies to format 1.0/2.0 headers that do not parse ("EOF in multi-line statement").
NPY_ERRORS = (ValueError, OSError, EOFError, tokenize.TokenError)


def read_npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of the .npy file open at `f` (its data not read); ValueError for a file that is
    not an .npy of format 1.0 or 2.0 (what `np.save` writes for plain arrays)."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def npy_layout(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an .npy file whose header accounts for its size exactly, read from the header alone; else
    ValueError (or one of NPY_ERRORS). Call it before `np.load`: numpy allocates the array its header describes
    before reading, so a 64-byte file claiming a (2**30, 1024) array would cost what it claims."""
    with open(path, "rb") as f:
        shape, dtype = read_npy_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError("it holds Python objects")
    data = math.prod(shape) * dtype.itemsize
    size = os.stat(path).st_size
    if size != offset + data:
        raise ValueError(f"its header describes a {dtype} array of shape {shape} ({offset + data} bytes) but the file "
                         f"has {size} bytes (truncated or damaged)")
    return shape, dtype


def _read_jsonl(path: Path) -> Iterable[dict]:
    """The records of a manifest/failure file: JSON objects with a string `video`, one a line. Anything else (a
    line torn by a kill, bytes that are not UTF-8, nesting too deep, numbers too long) is skipped: its video has no
    valid record and is redone."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw.decode("utf-8").strip() or "null")
            except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                continue
            if isinstance(record, dict) and isinstance(record.get("video"), str) and record["video"]:
                yield record


class FeatureFolder:
    """A feature folder; `rank` selects this process's manifest/failure shards (None: the unsharded files)."""

    suffix = ".npy"  # the per-video file's extension (a flow folder stores `.flow.zip` files)
    kind = "feature folder"  # in messages

    def __init__(self, root: str | os.PathLike, rank: int | None = None, world: int | None = None):
        self.root = Path(root)
        self.rank = rank
        self.world = world  # with `rank`: shard `rank` of `world` of a sharded run (`eleatt flow --shard I/N`)
        suffix = "" if rank is None else f".rank{int(rank)}"
        self.manifest_path = self.root / f"manifest{suffix}.jsonl"
        self.failed_path = self.root / f"failed{suffix}.jsonl"
        # A shard's temporary files live in a folder of its own, which only the holder of its shard lock touches;
        # other writers (and extract's ranks, under one folder lock) share `<root>/.eleatt-tmp/`.
        self.tmp_dir = self.root / TMP_DIR / (shard_name(rank, world) if world is not None else "")
        self._repaired: set[Path] = set()
        self._settings: FeatureSettings | None = None
        self._dirs: dict | None = None  # during `finished`: the folders found inside the root (`record_path`)

    def __repr__(self) -> str:
        return f"FeatureFolder({str(self.root)!r}, rank={self.rank}, world={self.world})"

    # --- settings -------------------------------------------------------------------------------------------
    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS

    @property
    def settings(self) -> FeatureSettings | None:
        """The folder's settings (validated), or None for a folder that has none yet.

        Read once: a folder's settings never change after they are written (other settings are refused), and
        `load` consults them for every array a training run reads.
        """
        if self._settings is not None:
            return self._settings
        if not self.settings_path.is_file():
            return None
        fix = "make the folder again with `eleatt extract`"
        if self.settings_path.stat().st_size > SETTINGS_BYTES:
            raise SettingsFormatError(f"'{self.settings_path}' is {self.settings_path.stat().st_size} bytes, not a "
                                      f"settings file (those are about 1 KB); {fix}")
        try:
            with open(self.settings_path, encoding="utf-8") as f:
                value = json.load(f)
        except (ValueError, RecursionError) as err:  # JSON and UTF-8 errors, numbers too long, nesting too deep
            reason = "nested too deep" if isinstance(err, RecursionError) else str(err)[:200]
            raise SettingsFormatError(f"'{self.settings_path}' is not valid JSON ({reason}); {fix}") from None
        self._settings = FeatureSettings.from_json(value, self.settings_path)
        return self._settings

    def check_settings(self, settings: FeatureSettings | Mapping[str, Any]) -> FeatureSettings:
        """Records `settings` in a new folder; in an existing one, refuses any that differ. Returns them.

        Raises SettingsMismatchError naming every differing field with the stored and the new value.
        Safe when several ranks call it at once: the first to create `settings.json` wins, the others compare.
        """
        new = FeatureSettings.from_json(settings, "the settings asked for")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.settings_path.exists():
            fd, tmp = tempfile.mkstemp(prefix=".settings.", suffix=".tmp", dir=self.root)
            os.fchmod(fd, file_mode())  # mkstemp makes it private; settings are as readable as the features
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(new.to_json(), f, indent=2, sort_keys=True)
                f.write("\n")
            try:
                os.link(tmp, self.settings_path)  # fails if another process created it first
                return new
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system (some network mounts): create it exclusively
                if self._create_settings(new):
                    return new
            finally:
                os.unlink(tmp)
        old = self._stored_settings()
        diffs = old.differences(new)
        if not diffs:
            return old
        raise SettingsMismatchError(
            f"feature folder '{self.root}' was made with other settings ({'; '.join(diffs)}); "
            f"write into a new folder (--out), or rerun with the stored settings ({self.settings_path})"
        )

    def _create_settings(self, new: FeatureSettings) -> bool:
        """Writes settings.json if it does not exist (O_EXCL: one process wins); False when another made it."""
        try:
            fd = os.open(self.settings_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(new.to_json(), indent=2, sort_keys=True) + "\n")  # one write
        return True

    def _stored_settings(self, tries: int = 10) -> FeatureSettings:
        """The stored settings. A file written in the last seconds that does not parse is read again for a moment:
        on a file system without hard links another rank may be writing it (`_create_settings`); an older one, or
        one still unreadable after that, is the clear error."""
        for attempt in range(tries):
            try:
                return self.settings
            except SettingsFormatError:
                try:
                    young = time.time() - self.settings_path.stat().st_mtime < 5
                except OSError:
                    young = False
                if attempt == tries - 1 or not young:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def dtype(self) -> np.dtype:
        settings = self.settings
        return np.dtype(settings.dtype if settings is not None else "float16")

    # --- paths ----------------------------------------------------------------------------------------------
    def feature_path(self, video: str) -> Path:
        """`<root>/<list path without extension><suffix>` (`.npy`) for a list path (relative, '/'-separated)."""
        return self.root / self._feature_name(video)

    def _feature_name(self, video: str) -> str:
        """`feature_path` relative to the root, '/'-separated; UsageError for a path leaving the root."""
        rel = PurePosixPath(video.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise UsageError(f"video path {video!r} must be relative to the root and stay under it (no '..')")
        if rel.parts[0] in (TMP_DIR, LOCK):
            raise UsageError(f"video path {video!r} starts with {rel.parts[0]!r}, the name of the feature folder's "
                             "own temporary folder/lock; rename that folder of videos")
        stem, _ = os.path.splitext(rel.as_posix())
        return f"{stem}{self.suffix}"

    what, command = "features", "eleatt extract"  # in the messages of `existing`

    def existing(self, video: str) -> Path:
        """The video's file; FileNotFoundError naming it, any recorded failure and the command that makes it."""
        path = self.feature_path(video)
        if not path.is_file():
            reason = self.failed().get(video)
            why = f" (it failed: {reason})" if reason else ""
            raise InputNotFoundError(
                f"no {self.what} for '{video}' in '{self.root}': '{path}' is missing{why}; run `{self.command}` "
                "for this list into this folder (it resumes), or drop the video from the list"
            )
        return path

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def record_path(self, record: Mapping[str, Any], _dirs: dict | None = None) -> Path | None:
        """The file of a manifest record, or None when the record is not one this folder writes: its `feature` must
        be the path its `video` is stored at (`feature_path`), and that file must resolve inside the folder (no
        symbolic link out of it). A manifest is read from disk, so a record naming `../x` or `/etc/x` is damage
        or an attack: its video counts as not finished, and nothing outside the folder is read through it.

        `_dirs`: a cache of the folders found inside the root, for the records of one pass over a manifest (a
        file that is not a link is inside when its folder is: one `lstat` per file, a `realpath` per folder)."""
        try:
            name = self._feature_name(record["video"])
        except (UsageError, KeyError, AttributeError, TypeError):
            return None
        if record.get("feature", name) != name:
            return None
        path = self.root / name
        try:
            mode = os.lstat(path).st_mode
        except (OSError, ValueError):  # nothing there (nothing is read through it), or a name the system refuses
            return path
        dirs = {} if _dirs is None else _dirs
        if "" not in dirs:
            dirs[""] = os.path.realpath(self.root)
        root = dirs[""]
        if stat_module.S_ISLNK(mode):  # the link's target must be inside
            target = os.path.realpath(path)
            return path if target.startswith(root.rstrip(os.sep) + os.sep) else None
        folder = os.path.dirname(name)
        if folder not in dirs:
            real = os.path.realpath(path.parent)
            dirs[folder] = real == root or real.startswith(root.rstrip(os.sep) + os.sep)
        return path if dirs[folder] else None

    # --- records --------------------------------------------------------------------------------------------
    def _shards(self, kind: str) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"{kind}.jsonl")) + sorted(self.root.glob(f"{kind}.rank*.jsonl"))

    def finished(self, verify: bool = True, known: Mapping[str, dict] | None = None) -> dict[str, dict]:
        """video -> its manifest record, over every shard.

        With `verify` (the default), only videos whose file is whole: it exists, its .npy header parses, its shape
        is the record's (views, frames, dim) with at least one frame, and its size is the header's. This reads the
        first bytes of each file, not the data; a file damaged since its record is thus redone by a rerun.
        `known`: an earlier `finished()` of this run; a record found there unchanged is not checked again (each
        file is checked once per run, not once per question).
        """
        records = self.manifest_records()
        self._dirs: dict = {}  # this pass's folders found inside the root (`record_path`)
        try:
            if verify:
                known = known or {}
                return {v: r for v, r in records.items() if known.get(v) == r or self._whole(r)}
            # unverified records still name their own file, inside the folder
            return {v: r for v, r in records.items() if self.record_path(r, self._dirs) is not None}
        finally:
            self._dirs = None

    def manifest_records(self) -> dict[str, dict]:
        """video -> its last manifest record, over every shard, as written: not checked against the folder (see
        `finished`, which keeps only the records of whole files inside the folder)."""
        records: dict[str, dict] = {}
        for shard in self._shards("manifest"):
            for record in _read_jsonl(shard):
                records[record["video"]] = record
        return records

    def _whole(self, record: dict) -> bool:
        """True when the file of a manifest record is whole and has the record's shape (see `finished`)."""
        path = self.record_path(record, self._dirs)
        if path is None:
            return False
        try:
            shape, _ = npy_layout(path)
        except NPY_ERRORS:
            return False
        if len(shape) not in (2, 3):
            return False
        views, frames, dim = (1, *shape) if len(shape) == 2 else shape
        expected = (record.get("views", views), record.get("frames", frames), record.get("dim", dim))
        return (views, frames, dim) == tuple(expected) and frames >= 1

    def failed(self, finished: Mapping[str, dict] | None = None) -> dict[str, str]:
        """video -> its last error, over every shard, without the videos that are finished (record and file).

        `finished`: this folder's `finished()` where the caller has it (not computed, nor any file checked, again)."""
        errors: dict[str, str] = {}
        for shard in self._shards("failed"):
            for record in _read_jsonl(shard):
                errors[record["video"]] = str(record.get("error", ""))
        if errors:
            # Verified: a video whose file has gone since its record and that then failed on a rerun is failed.
            done = self.finished() if finished is None else finished
            errors = {v: e for v, e in errors.items() if v not in done}
        return errors

    def missing(self, videos: Iterable[str]) -> list[str]:
        """The videos, in the order given, whose feature file does not exist."""
        return [v for v in videos if not self.feature_path(v).is_file()]

    def _append(self, path: Path, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(path, "a+b") as f:
            if path not in self._repaired:
                # A kill may have torn the last line: start ours on a fresh line so that it stays readable.
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                self._repaired.add(path)
            f.write(line.encode("utf-8"))  # one write: a record is whole or torn, never interleaved
            f.flush()

    # --- writing and reading --------------------------------------------------------------------------------
    def write(self, video: str, features: np.ndarray | Any, **extra: Any) -> dict:
        """Stores the features of `video` atomically, then records them in this rank's manifest.

        features: `(T, D)` or `(V, T, D)` (numpy or torch); stored in the folder's dtype (float16 by default).
        Returns the manifest record: `video`, `feature`, `frames`, `dim`, `views`, plus `extra`.
        """
        if hasattr(features, "detach"):
            features = features.detach().float().cpu().numpy()
        features = np.asarray(features)
        views = as_views(features)
        dtype = self.dtype
        with np.errstate(over="ignore"):
            stored = features.astype(dtype, copy=False)
        if not np.isfinite(stored).all():
            raise UsageError(
                f"features of '{video}' are not finite in {dtype} (max |x| = {np.abs(features).max():.3g}); "
                "check the backbone's input normalisation, or store float32 (settings dtype)"
            )
        if views.shape[1] < 1:
            raise UsageError(f"features of '{video}' have zero frames; nothing to store")
        target = self.feature_path(video)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file lives in our own folder (same file system, so the rename is atomic), never beside
        # the user's files; it gets the umask's permissions so that a shared folder stays readable.
        with atomic_write(target, "wb", tmp_dir=self.tmp_dir) as f:
            np.save(f, np.ascontiguousarray(stored), allow_pickle=False)
        record = {
            "video": video,
            "feature": self.relative(target),
            "frames": int(views.shape[1]),
            "dim": int(views.shape[2]),
            "views": int(views.shape[0]),
            **extra,
        }
        self._append(self.manifest_path, record)
        return record

    def record_failure(self, video: str, error: str | BaseException) -> None:
        """Records that `video` failed (the error text names the reason); a rerun retries it."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self._append(self.failed_path, {"video": video, "error": text, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def load(self, video: str, mmap: bool = False, check: bool = True, finite: bool = True) -> np.ndarray:
        """The stored array of `video`, `(T, D)` or `(V, T, D)`, as saved (never unpickles).

        With `check` (the default), a file that cannot be used raises FeatureFileError naming it and the fix: it
        does not parse as .npy (truncated, garbage), has another layout or feature dimension than the folder's
        settings, zero frames, or (with `finite`, the default) values that are not finite (NaN/inf would silently
        train a NaN model). `finite=False` checks the header alone and leaves the values to the caller, which
        checks the steps it reads (`check_finite`): a training sample reads a few steps of a memory-mapped file,
        and a full read of every file at start-up would cost the whole folder per worker.
        """
        path = self.existing(video)
        try:
            npy_layout(path)  # the header against the file's size first: np.load allocates what it says
            features = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except NPY_ERRORS as err:
            raise FeatureFileError(f"feature file '{path}' of '{video}' cannot be read ({load_failure(err)}); "
                                   f"{self._fix()}") from None
        if not check:
            return features
        dim = self.settings.dim if self.settings is not None else None
        if features.ndim not in (2, 3) or features.dtype.kind != "f":
            problem = f"holds a {features.dtype} array of shape {tuple(features.shape)}, not (T, D) or (V, T, D)"
        elif features.shape[-2] == 0:
            problem = "has zero frames"
        elif dim and features.shape[-1] != int(dim):
            problem = f"has feature dimension {features.shape[-1]} but the folder's settings say {dim}"
        else:
            if finite:
                self.check_finite(video, features)
            return features
        raise FeatureFileError(f"feature file '{path}' of '{video}' {problem}; {self._fix()}")

    def _fix(self) -> str:
        return (f"re-extract it: rerun `eleatt extract` with this list into '{self.root}' (it redoes damaged "
                "files), or delete the file and rerun")

    def check_finite(self, video: str, values: np.ndarray | Any) -> None:
        """Raises FeatureFileError naming the file of `video` when `values` (read from it: all of it, or the steps
        a sample took; numpy or torch) hold NaN or inf; the message counts the file's non-finite values."""
        finite = values.isfinite().all() if hasattr(values, "isfinite") else np.isfinite(values).all()
        if bool(finite):
            return
        path = self.existing(video)
        whole = np.load(path, mmap_mode="r", allow_pickle=False)  # an error path: the count reads the file once
        bad = sum(int(np.count_nonzero(~np.isfinite(part))) for part in as_views(whole))
        raise FeatureFileError(f"feature file '{path}' of '{video}' holds {bad} non-finite values (NaN/inf); "
                               f"{self._fix()}")

    def lock(self, command: str = "a writer"):
        """`with folder.lock("extract"):` holds the folder for this process; a second process is refused at once
        with FolderLockedError naming the holder (pid, host, command, start time). See `folder_lock`; a sharded
        folder (`world` given) takes its shard's lock instead (`shard_lock`): other shards of the run go on."""
        if self.world is not None:
            return shard_lock(self.root, command, int(self.rank or 0), int(self.world), self.kind)
        return folder_lock(self.root, command, self.kind)

    def remove_stale_temporaries(self) -> int:
        """Deletes temporary files left by killed writers (only inside `<root>/.eleatt-tmp/`, which holds nothing
        else: a user's file is never touched); call only while holding `lock()`. Returns the count.

        Unsharded, the lock keeps every other writer out: all of them go. A shard removes its own, those of the
        unsharded runs (none can run beside it), and those of every other shard whose lock it can take (a shard
        killed earlier); a shard that runs keeps its files."""
        tmp_dir = self.root / TMP_DIR
        if not tmp_dir.is_dir():
            return 0
        count = 0
        for entry in tmp_dir.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)
                count += 1
            elif entry.is_dir() and not entry.is_symlink():
                parsed = parse_shard_name(entry.name)
                if self.world is None or parsed is None or entry == self.tmp_dir:
                    count += _remove_files(entry, rmdir=parsed is not None and entry != self.tmp_dir)
                else:
                    with _try_flock(self.root / shard_lock_name(*parsed)) as free:
                        if free:
                            count += _remove_files(entry, rmdir=True)
        return count


def _remove_files(folder: Path, rmdir: bool = False) -> int:
    """Deletes the plain files directly inside `folder` (nothing below it, no link followed), and with `rmdir` the
    folder when that leaves it empty; the count of files."""
    count = 0
    for entry in folder.iterdir():
        if entry.is_file():
            entry.unlink(missing_ok=True)
            count += 1
    if rmdir:
        with contextlib.suppress(OSError):
            folder.rmdir()
    return count


def shard_name(rank: int, world: int) -> str:
    """`shard-I-of-N`: the name of shard I of N's temporary folder and lock."""
    return f"shard-{int(rank)}-of-{int(world)}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(I, N) from `shard-I-of-N`, or None for any other name."""
    parts = name.split("-")
    if len(parts) == 4 and parts[0] == "shard" and parts[2] == "of" and all(p.isdigit() and p.isascii()
                                                                          for p in parts[1::2]):
        return int(parts[1]), int(parts[3])
    return None


def shard_lock_name(rank: int, world: int) -> str:
    return f"{LOCK}.{shard_name(rank, world)}"


def _lock_fd(path: Path) -> int:
    """The lock file `path` open for flock; one clear line when it cannot be (a folder or a link in its place, no
    permission)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as err:
        raise FolderLockedError(f"lock file '{path}' cannot be opened ({err.strerror}); it is this tool's own: "
                                "remove it if it is not a plain file, or fix the folder's permissions") from None


def _flock(fd: int, how: int) -> bool:
    """Takes flock `how` (LOCK_SH / LOCK_EX, never waiting) on `fd`: False when another process holds a conflicting
    one; True when taken, or when the file system has no flock (some network mounts: then no lock, as before)."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _flock_soon(fd: int, how: int, tries: int = 5) -> bool:
    """`_flock`, tried `tries` times 50 ms apart."""
    for _ in range(tries):
        if _flock(fd, how):
            return True
        time.sleep(0.05)
    return False


def _holder(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(400).decode("utf-8", "replace").strip() or "another process"
    except OSError:
        return "another process"


def _sign(fd: int, command: str) -> None:
    """Writes who holds a lock into its file (named by the refusals of others)."""
    os.ftruncate(fd, 0)
    os.write(fd, (f"`eleatt {command}` (pid {os.getpid()} on {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n").encode())


def _running_shard(root: Path, world: int | str = "*") -> str | None:
    """A running shard (of a run split into `world` shards), as its lock file names it; None when none runs. (Asked
    only to word a refusal: the probe holds a free shard's lock for an instant, which a shard starting then waits
    out, see `shard_lock`.)"""
    for path in sorted(p for p in root.glob(f"{LOCK}.shard-*-of-{world}") if p.is_file()):
        with _try_flock(path) as free:
            if not free:
                return _holder(path)
    return None


@contextlib.contextmanager
def _try_flock(path: Path):
    """`with _try_flock(path) as free:` an exclusive lock on `path` if nobody holds it (free), released after."""
    fd = _lock_fd(path)
    try:
        yield _flock(fd, fcntl.LOCK_EX if fcntl is not None else 0)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(root: str | os.PathLike, command: str = "a writer", kind: str = "folder", fix: str = "--out",
                shared: bool = False):
    """`with folder_lock(root, "flow"):` holds the folder `root` (created if needed) for this process while it writes
    there; a second process is refused at once with FolderLockedError naming `kind`, the folder and the holder
    (command, pid, host, start time), and the fix (wait, or the option `fix` naming another folder).

    The lock is an flock on `<root>/.eleatt-lock`: the system drops it when its process ends however it ends, so a
    crashed run never leaves a stale lock. (On file systems without flock, and on Windows, no lock.) Only a process
    holds it: threads of one process share it, and several `with` of one process on one folder refuse each other.
    `shared`: the shards of a sharded run hold it together (`shard_lock`), which still refuses every exclusive
    holder (an unsharded run) and is refused by one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    fd = _lock_fd(path)
    try:
        if fcntl is not None and not _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            # refused by the shards of a sharded run: one that runs (the file names the last to start)
            holder = (None if shared else _running_shard(root)) or _holder(path)
            raise FolderLockedError(
                f"{kind} '{root}' is being written by {holder}; wait for it to finish (a second run would redo "
                f"its work), or write into another folder ({fix})"
            )
        if not shared:  # a shard signs once it holds its shard too (`shard_lock`)
            _sign(fd, command)
        yield root
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def shard_lock(root: str | os.PathLike, command: str, rank: int, world: int, kind: str = "folder",
               fix: str = "--out"):
    """`with shard_lock(root, "flow --shard 1/3", 1, 3):` holds shard `rank` of `world` of the folder `root`.

    Shards of one run coexist; everything else that would write the same videos is refused at once with
    FolderLockedError naming the holder and the fix:
      - an unsharded run while any shard runs, and any shard while an unsharded run runs (the folder lock,
        `<root>/.eleatt-lock`: shared by the shards, exclusive otherwise);
      - a second run of the same shard (`<root>/.eleatt-lock.shard-I-of-N`, exclusive);
      - a shard of another split (M shards) while shards of N run: their shares overlap (`.eleatt-lock.world-N`,
        shared by the shards of N, probed for each other split M; two splits starting at the same instant may
        both be refused, never both run).
    Locks are flocks: the system drops them when a process ends however it ends.
    """
    root = Path(root)
    rank, world = int(rank), int(world)
    with contextlib.ExitStack() as stack:
        stack.enter_context(folder_lock(root, command, kind, fix, shared=True))
        world_fd = _lock_fd(root / f"{LOCK}.world-{world}")
        stack.callback(os.close, world_fd)
        if fcntl is not None:
            # Blocking: another split holds this file exclusively only for the instant it probes it.
            try:
                fcntl.flock(world_fd, fcntl.LOCK_SH)
            except OSError:  # no flock on this file system: unlocked, as the folder lock
                pass
        for other in root.glob(f"{LOCK}.world-*"):
            suffix = other.name[len(f"{LOCK}.world-"):]
            if not (suffix.isdigit() and suffix.isascii()) or int(suffix) == world or not other.is_file():
                continue
            with _try_flock(other) as free:
                if not free:
                    raise FolderLockedError(
                        f"{kind} '{root}' is being written by a run split into {int(suffix)} shards (e.g. "
                        f"{_running_shard(root, int(suffix)) or 'another process'}); its shares overlap those of "
                        f"{world} shards: wait for it to finish, or run the missing shards as --shard I/{int(suffix)}"
                    )
        path = root / shard_lock_name(rank, world)
        fd = _lock_fd(path)
        stack.callback(os.close, fd)
        # Tried a few times: another run probing which shards run holds a free shard's lock for an instant.
        if fcntl is not None and not _flock_soon(fd, fcntl.LOCK_EX):
            raise FolderLockedError(
                f"shard {rank}/{world} of {kind} '{root}' is being written by {_holder(path)}; each shard runs "
                "once at a time: wait for it to finish, or run another shard"
            )
        _sign(fd, command)
        main = _lock_fd(root / LOCK)  # the folder lock names a shard to an unsharded run it refuses
        try:
            _sign(main, command)
        finally:
            os.close(main)
        yield root


def read_settings(root: str | os.PathLike) -> FeatureSettings:
    """The settings of an existing feature folder; a clear error when it has none."""
    folder = FeatureFolder(root)
    settings = folder.settings
    if settings is None:
        raise InputNotFoundError(
            f"'{folder.settings_path}' not found: '{root}' is not a feature folder (make one with `eleatt extract`)"
        )
    return settings
