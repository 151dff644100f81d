"""Torch datasets over feature folders: fixed-length or whole feature sequences per video, and their collate.

A sample is a dict: `feats` float32 (T, D) in training (one random view) or (V, T, D) in evaluation (all views),
`length` (valid steps), `label` (-1 when unknown), `video` (the list path). `collate_sequences` pads T.
"""
from __future__ import annotations

from typing import Callable, Iterable, Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.features import FeatureFolder, as_views
from pipeline.data.lists import ListEntry
from pipeline.data.sampling import sequence_indices
from pipeline.errors import UsageError

NormalizeMode = Literal["none", "l2", "standard"]


def normalize_features(feats: torch.Tensor, mode: str, mean: Optional[torch.Tensor] = None,
                       std: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-step normalisation of feats (..., D): "l2" scales each step to unit L2 norm, "standard" computes
    (feats - mean) / std with per-dimension statistics (D,), "none" returns feats. What `FeatureNormalizer` applies;
    TorchScript-scriptable (the export models of `pipeline.serving.export` script it)."""
    if mode == "l2":
        return torch.nn.functional.normalize(feats, dim=-1)
    if mode == "standard":
        assert mean is not None and std is not None, "normalize='standard' needs mean and std"
        return (feats - mean) / std
    return feats


class FeatureNormalizer:
    """Per-step feature normalisation: "none", "l2" (each step to unit L2 norm), or "standard" (per-dimension
    mean/std estimated on training features with `fit`, kept in `state_dict` so checkpoints carry it)."""

    def __init__(self, mode: NormalizeMode = "none") -> None:
        if mode not in ("none", "l2", "standard"):
            raise UsageError(f"normalize={mode!r} is not one of 'none', 'l2', 'standard'")
        self.mode = mode
        self.mean: torch.Tensor | None = None  # (D,) float32, "standard" only
        self.std: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.mode != "standard" or self.mean is not None

    def fit(self, arrays: Iterable[np.ndarray], eps: float = 1e-6) -> None:
        """Estimates mean/std from arrays (..., D) (all steps and views pooled), in float64."""
        if self.mode != "standard":
            return
        total, sq, count = None, None, 0
        for arr in arrays:
            x = np.asarray(arr, dtype=np.float64).reshape(-1, arr.shape[-1])  # (N, D)
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
            count += x.shape[0]
        if not count:
            raise UsageError("normalize='standard' needs training features to estimate mean/std; none were given")
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
        self.mean = torch.from_numpy(mean.astype(np.float32))
        self.std = torch.from_numpy(np.maximum(std, eps).astype(np.float32))

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (..., D) float32 -> same shape."""
        if self.mode == "standard" and self.mean is None:
            raise UsageError(
                "normalize='standard' has no statistics: they are estimated when training (fit) and stored in "
                "the checkpoint; pass --ckpt_path of a run trained with normalize='standard'"
            )
        return normalize_features(feats, self.mode, self.mean, self.std)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise UsageError(
                f"the checkpoint was trained with normalize={state['mode']!r} but the data is configured with "
                f"normalize={self.mode!r} (set --data.normalize {state['mode']})"
            )
        self.mean, self.std = state.get("mean"), state.get("std")


def sample_sequence(views: np.ndarray, num_steps: int | None, normalizer: FeatureNormalizer | None = None,
                    train: bool = False, rng: np.random.Generator | None = None) -> torch.Tensor:
    """The steps a model sees of one video: views (V, T, D) -> float32 (V, T', D).

    `num_steps` steps segment-style (`sequence_indices`: random within segments in training, segment centres
    otherwise), or all T when None/0; then the normaliser. The dataset and `eleatt classify` both call this, so a
    new video is seen exactly as a test video is.
    """
    if num_steps:
        views = views[:, sequence_indices(views.shape[1], num_steps, train=train, rng=rng)]  # (V, num_steps, D)
    feats = torch.from_numpy(np.array(views, dtype=np.float32))  # a copy (off a memory map)
    return normalizer(feats) if normalizer is not None else feats


class FeatureSequenceDataset(Dataset):
    """Feature sequences of the videos of a list.

    Args:
        folder: the feature folder.
        entries: list entries (path, label).
        num_steps: steps per sample, chosen segment-style (`sequence_indices`: random within segments in training,
            segment centres otherwise; repeats when a video is shorter); 0 or None = all steps.
        train: one random view and random positions per sample; otherwise all views, deterministic positions.
        normalizer: applied to every step (see FeatureNormalizer).
        transform: optional per-sample hook on the float32 tensor ((T, D) in training, (V, T, D) otherwise),
            after normalisation; e.g. augmentation.

    Randomness comes from torch's generator, so a seeded run (and a resumed one) draws the same samples.
    """

    def __init__(
        self,
        folder: FeatureFolder,
        entries: Sequence[ListEntry],
        num_steps: int | None = None,
        train: bool = False,
        normalizer: FeatureNormalizer | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if num_steps is not None and num_steps < 0:
            raise UsageError(f"num_steps={num_steps} must be >= 0 (0 or None = all steps)")
        self.folder = folder
        self.entries = list(entries)
        self.num_steps = num_steps or None
        self.train = train
        self.normalizer = normalizer
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        # The header is checked here, the values of the steps this sample reads below: never the whole file.
        views = as_views(self.folder.load(entry.path, mmap=True, finite=False))  # (V, T, D)
        if self.train:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            views = views[int(rng.integers(views.shape[0]))][None]  # (1, T, D)
            feats = sample_sequence(views, self.num_steps, train=True, rng=rng)[0]  # (T', D)
        else:
            feats = sample_sequence(views, self.num_steps)  # (V, T', D)
        self.folder.check_finite(entry.path, feats)  # NaN/inf never trains silently: a clear error naming the file
        if self.normalizer is not None:
            feats = self.normalizer(feats)
        if self.transform is not None:
            feats = self.transform(feats)
        return {"feats": feats, "length": feats.shape[-2], "label": entry.label, "video": entry.path, "index": index}


def collate_sequences(samples: list[dict]) -> dict:
    """Pads the time axis: feats (B, T_max, D) or (B, V, T_max, D) float32 (zeros after each length),
    lengths (B,) int64, labels (B,) int64, videos list[str], indices (B,) int64 (positions in the list)."""
    lengths = torch.tensor([s["length"] for s in samples], dtype=torch.long)
    first = samples[0]["feats"]
    feats = first.new_zeros((len(samples), *first.shape[:-2], int(lengths.max()), first.shape[-1]))
    for i, s in enumerate(samples):
        if s["feats"].shape[:-2] != first.shape[:-2]:
            raise UsageError(
                f"video {s['video']!r} has {tuple(s['feats'].shape[:-2])} views but {samples[0]['video']!r} has "
                f"{tuple(first.shape[:-2])}; every video of a feature folder must be extracted with the same views"
            )
        feats[i, ..., : s["length"], :] = s["feats"]
    labels = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    indices = torch.tensor([s.get("index", -1) for s in samples], dtype=torch.long)
    return {"feats": feats, "lengths": lengths, "labels": labels, "videos": [s["video"] for s in samples],
            "indices": indices}
