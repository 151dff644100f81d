"""What a trained stream is: the one record that training writes into every checkpoint and that everything serving a
model (classify, stream, export, visualize) reads. No Lightning here.

A checkpoint of `eleatt fit` holds, besides Lightning's own keys, the record under `"eleatt_stream"`::

    {"format": 1,
     "network": {input_size, num_classes, cell, hidden_size, num_layers, attention_layers, dropout,
                 input_dropout, proj_size, pooling},          # SequenceClassifier's arguments
     "class_names": [...],                                    # label order (classes.txt)
     "features": {...} | None,                                # FeatureSettings.to_json(): how inputs become features
                                                              # (backbone, weights, data config, sampling, views,
                                                              # precision, stored dtype; flow options for flow)
     "num_steps": int | None,                                 # test-time steps per video (None: all)
     "normalizer": {"mode": "none"|"l2"|"standard", "mean": (D,) | None, "std": (D,) | None},
     "encoder": {"backbone": name, "in_chans": C} | None}     # end to end: the backbone is in the state dict

and the weights under `state_dict`: the sequence classifier's as `net.*`, an end-to-end backbone's as `encoder.*`.
Checkpoints written before the record (hyper-parameters, `data_state`, the data module's own key) read into the
same record (`TrainedStream.from_checkpoint`), so they keep loading.

A checkpoint is untrusted input: it is loaded weights-only (nothing but plain types and tensors is unpickled), every
value of the record is checked for type and range (`NETWORK_LIMITS`), and `read_stream` checks the weights against
the record before any network is built (a record claiming a network far larger than its weights would otherwise
allocate it) and refuses non-finite weights (which would give NaN probabilities): one line naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.data.features import FeatureSettings, SettingsFormatError
from pipeline.errors import InputNotFoundError, UsageError, load_failure

RECORD_KEY = "eleatt_stream"
RECORD_FORMAT = 1
NETWORK_KEYS = ("input_size", "num_classes", "cell", "hidden_size", "num_layers", "attention_layers", "dropout",
                "input_dropout", "proj_size", "pooling")
NORMALIZE_MODES = ("none", "l2", "standard")
# (least, most) of the record's integer network values; beyond them a record is damaged (sizes this large would
# not fit a machine, and a network is built from them).
NETWORK_LIMITS = {"input_size": (1, 1 << 16), "num_classes": (1, 1 << 20), "hidden_size": (1, 1 << 16),
                  "num_layers": (1, 64), "proj_size": (0, 1 << 16)}
CELL_NAMES = ("lstm", "gru", "rnn")
POOLING_NAMES = ("last", "mean")
MAX_CLASS_NAME = 1000  # characters
NET_PREFIX, ENCODER_PREFIX = "net.", "encoder."


class StreamRecordError(UsageError):
    """A checkpoint whose trained-stream record is missing, damaged or of an unknown format."""


@dataclass(frozen=True)
class TrainedStream:
    """A trained stream: its network's configuration, how its inputs become features, and what evaluation needs.

    Fields:
        network: the sequence classifier's arguments (`pipeline.nn.classifier.SequenceClassifier(**network)`).
        class_names: the label order, one name per class.
        features: how a video (or flow file, skeleton file) becomes the features the network reads; None for
            checkpoints trained on feature folders without settings (nothing to encode new videos with).
        num_steps: steps per video at test time (evenly spaced), None for all steps.
        normalizer: the feature normaliser's state: mode, and for "standard" the training mean and std (D,).
        encoder: for an end-to-end stream, the backbone inside the checkpoint ({"backbone", "in_chans"}); None when
            the backbone is the one `features` names (built from its recorded weights).
    """

    network: Mapping[str, Any]
    class_names: list[str]
    features: FeatureSettings | None = None
    num_steps: int | None = None
    normalizer: Mapping[str, Any] = field(default_factory=lambda: {"mode": "none", "mean": None, "std": None})
    encoder: Mapping[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.network["num_classes"])

    @property
    def input_size(self) -> int:
        return int(self.network["input_size"])

    @property
    def modality(self) -> str | None:
        return None if self.features is None else self.features.modality

    @property
    def end_to_end(self) -> bool:
        return self.encoder is not None

    # -- the checkpoint form ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The record as stored in a checkpoint: plain types and tensors (weights-only loadable)."""
        return {
            "format": RECORD_FORMAT,
            "network": {k: self.network[k] for k in NETWORK_KEYS},
            "class_names": list(self.class_names),
            "features": None if self.features is None else self.features.to_json(),
            "num_steps": self.num_steps,
            "normalizer": dict(self.normalizer),
            "encoder": None if self.encoder is None else dict(self.encoder),
        }

    @classmethod
    def from_dict(cls, value: Any, source: str | os.PathLike = "<checkpoint>") -> "TrainedStream":
        """Reads and validates a stored record; errors name `source`."""
        if not isinstance(value, Mapping):
            raise StreamRecordError(f"'{source}': the trained-stream record is a {type(value).__name__}, not a mapping")
        version = value.get("format")
        if version != RECORD_FORMAT:
            raise StreamRecordError(
                f"'{source}': trained-stream record format {version!r} is not one this version reads "
                f"({RECORD_FORMAT}); upgrade the package, or retrain with this version")
        missing = sorted({"network", "class_names", "features", "num_steps", "normalizer", "encoder"} - set(value))
        if missing:
            raise StreamRecordError(f"'{source}': the trained-stream record lacks {missing}; the checkpoint is damaged "
                                    "or was edited: use the best.ckpt / last.ckpt written by `eleatt fit`")
        features = value["features"]
        try:
            features = None if features is None else FeatureSettings.from_json(features, source)
        except SettingsFormatError as err:
            raise StreamRecordError(f"checkpoint {err}") from None
        return cls._checked(dict(value["network"] or {}), value["class_names"], features, value["num_steps"],
                            value["normalizer"], value["encoder"], source)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], source: str | os.PathLike = "<checkpoint>"
                        ) -> "TrainedStream":
        """The record of a checkpoint dict (`read_checkpoint`); checkpoints written before the record keep
        loading: their hyper-parameters and the data module's state (`data_state`, or Lightning's copy of the
        data module's state in yet older ones) give the same fields."""
        if RECORD_KEY in checkpoint:
            return cls.from_dict(checkpoint[RECORD_KEY], source)
        return cls._from_legacy(checkpoint, source)

    @classmethod
    def _from_legacy(cls, checkpoint: Mapping[str, Any], source) -> "TrainedStream":
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        if "input_size" not in hparams or "num_classes" not in hparams:
            raise StreamRecordError(
                f"'{source}' is not a checkpoint of an EleAtt classifier (no trained-stream record and no "
                "input_size/num_classes hyperparameters); pass a best.ckpt / last.ckpt written by `eleatt fit`")
        network = {k: hparams[k] for k in NETWORK_KEYS if k in hparams}
        state = checkpoint.get("data_state")
        if state is None:  # older still: the data module's hyper-parameters and state as Lightning stored them
            dm_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
            old = checkpoint.get("FeatureDataModule") or {}
            state = {"num_steps": dm_hparams.get("num_steps"),
                     "normalizer": old.get("normalizer") or {"mode": dm_hparams.get("normalize", "none")}}
        recorded = hparams.get("extraction_settings")
        try:
            features = FeatureSettings.from_json(recorded, source) if recorded else None
        except SettingsFormatError as err:
            raise StreamRecordError(f"checkpoint {err}") from None
        end_to_end = "backbone" in hparams and "freeze" in hparams
        encoder = {"backbone": hparams["backbone"], "in_chans": int(hparams.get("in_chans", 3))} if end_to_end else None
        if end_to_end:
            network["input_size"] = None  # set from the backbone below
        normalizer = dict(state.get("normalizer") or {"mode": "none"})
        return cls._checked(network, hparams.get("class_names"), features, state.get("num_steps") or None,
                            normalizer, encoder, source, checkpoint.get("state_dict"))

    @classmethod
    def _checked(cls, network: dict, class_names, features, num_steps, normalizer, encoder, source,
                 state_dict: Mapping[str, Any] | None = None) -> "TrainedStream":
        bad = f"'{source}': bad trained-stream record"
        if network.get("input_size") is None and state_dict is not None:  # legacy end to end: D from the weights
            weight = state_dict.get(f"{NET_PREFIX}rnn.weight_ih_l0")
            proj = state_dict.get(f"{NET_PREFIX}proj.weight")
            network["input_size"] = int((proj if proj is not None else weight).shape[1]) if weight is not None else None
        for key in ("input_size", "num_classes"):
            value = network.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StreamRecordError(f"{bad}: network {key} must be a positive integer, got {value!r}")
        _check_network(network, bad)
        num_classes = network["num_classes"]
        if class_names is None:
            class_names = [f"class_{i}" for i in range(num_classes)]
        if not isinstance(class_names, (list, tuple)) or not all(
                isinstance(c, str) and len(c) <= MAX_CLASS_NAME for c in class_names):
            raise StreamRecordError(f"{bad}: class_names must be a list of strings (of at most {MAX_CLASS_NAME} "
                                    "characters)")
        if len(class_names) != num_classes:
            raise StreamRecordError(f"{bad}: {len(class_names)} class names for {num_classes} classes")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise StreamRecordError(f"{bad}: num_steps must be a positive integer or null, got {num_steps!r}")
        if not isinstance(normalizer, Mapping) or normalizer.get("mode", "none") not in NORMALIZE_MODES:
            raise StreamRecordError(f"{bad}: normalizer mode must be one of {NORMALIZE_MODES}")
        normalizer = {"mode": normalizer.get("mode", "none"), "mean": normalizer.get("mean"), "std": normalizer.get("std")}
        if normalizer["mode"] == "standard":
            for key in ("mean", "std"):
                value = normalizer[key]
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != (network["input_size"],):
                    raise StreamRecordError(
                        f"{bad}: normalizer {key} must be a tensor of shape ({network['input_size']},) for "
                        f"'standard' normalisation (retrain: the statistics come from the training features)")
                if not bool(torch.isfinite(value).all()) or (key == "std" and not bool((value > 0).all())):
                    raise StreamRecordError(f"{bad}: normalizer {key} holds non-finite or non-positive values")
        if encoder is not None:
            if not isinstance(encoder, Mapping) or not isinstance(encoder.get("backbone"), str):
                raise StreamRecordError(f"{bad}: encoder must name its backbone")
            in_chans = encoder.get("in_chans", 3)
            if isinstance(in_chans, bool) or not isinstance(in_chans, int) or not 1 <= in_chans <= 1024:
                raise StreamRecordError(f"{bad}: encoder in_chans must be an integer in 1..1024, got {in_chans!r}")
            encoder = {"backbone": encoder["backbone"], "in_chans": in_chans}
        return cls(network, [str(c) for c in class_names], features, num_steps, normalizer, encoder)


