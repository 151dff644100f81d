"""The Lightning data module over a feature folder and its lists (train/val/test/predict).

Its `feature_dim`, `num_classes`, `class_names` and `extraction_settings` are known right after `__init__` (read
from settings.json, classes.txt and at most one feature file), so the CLI links them into the model.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only
import torch
from torch.utils.data import DataLoader

from pipeline.data.sequences import FeatureNormalizer, FeatureSequenceDataset, NormalizeMode, collate_sequences
from pipeline.data.features import FeatureFolder, FeatureSettings
from pipeline.data.lists import ListEntry, classes_path_for, read_classes, read_list
from pipeline.errors import InputNotFoundError, UsageError

class MissingFeaturesError(InputNotFoundError):
    """Videos of a list have no feature file in the feature folder."""


@rank_zero_only
def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


class ListDataModule(pl.LightningDataModule):
    """The loaders shared by the data modules of lists (features, video clips): `self.datasets` holds the datasets
    of the lists given ("train", "val", "test", "predict"), `collate_fn` turns samples into the model's batches."""

    collate_fn: Callable = staticmethod(collate_sequences)
    drop_last_partial: bool = False  # a training epoch ends before a last partial batch (BatchNorm in the model)

    # -- the lists and their classes (what the model is linked to) ---------------------------------------------------
    def _init_lists(self, train_list, val_list, test_list, predict_list) -> None:
        self.list_paths = {
            name: Path(path) for name, path in
            (("train_list", train_list), ("val_list", val_list), ("test_list", test_list), ("predict_list", predict_list))
            if path
        }
        if not self.list_paths:
            raise UsageError("no list given: pass at least one of --data.train_list/val_list/test_list/predict_list")
        self._lists: dict[str, list[ListEntry]] = {}  # read when a stage (or the class count) needs them

    def _read_class_names(self, classes: str | None) -> list[str] | None:
        if classes:
            return read_classes(classes)
        for path in self.list_paths.values():
            candidate = classes_path_for(path)
            if candidate.is_file():
                return read_classes(candidate)
        return None

    def _existing_lists(self) -> list[str]:
        return [name for name, path in self.list_paths.items() if path.is_file()]

    def entries(self, name: str) -> list[ListEntry]:
        """The entries of list `name` ("train_list", ...), read once; labels checked against the classes."""
        if name not in self._lists:
            entries = read_list(self.list_paths[name])
            if not entries:
                raise UsageError(f"{name} '{self.list_paths[name]}' lists no videos")
            if self.class_names is not None:
                bad = [e for e in entries if e.label >= len(self.class_names)]
                if bad:
                    raise UsageError(
                        f"{name} '{self.list_paths[name]}': video {bad[0].path!r} has label {bad[0].label} but "
                        f"classes.txt names {len(self.class_names)} classes ({len(bad)} such videos; is it the "
                        "right classes.txt?)"
                    )
            self._lists[name] = entries
        return self._lists[name]

    def _resolve_num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        labels = [e.label for name in self._existing_lists() for e in self.entries(name)]
        if not labels or max(labels) < 0:
            raise UsageError(
                f"cannot tell the number of classes: no classes.txt beside {[str(p) for p in self.list_paths.values()]} "
                "and no labels (pass --data.classes PATH/classes.txt, or the training list with --data.train_list)"
            )
        return max(labels) + 1

    def _loader(self, key: str, train: bool = False) -> DataLoader:
        if key not in self.datasets:
            raise UsageError(f"no {key} data: pass --data.{key}_list (setup found none)")
        dataset = self.datasets[key]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and self.drop_last_partial and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        # No val_list: fit runs without validation (Lightning accepts an empty list of loaders).
        return self._loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class FeatureDataModule(ListDataModule):
    """Feature sequences from `features_dir` for the videos of the lists.

    Args:
        features_dir: a feature folder (DESIGN's format: `<dir>/<list path without extension>.npy`, settings.json).
        train_list: list file (`<relative path> <label>`) to train on (fit).
        val_list: list file for validation (fit, validate); without it fit runs no validation.
        test_list: list file for test.
        predict_list: list file for predict (labels may be -1).
        classes: classes.txt; default: the one beside the first of train/val/test/predict list that has one.
        num_steps: steps per sample, segment-style (random within segments in training, centres in evaluation);
            0 or null = all steps, padded per batch and packed in the model.
        normalize: none, l2 (each step to unit norm), or standard (per-dimension mean/std of the training
            features, stored in checkpoints).
        normalize_max_videos: training videos read to estimate the standard normalisation.
        batch_size: training batch size (videos).
        eval_batch_size: evaluation batch size (default: batch_size); each video brings all its views.
        num_workers: DataLoader worker processes.
        pin_memory: DataLoader pin_memory.
        train_transform: optional per-sample hook on float32 (T, D) training tensors, after normalisation
            (e.g. augmentation).
        eval_transform: optional per-sample hook on float32 (V, T, D) evaluation tensors.
        augment: a training-time augmentation set from the config: none, or skeleton_rotation (a random rotation
            of every joint about x, y and z within +-rotation_degrees; skeleton feature folders, normalize none).
        rotation_degrees: the largest rotation of skeleton_rotation, per axis (the paper's 35).
        drop_missing: leave out (and list, on stderr) the videos of a list that have no features in the folder
            (their extraction failed: a damaged or too short video), instead of refusing the run. Each stream
            drops its own; for two streams on exactly the same videos, see `eleatt prepare filter`.
    """

    def __init__(
        self,
        features_dir: str,
        train_list: str | None = None,
        val_list: str | None = None,
        test_list: str | None = None,
        predict_list: str | None = None,
        classes: str | None = None,
        num_steps: int | None = 16,
        normalize: NormalizeMode = "none",
        normalize_max_videos: int = 1000,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        eval_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        augment: Literal["none", "skeleton_rotation"] = "none",
        rotation_degrees: float = 35.0,
        drop_missing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise UsageError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        self.features_dir = Path(features_dir)
        if not self.features_dir.is_dir():
            raise InputNotFoundError(
                f"feature folder '{self.features_dir}' not found (extract features with `eleatt extract ... --out DIR` "
                "and pass --data.features_dir DIR)"
            )
        self.folder = FeatureFolder(self.features_dir)
        self._init_lists(train_list, val_list, test_list, predict_list)
        self.num_steps = num_steps or None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.normalize_max_videos = normalize_max_videos
        self.normalizer = FeatureNormalizer(normalize)
        self.drop_missing = bool(drop_missing)
        self.dropped: dict[str, list[str]] = {}  # list name -> the videos left out (drop_missing)

        self.settings: FeatureSettings | None = self.folder.settings
        # The plain-dict form, linked into the model's hyper-parameters (checkpoints stay weights-only loadable).
        self.extraction_settings: dict | None = self.settings.to_json() if self.settings else None
        self.class_names: list[str] | None = self._read_class_names(classes)
        self.num_classes: int = self._resolve_num_classes()
        self.feature_dim: int = self._resolve_feature_dim()
        self.datasets: dict[str, FeatureSequenceDataset] = {}
        if augment != "none":
            self.train_transform = self._augmentation(augment, rotation_degrees, normalize)

    def _augmentation(self, augment: str, rotation_degrees: float, normalize: str) -> Callable:
        if augment != "skeleton_rotation":
            raise UsageError(f"augment={augment!r} is not one of 'none', 'skeleton_rotation'")
        if self.train_transform is not None:
            raise UsageError("give either augment or train_transform, not both")
        modality = self.settings.modality if self.settings is not None else "skeleton"
        if modality != "skeleton" or self.feature_dim % 3 or normalize != "none":
            raise UsageError(
                f"augment=skeleton_rotation rotates x, y, z joint coordinates, but '{self.features_dir}' holds "
                f"{modality} features of dimension {self.feature_dim} with normalize={normalize!r}; use it on a "
                "skeleton feature folder (`eleatt prepare ntu-skeleton`) with --data.normalize none"
            )
        channels = self.settings.options.get("channels", "x, y, z") if self.settings is not None else "x, y, z"
        if channels != "x, y, z":  # 2D keypoints (pyskl files): (x, y, score) per joint is no 3D point
            raise UsageError(f"augment=skeleton_rotation rotates 3D joints, but '{self.features_dir}' holds "
                             f"{channels} per joint (2D keypoints); train it with --data.augment none")
        from pipeline.data.skeleton import SkeletonRotation

        return SkeletonRotation(rotation_degrees)

    def _resolve_feature_dim(self) -> int:
        if self.settings is not None and self.settings.dim:
            return int(self.settings.dim)
        for name in self._existing_lists():
            for entry in self.entries(name):
                if self.folder.feature_path(entry.path).is_file():
                    return int(self.folder.load(entry.path, mmap=True, finite=False).shape[-1])  # the header
        raise MissingFeaturesError(
            f"cannot tell the feature dimension: '{self.features_dir}' has no settings.json with 'dim' and no "
            f"feature file of the videos in {[str(p) for p in self.list_paths.values()]}; extract them with "
            f"`eleatt extract --list LIST --out {self.features_dir}`"
        )

    # -- stages ------------------------------------------------------------------------------------------------------
    def _check_features(self, name: str) -> list[ListEntry]:
        """The entries of list `name` that have features: all of them, or (drop_missing) those left after the
        others are dropped and listed; without drop_missing, missing features refuse the run, naming each file,
        why it is missing, and the two fixes as commands."""
        entries = self.entries(name)
        missing = self.folder.missing([e.path for e in entries])
        if not missing:
            return entries
        failed = self.folder.failed(finished={})  # looked up for missing videos only: none is finished
        if self.drop_missing and len(missing) < len(entries):
            gone = set(missing)
            self._lists[name] = kept = [e for e in entries if e.path not in gone]
            self.dropped[name] = missing
            _note(f"{name} '{self.list_paths[name]}': left out {len(missing)} of {len(entries)} videos without "
                  f"features in '{self.features_dir}' (--data.drop_missing): "
                  + ", ".join(f"{v} ({failed[v]})" if v in failed else v for v in missing[:5])
                  + (f", ... and {len(missing) - 5} more" if len(missing) > 5 else ""))
            return kept
        lines = [f"{self.folder.feature_path(v)}" + (f"  (extraction failed: {failed[v]})" if v in failed else "")
                 for v in missing[:20]]
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        if len(missing) == len(entries):
            fix = f"extract them first:\n  {self._extract_command(name)}"
        else:
            fix = (f"leave them out: add --data.drop_missing true to this command (each stream drops its own; "
                   f"`eleatt prepare filter` writes lists without the videos any stream lacks), or extract them "
                   f"(a video that failed fails again until it is replaced):\n  {self._extract_command(name)}")
        raise MissingFeaturesError(
            f"{len(missing)} of {len(entries)} videos of {name} '{self.list_paths[name]}' have no "
            f"features in '{self.features_dir}':\n  " + "\n  ".join(lines) + f"{more}\nTo go on, {fix}"
        )

    def _extract_command(self, name: str) -> str:
        """The `eleatt extract` command that makes this folder's missing features, with its recorded settings;
        VIDEOS stands for the folder the list's paths are relative to (a flow folder for flow features)."""
        s = self.settings
        flow = s is not None and s.modality == "flow"
        parts = ["eleatt extract"] + ([f"--modality flow --stack {s.stack}"] if flow else [])
        root = "FLOW_DIR" if flow else "VIDEOS"
        parts.append(f"--list {self.list_paths[name]} --root {root} --out {self.features_dir}")
        if s is not None and s.backbone:
            parts.append(f"--backbone {s.backbone} --weights {s.weights}")
        where = "the flow folder the features were made from" if flow else "the folder the list's paths start from"
        return " ".join(parts) + f"   ({root}: {where})"

    def _entries(self, name: str, stage: str) -> list[ListEntry]:
        if name not in self.list_paths:
            raise UsageError(f"`{stage}` needs --data.{name} (a list file of the videos to {stage} on)")
        return self.entries(name)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._entries("train_list", stage)
            train = self._check_features("train_list")
            unlabelled = [e.path for e in train if e.label < 0]
            if unlabelled:
                raise UsageError(
                    f"train_list '{self.list_paths['train_list']}' has {len(unlabelled)} videos without a label "
                    f"(-1), e.g. {unlabelled[0]!r}; training needs labels"
                )
            if not self.normalizer.ready:
                self._fit_normalizer(train)
            self.datasets["train"] = FeatureSequenceDataset(
                self.folder, train, self.num_steps, train=True, normalizer=self.normalizer, transform=self.train_transform
            )
            if "val_list" in self.list_paths:
                self.datasets["val"] = self._eval_dataset("val_list", stage)
        else:
            name = {"validate": "val_list", "test": "test_list", "predict": "predict_list"}[stage]
            self.datasets[{"validate": "val", "test": "test", "predict": "predict"}[stage]] = self._eval_dataset(name, stage)

    def _eval_dataset(self, name: str, stage: str) -> FeatureSequenceDataset:
        self._entries(name, stage)
        entries = self._check_features(name)
        return FeatureSequenceDataset(
            self.folder, entries, self.num_steps, train=False, normalizer=self.normalizer, transform=self.eval_transform
        )

    def _fit_normalizer(self, train: list[ListEntry]) -> None:
        picks = np.linspace(0, len(train) - 1, min(len(train), self.normalize_max_videos)).round().astype(int)
        self.normalizer.fit(self.folder.load(train[i].path, mmap=True) for i in np.unique(picks))

    # -- evaluation state: the normalisation statistics and the test-time steps --------------------------------------
    def eval_state(self) -> dict:
        """What evaluation needs besides the model: the test-time step count and the normaliser's statistics. The
        model writes it into the trained-stream record of every checkpoint (`pipeline.trained.record`), the one
        place it is stored."""
        return {"num_steps": self.num_steps, "normalizer": self.normalizer.state_dict()}

    def load_eval_state(self, stream) -> None:
        """Takes the normaliser's statistics from a checkpoint's trained-stream record (evaluations and resumed
        fits use the training data's statistics, not statistics of the data at hand)."""
        self.normalizer.load_state_dict(dict(stream.normalizer))

    def load_state_dict(self, state_dict: dict) -> None:
        """Checkpoints written before the trained-stream record also hold this module's state under its own key."""
        if "normalizer" in state_dict:
            self.normalizer.load_state_dict(state_dict["normalizer"])
