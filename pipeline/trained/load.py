"""A trained stream, ready to use: the plain `nn.Module` classifier (and backbone) built from a checkpoint's record.

The one loader of trained models for everything that serves them (classify, stream, export, visualize); it imports
no Lightning and builds nothing from the training code: `SequenceClassifier(**record.network)` with the `net.*`
weights, the backbone the record names (an end-to-end stream's own, fine-tuned weights from `encoder.*`), and the
feature normaliser with its training statistics.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from pipeline.data.sequences import FeatureNormalizer, sample_sequence
from pipeline.nn.backbone import FrameEncoder
from pipeline.nn.classifier import SequenceClassifier
from pipeline.trained.record import ENCODER_PREFIX, NET_PREFIX, StreamRecordError, TrainedStream, read_stream, sub_state


def build_classifier(stream: TrainedStream, state_dict: Mapping[str, torch.Tensor],
                     source: str | os.PathLike = "<checkpoint>") -> SequenceClassifier:
    """The stream's sequence classifier with its trained weights, in eval mode (CPU, float32)."""
    net = SequenceClassifier(**stream.network)
    weights = sub_state(state_dict, NET_PREFIX)
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:  # missing/unexpected keys or shapes: the weights do not fit the record
        first = (str(err).strip().splitlines() or [""])[0]
        raise StreamRecordError(f"'{source}': the classifier's weights do not match its record ({first}); the "
                                "checkpoint is damaged or was edited") from None
    return net.eval()


def build_normalizer(stream: TrainedStream) -> FeatureNormalizer:
    """The feature normaliser the stream was trained with (statistics of its training features for "standard")."""
    normalizer = FeatureNormalizer(stream.normalizer["mode"])
    normalizer.load_state_dict(dict(stream.normalizer))
    return normalizer


def build_encoder(stream: TrainedStream, state_dict: Mapping[str, torch.Tensor] | None = None,
                  weights: str | None = None, source: str | os.PathLike = "<checkpoint>") -> FrameEncoder:
    """The backbone that turns the stream's input images into features, in eval mode.

    An end-to-end stream's backbone is built without pretrained weights (nothing is downloaded) and takes its
    fine-tuned weights from the checkpoint. A stream trained on a feature folder gets the backbone its features were
    made with, from the recorded weights source, or from `weights` ("imagenet", "none" or a local file) when given
    (the recorded file has moved, or timm's pretrained weights cannot be downloaded here).
    """
    features = stream.features
    if stream.encoder is not None:
        encoder = FrameEncoder(stream.encoder["backbone"], weights="none", in_chans=stream.encoder["in_chans"])
        encoder.load_state_dict(sub_state(state_dict or {}, ENCODER_PREFIX))
        return encoder.eval()
    if features is None or features.backbone is None or features.data_config is None:
        raise StreamRecordError(
            f"checkpoint '{source}' does not record the feature extraction settings it was trained on (backbone, "
            "weights, data_config, sampling, views), so new videos cannot be encoded the same way; retrain on a "
            "feature folder made by `eleatt extract` (its settings.json is recorded in the checkpoint)")
    try:
        return FrameEncoder(features.backbone, weights=weights if weights is not None else features.weights,
                            in_chans=features.in_chans).eval()
    except FileNotFoundError as err:
        hint = "" if weights is not None else (
            f" (the checkpoint records weights {features.weights!r}; pass `--weights PATH` to a local copy of the "
            "same weights, or `weights=` from Python)")
        raise type(err)(f"{err}{hint}") from None


@dataclass
class LoadedStream:
    """A trained stream's record with its classifier and normaliser, ready to score feature sequences.

    `prepare` turns stored features into what the classifier sees at test time (the recorded step sampling and
    normalisation); `probabilities` scores them with the views averaged, as `eleatt test` does.
    """

    record: TrainedStream
    net: SequenceClassifier
    normalizer: FeatureNormalizer
    state_dict: Mapping[str, torch.Tensor]
    source: str

    @property
    def class_names(self) -> list[str]:
        return list(self.record.class_names)

    @property
    def num_steps(self) -> int | None:
        return self.record.num_steps

    def to(self, device: torch.device | str) -> "LoadedStream":
        self.net.to(device)
        return self

    def prepare(self, features: np.ndarray) -> torch.Tensor:
        """Stored features float (T, D) or (V, T, D) -> the float32 (V, T', D) the classifier sees in `test`."""
        views = np.asarray(features)
        views = views[None] if views.ndim == 2 else views
        if views.ndim != 3:
            raise StreamRecordError(f"features must be (T, D) or (V, T, D), got shape {tuple(views.shape)}")
        if views.shape[-1] != self.record.input_size:
            raise StreamRecordError(
                f"the features have {views.shape[-1]} dimensions but '{self.source}' was trained on "
                f"{self.record.input_size}; pass features extracted the way its training features were")
        if views.shape[1] < 1:
            raise StreamRecordError("the features have no steps (T = 0)")
        return sample_sequence(views, self.num_steps, self.normalizer)

    @torch.inference_mode()
    def probabilities(self, seq: torch.Tensor) -> np.ndarray:
        """Class probabilities (C,) of one video's prepared sequence float32 (V, T, D), views averaged."""
        device = next(self.net.parameters()).device
        lengths = torch.tensor([seq.shape[1]], device=device)
        return self.net.video_probs(seq[None].to(device), lengths)[0].float().cpu().numpy()

    def encoder(self, weights: str | None = None) -> FrameEncoder:
        """The backbone of this stream (see `build_encoder`)."""
        return build_encoder(self.record, self.state_dict, weights, self.source)


def load_stream(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedStream:
    """A checkpoint of `eleatt fit` as a `LoadedStream` (weights-only loading; no Lightning imported)."""
    record, state_dict = read_stream(path)
    net = build_classifier(record, state_dict, path).to(device)
    return LoadedStream(record, net, build_normalizer(record), state_dict, str(path))
