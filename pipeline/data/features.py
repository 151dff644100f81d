"""The feature-folder format, the one place it is read and written (extraction, flow, skeletons, training).

Layout (`../shared/DESIGN.md`)::

    <root>/settings.json                 how the features were made; a rerun with other settings is refused
    <root>/<list path without ext>.npy   float16 (T, D) or (V, T, D); float32 where settings say so (skeletons)
    <root>/manifest.jsonl                one record per finished video (or manifest.rank<k>.jsonl per rank)
    <root>/failed.jsonl                  {video, error} per failure (or failed.rank<k>.jsonl)

Crash safety: an array is written under a temporary name and renamed into place *before* its manifest record is
appended, so a video is finished exactly when its record exists and its file is whole. A run killed at any moment
and restarted redoes only the videos without a record; a torn last manifest line is ignored.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

SETTINGS = "settings.json"
TMP_SUFFIX = ".tmp.npy"
DTYPES = ("float16", "float32")


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

    suffix = ".npy"  # the per-video file's extension (a flow folder stores `.flow.zip` files)

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
        """`<root>/<list path without extension><suffix>` (`.npy`) for a list path (relative, '/'-separated)."""
        rel = PurePosixPath(video.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"video path {video!r} must be relative to the root and stay under it (no '..')")
        stem, _ = os.path.splitext(rel.as_posix())
        return self.root / f"{stem}{self.suffix}"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # --- records --------------------------------------------------------------------------------------------
    def _shards(self, kind: str) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"{kind}.jsonl")) + sorted(self.root.glob(f"{kind}.rank*.jsonl"))

    def finished(self, verify: bool = True) -> dict[str, dict]:
        """video -> its manifest record, over every shard; with `verify`, only videos whose file exists."""
        records: dict[str, dict] = {}
        for shard in self._shards("manifest"):
            for record in _read_jsonl(shard):
                records[record["video"]] = record
        if verify:
            records = {v: r for v, r in records.items() if (self.root / r["feature"]).is_file()}
        return records

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
        target = self.feature_path(video)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=TMP_SUFFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(stored), allow_pickle=False)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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

    def load(self, video: str, mmap: bool = False) -> np.ndarray:
        """The stored array of `video`, `(T, D)` or `(V, T, D)`, as saved (never unpickles)."""
        path = self.feature_path(video)
        if not path.is_file():
            reason = self.failed().get(video)
            why = f" (its extraction failed: {reason})" if reason else ""
            raise FileNotFoundError(
                f"no features for '{video}' in '{self.root}': '{path}' is missing{why}; "
                "run `eleatt extract` for this list into this folder (it resumes), or drop the video from the list"
            )
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)

    def remove_stale_temporaries(self) -> int:
        """Deletes temporary files left by killed writers; call only while no writer runs. Returns the count."""
        count = 0
        if self.root.is_dir():
            for tmp in self.root.rglob(f".*{TMP_SUFFIX}"):
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