def _check_network(network: Mapping[str, Any], bad: str) -> None:
    """The network values a record holds, each of its type and within range (absent ones take the classifier's
    defaults); StreamRecordError beginning with `bad` otherwise."""
    for key, (low, high) in NETWORK_LIMITS.items():
        value = network.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise StreamRecordError(f"{bad}: network {key} must be an integer in {low}..{high}, got {value!r}")
    layers = network.get("attention_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)
                               or not 0 <= layers <= network.get("num_layers", 1)):
        raise StreamRecordError(f"{bad}: network attention_layers must be null or an integer in 0..num_layers, got "
                                f"{layers!r}")
    for key in ("dropout", "input_dropout"):
        value = network.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise StreamRecordError(f"{bad}: network {key} must be a number in [0, 1), got {value!r}")
    for key, names in (("cell", CELL_NAMES), ("pooling", POOLING_NAMES)):
        if key in network and network[key] not in names:
            raise StreamRecordError(f"{bad}: network {key} must be one of {names}, got {str(network[key])[:40]!r}")


def check_weights(stream: TrainedStream, state_dict: Any, source: str | os.PathLike) -> None:
    """Before a network is built from `stream`: the state dict is a mapping of tensors, all finite, and the
    classifier's weights (`net.*`) are at least as many values as the record's network has in its recurrent
    matrices (num_layers x hidden^2), head (hidden x classes) and input weights (>= input_size): a record claiming a
    far larger network than its weights is refused instead of built. StreamRecordError naming `source`."""
    bad = f"'{source}': bad weights"
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise StreamRecordError(f"{bad}: the state_dict is not a mapping of names to tensors; the checkpoint is "
                                "damaged: use the best.ckpt / last.ckpt written by `eleatt fit`")
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StreamRecordError(f"{bad}: {name} holds NaN or infinite values (training diverged, or the file is "
                                    "damaged); use a checkpoint from before the divergence")
    net = stream.network
    hidden = net.get("hidden_size", 1)
    need = net.get("num_layers", 1) * hidden * hidden + hidden * net["num_classes"] + net["input_size"]
    have = sum(v.numel() for k, v in state_dict.items() if k.startswith(NET_PREFIX))
    if have < need:
        raise StreamRecordError(f"{bad}: the record describes a network of at least {need} weights but the "
                                f"checkpoint holds {have}; the checkpoint is damaged or was edited")


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A training checkpoint as a dict, loaded with weights-only semantics (nothing unpickled but plain types and
    tensors); a missing, truncated or foreign file raises InputNotFoundError / UsageError naming it. `mmap`:
    tensors are mapped, not read (for a look at a few keys of a checkpoint that Lightning loads again anyway)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"checkpoint '{path}' not found (runs keep best.ckpt and last.ckpt in checkpoints/<run>/)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # not a checkpoint, truncated, damaged: pickle, zip and torch errors alike
        raise UsageError(f"checkpoint '{path}' cannot be loaded ({load_failure(err)}); pass a "
                         "best.ckpt / last.ckpt written by `eleatt fit` (it may be truncated or damaged)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        what = type(checkpoint).__name__ if not isinstance(checkpoint, dict) else "dict without a state_dict"
        raise UsageError(f"'{path}' holds a {what}, not a training checkpoint; pass a best.ckpt / last.ckpt "
                         "written by `eleatt fit`")
    return checkpoint


def read_stream(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                ) -> tuple[TrainedStream, dict[str, torch.Tensor]]:
    """A checkpoint file's trained-stream record and its weights (the `state_dict`)."""
    checkpoint = read_checkpoint(path, map_location)
    stream = TrainedStream.from_checkpoint(checkpoint, path)
    check_weights(stream, checkpoint["state_dict"], path)
    return stream, checkpoint["state_dict"]


def sub_state(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state_dict` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
