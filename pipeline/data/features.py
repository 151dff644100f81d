"""The feature-folder format, the one place it is read and written (extraction, flow, skeletons, training).

Layout (`../shared/DESIGN.md`)::

    <root>/settings.json                 how the features were made; a rerun with other settings is refused
    <root>/<list path without ext>.npy   float16 (T, D) or (V, T, D); float32 where settings say so (skeletons)
    <root>/manifest.jsonl                one record per finished video (or manifest.rank<k>.jsonl per rank)
    <root>/failed.jsonl                  {video, error} per failure (or failed.rank<k>.jsonl)

Crash safety: an array is written under a temporary name in `<root>/.eleatt-tmp/` (a folder no list path may use,
so cleaning it up never deletes a user's file) and renamed into place *before* its manifest record is appended, so a
video is finished exactly when its record exists and its file is whole. A run killed at any moment and restarted
redoes only the videos without a record; a torn last manifest line is ignored. A file damaged since (truncated,
overwritten, another shape than its record says) is not finished: a rerun redoes it, and loading it raises
FeatureFileError naming the file and the fix. `FeatureFolder.lock()` keeps a second writer out of a folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from pipeline.paths import TMP_PREFIX, atomic_write

try:  # POSIX; elsewhere the lock is advisory only (see FeatureFolder.lock)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

SETTINGS = "settings.json"
TMP_DIR = TMP_PREFIX  # <root>/.eleatt-tmp/: the temporary files of writers; no list path may start with it
LOCK = ".eleatt-lock"  # <root>/.eleatt-lock: held (flock) by the process writing the folder
DTYPES = ("float16", "float32")


class FeatureFileError(ValueError):
    """A feature file that exists but cannot be used: truncated, garbage, wrong shape, zero frames, not finite."""


class FolderLockedError(ValueError):
    """Another process is writing the feature folder."""


class SettingsMismatchError(ValueError):
    """A feature folder was made with other settings than the ones asked for now."""


def as_views(features: np.ndarray) -> np.ndarray:
    """Returns stored features as `(V, T, D)`: a `(T, D)` array becomes one view."""
    if features.ndim == 2:
        return features[None]
    if features.ndim == 3:
        return features
    raise ValueError(f"features must be (T, D) or (V, T, D), got shape {tuple(features.shape)}")


def _canonical(value: Any) -> Any:
    """JSON round trip, so that tuples and lists (and int/float keys) compare the way they are stored."""
    return json.loads(json.dumps(value, sort_keys=True))


def _read_jsonl(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill: its video has no valid record and is redone
            if isinstance(record, dict) and "video" in record:
                yield record


class FeatureFolder:
    """A feature folder; `rank` selects this process's manifest/failure shards (None: the unsharded files)."""

    def __init__(self, root: str | os.PathLike, rank: int | None = None):
        self.root = Path(root)
        self.rank = rank
        suffix = "" if rank is None else f".rank{int(rank)}"
        self.manifest_path = self.root / f"manifest{suffix}.jsonl"
        self.failed_path = self.root / f"failed{suffix}.jsonl"
        self._repaired: set[Path] = set()

    def __repr__(self) -> str:
        return f"FeatureFolder({str(self.root)!r}, rank={self.rank})"

    # --- settings -------------------------------------------------------------------------------------------
    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS

    @property
    def settings(self) -> dict | None:
        """The folder's settings, or None for a folder that has none yet."""
        if not self.settings_path.is_file():
            return None
        with open(self.settings_path, encoding="utf-8") as f:
            return json.load(f)

    def check_settings(self, settings: dict) -> None:
        """Records `settings` in a new folder; in an existing one, refuses any that differ.

        Raises SettingsMismatchError naming every differing key with the stored and the new value.
        Safe when several ranks call it at once: the first to create `settings.json` wins, the others compare.
        """
        new = _canonical(settings)
        if new.get("dtype", "float16") not in DTYPES:
            raise ValueError(f"settings dtype {new.get('dtype')!r} is not one of {DTYPES}")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.settings_path.exists():
            fd, tmp = tempfile.mkstemp(prefix=".settings.", suffix=".tmp", dir=self.root)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(new, f, indent=2, sort_keys=True)
                f.write("\n")
            try:
                os.link(tmp, self.settings_path)  # fails if another process created it first
                return
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        old = self.settings
        if old == new:
            return
        keys = sorted(set(old) | set(new))
        diffs = [f"{k}: stored {old.get(k, '<absent>')!r}, asked {new.get(k, '<absent>')!r}"
                 for k in keys if old.get(k) != new.get(k)]
        raise SettingsMismatchError(
            f"feature folder '{self.root}' was made with other settings ({'; '.join(diffs)}); "
            f"write into a new folder (--out), or rerun with the stored settings ({self.settings_path})"
        )

    @property
    def dtype(self) -> np.dtype:
        return np.dtype((self.settings or {}).get("dtype", "float16"))

    # --- paths ----------------------------------------------------------------------------------------------
    def feature_path(self, video: str) -> Path:
        """`<root>/<list path without extension>.npy` for a list path (relative, '/'-separated)."""
        rel = PurePosixPath(video.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"video path {video!r} must be relative to the root and stay under it (no '..')")
        if rel.parts[0] in (TMP_DIR, LOCK):
            raise ValueError(f"video path {video!r} starts with {rel.parts[0]!r}, the name of the feature folder's "
                             "own temporary folder/lock; rename that folder of videos")
        stem, _ = os.path.splitext(rel.as_posix())
        return self.root / f"{stem}.npy"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # --- records --------------------------------------------------------------------------------------------
    def _shards(self, kind: str) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"{kind}.jsonl")) + sorted(self.root.glob(f"{kind}.rank*.jsonl"))

    def finished(self, verify: bool = True) -> dict[str, dict]:
        """video -> its manifest record, over every shard.

        With `verify` (the default), only videos whose file is whole: it exists, its .npy header parses, its shape
        is the record's (views, frames, dim) with at least one frame, and its size is the header's. This reads the
        first bytes of each file, not the data; a file damaged since its record is thus redone by a rerun.
        """
        records: dict[str, dict] = {}
        for shard in self._shards("manifest"):
            for record in _read_jsonl(shard):
                records[record["video"]] = record
        if verify:
            records = {v: r for v, r in records.items() if self._whole(r)}
        return records

    def _whole(self, record: dict) -> bool:
        """True when the file of a manifest record is whole and has the record's shape (see `finished`)."""
        path = self.root / str(record.get("feature", ""))
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                offset = f.tell()
            size = path.stat().st_size
        except (OSError, ValueError, EOFError):
            return False
        if dtype.hasobject or len(shape) not in (2, 3):
            return False
        views, frames, dim = (1, *shape) if len(shape) == 2 else shape
        expected = (record.get("views", views), record.get("frames", frames), record.get("dim", dim))
        if (views, frames, dim) != tuple(expected) or frames < 1:
            return False
        return size == offset + int(np.prod(shape)) * dtype.itemsize

    def failed(self) -> dict[str, str]:
        """video -> its last error, over every shard, without the videos that are finished (record and file)."""
        errors: dict[str, str] = {}
        for shard in self._shards("failed"):
            for record in _read_jsonl(shard):
                errors[record["video"]] = str(record.get("error", ""))
        if errors:
            # Verified: a video whose file has gone since its record and that then failed on a rerun is failed.
            done = self.finished()
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
            raise ValueError(
                f"features of '{video}' are not finite in {dtype} (max |x| = {np.abs(features).max():.3g}); "
                "check the backbone's input normalisation, or store float32 (settings dtype)"
            )
        if views.shape[1] < 1:
            raise ValueError(f"features of '{video}' have zero frames; nothing to store")
        target = self.feature_path(video)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file lives in our own folder (same file system, so the rename is atomic), never beside
        # the user's files; it gets the umask's permissions so that a shared folder stays readable.
        with atomic_write(target, "wb", tmp_dir=self.root / TMP_DIR) as f:
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

    def load(self, video: str, mmap: bool = False, check: bool = True) -> np.ndarray:
        """The stored array of `video`, `(T, D)` or `(V, T, D)`, as saved (never unpickles).

        With `check` (the default), a file that cannot be used raises FeatureFileError naming it and the fix: it
        does not parse as .npy (truncated, garbage), has another layout or feature dimension than the folder's
        settings, zero frames, or values that are not finite (NaN/inf would silently train a NaN model).
        """
        path = self.feature_path(video)
        if not path.is_file():
            reason = self.failed().get(video)
            why = f" (its extraction failed: {reason})" if reason else ""
            raise FileNotFoundError(
                f"no features for '{video}' in '{self.root}': '{path}' is missing{why}; "
                "run `eleatt extract` for this list into this folder (it resumes), or drop the video from the list"
            )
        fix = (f"re-extract it: rerun `eleatt extract` with this list into '{self.root}' (it redoes damaged files), "
               "or delete the file and rerun")
        try:
            features = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise FeatureFileError(f"feature file '{path}' of '{video}' cannot be read ({reason}); {fix}") from None
        if not check:
            return features
        dim = (self.settings or {}).get("dim") if self.settings_path.is_file() else None
        if features.ndim not in (2, 3) or features.dtype.kind != "f":
            problem = f"holds a {features.dtype} array of shape {tuple(features.shape)}, not (T, D) or (V, T, D)"
        elif features.shape[-2] == 0:
            problem = "has zero frames"
        elif dim and features.shape[-1] != int(dim):
            problem = f"has feature dimension {features.shape[-1]} but the folder's settings say {dim}"
        elif not np.isfinite(features).all():
            bad = int((~np.isfinite(features)).sum())
            problem = f"holds {bad} non-finite values (NaN/inf)"
        else:
            return features
        raise FeatureFileError(f"feature file '{path}' of '{video}' {problem}; {fix}")

    @contextlib.contextmanager
    def lock(self, command: str = "a writer"):
        """`with folder.lock("extract"):` holds the folder for this process; a second process is refused at once
        with FolderLockedError naming the holder (pid, host, command, start time).

        The lock is an flock on `<root>/.eleatt-lock`: the system drops it when its process ends however it ends,
        so a crashed run never leaves a stale lock. (On file systems without flock, and on Windows, no lock.)
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    with open(path, encoding="utf-8", errors="replace") as f:
                        holder = f.read().strip() or "another process"
                    raise FolderLockedError(
                        f"feature folder '{self.root}' is being written by {holder}; wait for it to finish (a "
                        "second run would redo its work), or write into another folder (--out)"
                    ) from None
                except OSError:  # no flock on this file system (some network mounts): go on unlocked
                    pass
            os.ftruncate(fd, 0)
            os.write(fd, (f"`eleatt {command}` (pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n").encode())
            yield self
        finally:
            os.close(fd)  # releases the flock

    def remove_stale_temporaries(self) -> int:
        """Deletes temporary files left by killed writers (only inside `<root>/.eleatt-tmp/`, which holds nothing
        else: a user's file is never touched); call only while no writer runs. Returns the count."""
        count = 0
        tmp_dir = self.root / TMP_DIR
        if tmp_dir.is_dir():
            for tmp in tmp_dir.iterdir():
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    count += 1
        return count


def read_settings(root: str | os.PathLike) -> dict:
    """The settings of an existing feature folder; a clear error when it has none."""
    folder = FeatureFolder(root)
    settings = folder.settings
    if settings is None:
        raise FileNotFoundError(
            f"'{folder.settings_path}' not found: '{root}' is not a feature folder (make one with `eleatt extract`)"
        )
    return settings
