"""Clips straight from videos for end-to-end training: decode -> sample -> transform, as a dataset and a data module.

The same lists, classes.txt, run folders and scores files as the feature path (`pipeline.training.feature_data`); the batch
dicts carry the keys `EleAttClassifier`'s steps read (`feats`, `lengths`, `labels`, `videos`, `indices`), where
`feats` holds the network's input -- normalised frames rather than stored features:

- training: one clip per video, TSN segment sampling (`num_segments` segments, a random frame in each) and the
  training augmentation of `pipeline.data.transforms` (one crop and one flip for the whole clip):
  `feats` float32 (B, T, C, H, W);
- evaluation: the segment centres and the evaluation views (`center`, `three` or `ten` crops):
  `feats` float32 (B, V, T, C, H, W).

A video that cannot be read is never silent and never ends an epoch: it is logged with its path and reason, counted
in the batch's `skipped` list (the model logs the count), and in training replaced by another random video of the
list; in evaluation it is left out of the batch (and so out of the scores file); so is one whose decoding does not finish
within its deadline (the decoding process is killed). Readers are opened per call inside each DataLoader worker's
decoding process (`load_frames` keeps none), so forked workers never share a decoder.

Frame geometry and normalisation come from the backbone's timm data config, resolved here from the backbone's name
(plain data: `pipeline.data` imports nothing from `pipeline.nn`); `frame_size` overrides the input size (e.g. 112
for fast runs).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.training.feature_data import ListDataModule
from pipeline.data.features import FeatureSettings
from pipeline.data.lists import ListEntry
from pipeline.data.sampling import Sampling, segment_indices
from pipeline.data.views import video_views
from pipeline.data.transforms import VIEW_COUNTS, eval_views, hflip, train_clip_transform
from pipeline.data.video import VideoReadError, close_readers, load_frames, probe
from pipeline.errors import InputNotFoundError, UsageError

log = logging.getLogger(__name__)

Modality = Literal["rgb", "flow"]
# Training replaces an unreadable video by another random one at most this many times per sample before giving up.
MAX_REPLACEMENTS = 10


def backbone_data_config(backbone: str, frame_size: int | None = None, in_chans: int = 3) -> dict[str, Any]:
    """timm's evaluation data config of a backbone name as a plain dict (input_size, mean, std, crop_pct,
    interpolation, crop_mode), as `FrameEncoder.data_config` reports it; `frame_size` overrides H = W and
    `in_chans` the channel count (2L for flow stacks)."""
    import timm
    from timm.data import resolve_data_config

    name = backbone.split(".")[0]
    if not timm.is_model(name):
        raise UsageError(f"unknown timm backbone {backbone!r} (see timm.list_models())")
    config = resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg(backbone).to_dict())
    size = tuple(config["input_size"])[1:] if frame_size is None else (int(frame_size), int(frame_size))
    if min(size) < 8:
        raise UsageError(f"frame_size={frame_size} is too small; use at least 8 pixels (112 or 224 are usual)")
    config["input_size"] = (in_chans, *size)
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}


class VideoClipDataset(Dataset):
    """Clips of the videos of a list, ready for the backbone.

    Args:
        root: the folder list paths are relative to (`video_root`, or the flow folder).
        entries: list entries (path, label).
        data_config: the backbone's data config (`backbone_data_config`).
        num_segments: T, frames (flow: stacks) per clip, one per segment.
        train: random frame per segment + training augmentation; otherwise centres + evaluation views.
        views: evaluation views: center, three or ten.
        augment: training crop: multi_scale (TSN) or random_resized.
        modality: rgb (video files or raw-frame folders) or flow (a flow folder, `pipeline.data.flow_files`: the list
            path `a/b.avi` reads `<root>/a/b.flow.zip`; stacks of L pairs divided by the bound, so the data config's
            mean/std should be 0/1).
        flow_length: L, flow fields per stack (flow only; the backbone then takes 2L channels).
        backend: the video decoding backend (`load_frames`).
    """

    def __init__(self, root: str | Path, entries: list[ListEntry], data_config: dict, num_segments: int = 8,
                 train: bool = False, views: str = "center", augment: str = "multi_scale", modality: Modality = "rgb",
                 flow_length: int = 5, backend: str = "auto") -> None:
        if num_segments < 1:
            raise UsageError(f"num_segments={num_segments} must be >= 1")
        if views not in VIEW_COUNTS:
            raise UsageError(f"views={views!r} is not one of {tuple(VIEW_COUNTS)}")
        if modality not in ("rgb", "flow"):
            raise UsageError(f"modality={modality!r} is not 'rgb' or 'flow'")
        self.root = Path(root)
        self.entries = list(entries)
        self.data_config = dict(data_config)
        self.num_segments = num_segments
        self.train = train
        self.views = views
        self.augment = augment
        self.modality = modality
        self.flow_length = flow_length
        self.backend = backend
        if modality == "flow" and views == "ten":
            raise UsageError("views='ten' mirrors crops, which flow stacks need with their x channels negated; use "
                             "views 'center' or 'three' for flow")
        self.settings = FeatureSettings(modality=modality, data_config=self.data_config,
                                        in_chans=int(self.data_config["input_size"][0]),
                                        sampling=Sampling(num_segments=num_segments), views=views)

    def __len__(self) -> int:
        return len(self.entries)

    def clip(self, path: Path, rng: np.random.Generator | None) -> torch.Tensor:
        """One video -> training clip (T, C, H, W) or evaluation views (V, T, C, H, W), float32, normalised."""
        if self.modality == "flow":
            return self._flow_clip(path, rng)
        if not self.train:  # the shared path from a video to views: classify and extract see a video the same way
            return torch.cat([c.views for c in video_views(path, self.settings, backend=self.backend)], dim=1)
        n = probe(path).num_frames
        idx = segment_indices(n, self.num_segments, train=True, rng=rng)  # (T,)
        frames = load_frames(path, idx, backend=self.backend)  # uint8 (T, H, W, 3)
        return train_clip_transform(frames, self.data_config, rng, augment=self.augment)

    def _flow_clip(self, path: Path, rng: np.random.Generator | None) -> torch.Tensor:
        """Flow stacks at the sampled positions: (T, 2L, H, W) in training, (V, T, 2L, H, W) in evaluation."""
        from pipeline.data.flow_files import FlowFolder, flow_info, flow_stack

        file = FlowFolder(self.root).feature_path(str(path.relative_to(self.root)))
        if not file.is_file():
            raise InputNotFoundError(f"{file}: no flow file for this video; run `eleatt flow` for the list into "
                                    f"'{self.root}' (it resumes), or drop the video from the list")
        pairs = int(flow_info(file)["pairs"])
        idx = segment_indices(pairs, self.num_segments, train=self.train, rng=rng)  # (T,) first pair of each stack
        stack = torch.from_numpy(flow_stack(file, idx, self.flow_length, normalize=True))  # (T, 2L, H, W) in [-1, 1]
        frames = stack.permute(0, 2, 3, 1)  # (T, H, W, 2L), what the clip transforms take
        if not self.train:
            return eval_views(frames, self.data_config, self.views)
        x = train_clip_transform(frames, self.data_config, rng, augment=self.augment, flip=False)
        return hflip(x, flow=True) if rng.random() < 0.5 else x  # a mirror reverses horizontal motion

    def _read(self, index: int, rng: np.random.Generator | None) -> tuple[torch.Tensor | None, str | None]:
        entry = self.entries[index]
        try:
            return self.clip(self.root / entry.path, rng), None
        except (VideoReadError, FileNotFoundError, ValueError) as err:
            # ValueError too: a file too short for its stacks, a bad image; named and counted, never fatal
            reason = f"{type(err).__name__}: {err}"
            log.warning("skipping unreadable video %s: %s", entry.path, reason)
            return None, reason

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item())) if self.train else None
        skipped: list[tuple[str, str]] = []
        clip, reason = self._read(index, rng)
        while clip is None:
            skipped.append((self.entries[index].path, reason))
            if not self.train:
                break
            if len(skipped) > MAX_REPLACEMENTS:
                shown = "; ".join(f"{v}: {r}" for v, r in skipped[:3])
                raise VideoReadError(f"{len(skipped)} videos in a row under '{self.root}' cannot be read ({shown}); "
                                     "check --data.video_root and the list")
            index = int(rng.integers(len(self.entries)))
            clip, reason = self._read(index, rng)
        entry = self.entries[index]
        return {"feats": clip, "length": self.num_segments, "label": entry.label, "video": entry.path,
                "index": index, "skipped": skipped}


def collate_clips(samples: list[dict]) -> dict:
    """Stacks clips: feats (B, T, C, H, W) in training or (B, V, T, C, H, W) in evaluation, float32; lengths (B,),
    labels (B,), indices (B,) int64; videos list[str]; skipped: (video, reason) of every unreadable video met (those
    are not in the batch, which may then be empty)."""
    skipped = [s for sample in samples for s in sample["skipped"]]
    good = [s for s in samples if s["feats"] is not None]
    if good:
        feats = torch.stack([s["feats"] for s in good])
    else:
        feats = torch.zeros(0)
    return {
        "feats": feats,
        "lengths": torch.tensor([s["length"] for s in good], dtype=torch.long),
        "labels": torch.tensor([s["label"] for s in good], dtype=torch.long),
        "videos": [s["video"] for s in good],
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "skipped": skipped,
    }


class VideoDataModule(ListDataModule):
    """Clips from the videos (or flow files) of the lists, for end-to-end training.

    Args:
        video_root: the folder the list paths are relative to (videos or raw-frame folders; for flow: the flow
            folder written by `eleatt flow`).
        train_list, val_list, test_list, predict_list: list files (`<relative path> <label>`), as for features.
        classes: classes.txt; default: the one beside the first list that has one.
        modality: rgb or flow.
        num_segments: T, frames (flow: stacks) per clip, one per segment (TSN: 8 for training with ResNet-50,
            25 at test in the paper; one value here so that train and test see the same T).
        flow_length: L, flow fields per stack (flow only; the backbone takes 2L channels).
        backbone: the backbone's timm name; linked from `--model.backbone` (its data config sets size and
            normalisation).
        frame_size: input height = width (default: the backbone's, e.g. 224).
        augment: training crop: multi_scale (TSN's corner/scale jitter) or random_resized.
        views: evaluation views: center, three or ten crops (probabilities averaged over them).
        batch_size: training clips per batch (per device under DDP).
        eval_batch_size: evaluation videos per batch (default: batch_size); each brings V views.
        num_workers: DataLoader processes decoding and transforming.
        pin_memory: DataLoader pin_memory (on for GPUs).
        backend: video decoding backend (auto, pyav, decord, torchcodec, rawframes). Every read runs in a decoding
            process under a deadline (`pipeline.data.decode_guard`, ELEATT_DECODE_TIMEOUT): a video whose decoding
            hangs is skipped like an unreadable one, and the epoch goes on.
    """

    collate_fn = staticmethod(collate_clips)
    drop_last_partial = True  # a last batch of 1 clip would make BatchNorm fail in a fine-tuned backbone

    def __init__(
        self,
        video_root: str,
        train_list: str | None = None,
        val_list: str | None = None,
        test_list: str | None = None,
        predict_list: str | None = None,
        classes: str | None = None,
        modality: Modality = "rgb",
        num_segments: int = 8,
        flow_length: int = 5,
        backbone: str = "resnet50",
        frame_size: int | None = None,
        augment: Literal["multi_scale", "random_resized"] = "multi_scale",
        views: Literal["center", "three", "ten"] = "center",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        backend: Literal["auto", "pyav", "decord", "torchcodec", "rawframes"] = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise UsageError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        if modality == "flow" and flow_length < 1:
            raise UsageError(f"flow_length={flow_length} must be >= 1")
        self.video_root = Path(video_root)
        if not self.video_root.is_dir():
            what = "flow folder (eleatt flow ... --out DIR)" if modality == "flow" else "folder of the videos"
            raise InputNotFoundError(f"video_root '{self.video_root}' not found; pass --data.video_root, the {what} "
                                    "the list paths are relative to")
        self._init_lists(train_list, val_list, test_list, predict_list)
        self.modality = modality
        self.in_chans: int = 2 * flow_length if modality == "flow" else 3
        self.data_config = backbone_data_config(backbone, frame_size, self.in_chans)
        if modality == "flow":  # stacks come divided by the flow bound ([-1, 1], zero motion at 0): no mean/std
            self.data_config.update(mean=(0.0,), std=(1.0,))
        self.class_names: list[str] | None = self._read_class_names(classes)
        self.num_classes: int = self._resolve_num_classes()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.datasets: dict[str, VideoClipDataset] = {}
        # The stream's description, recorded in checkpoints (hyper_parameters.extraction_settings) so that classify
        # sees a new video as a test video was seen; the model fills in the backbone's weights and feature size.
        # float32: end to end, features go from the backbone to the stack without a stored float16 round trip.
        self.settings = FeatureSettings(
            modality=modality, backbone=backbone, data_config=self.data_config, in_chans=self.in_chans,
            sampling=Sampling(num_segments=num_segments), views=views, dtype="float32",
            stack=flow_length if modality == "flow" else 1,
            options={"end_to_end": True, **({"flow_norm": "bound"} if modality == "flow" else {})},
        )
        self.extraction_settings: dict[str, Any] = self.settings.to_json()

    def _dataset(self, name: str, stage: str, train: bool) -> VideoClipDataset:
        if name not in self.list_paths:
            raise UsageError(f"`{stage}` needs --data.{name} (a list file of the videos to {stage} on)")
        hp = self.hparams
        return VideoClipDataset(self.video_root, self.entries(name), self.data_config, hp.num_segments, train=train,
                                views=hp.views, augment=hp.augment, modality=hp.modality,
                                flow_length=hp.flow_length, backend=hp.backend)

    def teardown(self, stage: str) -> None:
        close_readers()  # this process's decoding processes (DataLoader workers stop their own when they end)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            train = self._dataset("train_list", stage, True)
            unlabelled = [e.path for e in train.entries if e.label < 0]
            if unlabelled:
                raise UsageError(f"train_list '{self.list_paths['train_list']}' has {len(unlabelled)} videos without "
                                 f"a label (-1), e.g. {unlabelled[0]!r}; training needs labels")
            self.datasets["train"] = train
            if "val_list" in self.list_paths:
                self.datasets["val"] = self._dataset("val_list", stage, False)
        else:
            key = {"validate": "val", "test": "test", "predict": "predict"}[stage]
            self.datasets[key] = self._dataset(f"{key}_list", stage, False)

