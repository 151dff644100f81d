"""End-to-end training: a timm backbone in front of the EleAtt stack, trained on clips from videos or flow files.

`VideoEleAttClassifier` is `EleAttClassifier` (same loss, metrics, scores files, checkpoints) with a `FrameEncoder`
inside: a batch's `feats` are frames, (B, T, C, H, W) in training and (B, V, T, C, H, W) in evaluation
(`pipeline.training.clip_data`), encoded frame by frame into (B, [V,] T, D) features for the stack. The backbone is

- fine-tuned (`freeze: none`) with its own learning rate (`backbone_lr`; the stack and head use `lr`: two parameter
  groups of one optimizer),
- partially frozen (`freeze: k`: the stem and the first k stages, mmaction2's `frozen_stages`; 0 = the stem only),
- or frozen (`freeze: all`).

Frozen layers keep their BatchNorm in eval mode (running statistics untouched, whatever `train()` says);
`partial_bn` (TSN) also freezes every BatchNorm after the first. Mixed precision is the trainer's `precision`
(e.g. `bf16-mixed`, `16-mixed`), gradient accumulation its `accumulate_grad_batches`; `activation_checkpointing`
recomputes the backbone's stage activations in the backward pass (timm's grad checkpointing) to fit long clips.
"""
from __future__ import annotations

import inspect
import os
from typing import Literal

import torch
from torch import nn

from pipeline.data.features import FeatureSettings
from pipeline.trained.record import TrainedStream, read_checkpoint
from pipeline.training.module import EleAttClassifier
from pipeline.nn.backbone import FrameEncoder
from pipeline.errors import UsageError

Freeze = Literal["none", "all"] | int


def _backbone_groups(model: nn.Module) -> dict[int, list[str]]:
    """timm's coarse parameter groups of a backbone: 0 = the stem, 1.. = the stages in order (names of parameters)."""
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    return {int(k): v for k, v in groups.items() if isinstance(k, (int, float))}


class VideoEleAttClassifier(EleAttClassifier):
    """An EleAtt classifier with its backbone inside, trained end to end on clips.

    Args:
        num_classes: C (linked from the data).
        backbone: a timm model name (e.g. resnet50, resnet18, test_resnet).
        weights: imagenet (timm's pretrained weights), none (random init) or a local weights file.
        in_chans: input channels: 3 for RGB, 2L for flow stacks (linked from the data).
        freeze: none (fine-tune all), all (frozen backbone) or k (freeze the stem and the first k stages).
        partial_bn: TSN's partial BatchNorm: every BatchNorm layer after the first keeps its statistics and affine
            parameters fixed while training.
        lr: learning rate of the recurrent stack and head.
        backbone_lr: learning rate of the trainable backbone parameters.
        weight_decay: decoupled weight decay of both groups (AdamW) or L2 (SGD).
        optimizer: adamw or sgd (momentum 0.9, TSN's recipe).
        lr_patience: epochs without improvement of `monitor` before both learning rates are divided by 10 (0: no
            schedule).
        activation_checkpointing: recompute backbone activations in the backward pass (less memory, ~30% slower).
        monitor: the validation metric that picks best.ckpt and drives the learning-rate schedule (as
            EleAttClassifier).
        class_names: label order (classes.txt; linked from the data), recorded in checkpoints.
        extraction_settings: how frames become the backbone's input (linked from the data), recorded in
            checkpoints.
        **network: the recurrent network's configuration: `pipeline.nn.classifier.SequenceClassifier`'s arguments
            (cell, hidden_size, num_layers, attention_layers, dropout, input_dropout, proj_size, pooling).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        weights: str = "imagenet",
        in_chans: int = 3,
        freeze: Freeze = "none",
        partial_bn: bool = False,
        lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        weight_decay: float = 0.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr_patience: int = 5,
        activation_checkpointing: bool = False,
        monitor: str = "val/top1",
        class_names: list[str] | None = None,
        extraction_settings: dict | None = None,
        **network,
    ) -> None:
        if not (freeze in ("none", "all") or (isinstance(freeze, int) and not isinstance(freeze, bool) and freeze >= 0)):
            raise UsageError(f"freeze={freeze!r}: use none, all, or k >= 0 (the stem and the first k stages)")
        encoder = FrameEncoder(backbone, weights=weights, in_chans=in_chans)
        # The stream's settings (from the data module): the backbone that made the features, and their size.
        base = FeatureSettings.from_json(extraction_settings) if extraction_settings else FeatureSettings(
            backbone=backbone, data_config=encoder.data_config, in_chans=in_chans, dtype="float32",
            options={"end_to_end": True})
        settings = base.replace(backbone=backbone, weights=encoder.weights, dim=encoder.num_features,
                                in_chans=in_chans).to_json()
        super().__init__(input_size=encoder.num_features, num_classes=num_classes, monitor=monitor,
                         class_names=class_names, extraction_settings=settings, **network)
        self.hparams["extraction_settings"] = settings
        self.encoder = encoder
        self._skipped: dict[str, int] = {}  # unreadable videos met this epoch, per stage
        groups = _backbone_groups(encoder.model)
        if isinstance(freeze, int) and freeze >= len(groups):
            raise UsageError(f"freeze={freeze}: {backbone} has a stem and {len(groups) - 1} stages; use at most "
                             f"{len(groups) - 2}, or freeze=all")
        if freeze == "all":
            frozen_names = {n for n, _ in encoder.model.named_parameters()}
        elif freeze == "none":
            frozen_names = set()
        else:
            frozen_names = {n for g in range(freeze + 1) for n in groups.get(g, [])}
        for name, p in encoder.model.named_parameters():
            p.requires_grad_(name not in frozen_names)
        # Modules whose parameters are all frozen stay in eval mode (their BatchNorm statistics stay put).
        self._frozen_modules = [m for m in encoder.model.modules()
                                if any(True for _ in m.parameters(recurse=False))
                                and all(not p.requires_grad for p in m.parameters(recurse=False))]
        bns = [m for m in encoder.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._partial_bn = bns[1:] if partial_bn else []
        for m in self._partial_bn:
            for p in m.parameters():
                p.requires_grad_(False)
        if activation_checkpointing:
            encoder.model.set_grad_checkpointing(True)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for m in (*getattr(self, "_frozen_modules", ()), *getattr(self, "_partial_bn", ())):
                m.eval()
        return self

    def _encoder_record(self) -> dict:
        """The backbone inside this module: its weights are in the checkpoint (`encoder.*`)."""
        return {"backbone": self.hparams.backbone, "in_chans": int(self.hparams.in_chans)}

    # -- the network --------------------------------------------------------------------------------------------
    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """clips (..., T, C, H, W) -> features (..., T, D), frame by frame through the backbone."""
        lead = clips.shape[:-3]
        feats = self.encoder(clips.reshape(-1, *clips.shape[-3:]))  # (N, D)
        return feats.view(*lead, -1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """clips (B, T, C, H, W) (or features (B, T, D)), lengths (B,) -> logits (B, C)."""
        if x.dim() == 5:
            x = self.encode(x)  # (B, T, D)
        return self.net(x, lengths)

    def video_probs(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """clips (B, V, T, C, H, W) or (B, T, C, H, W) -> probabilities (B, C) averaged over the V views."""
        if x.dim() >= 5:
            x = self.encode(x)  # (B, [V,] T, D)
        return super().video_probs(x, lengths)

    # -- steps: count unreadable videos, skip empty batches -------------------------------------------------------
    def _note_skipped(self, batch: dict, stage: str) -> None:
        skipped = batch.get("skipped") or []
        self._skipped[stage] = self._skipped.get(stage, 0) + len(skipped)

    def on_fit_start(self) -> None:
        self._skipped = {}
        # Record the backbone's arithmetic, so that classify encodes new videos as training and test did.
        precision = str(self.trainer.precision)
        settings = dict(self.hparams.extraction_settings)
        settings["precision"] = "bf16" if precision.startswith("bf16") else "16" if precision.startswith("16") else "32"
        self.hparams["extraction_settings"] = settings

    def _report_skipped(self, stage: str) -> None:
        count = self._skipped.pop(stage, 0)
        if self._trainer is not None and self.trainer.world_size > 1:
            count = int(self.trainer.strategy.reduce(torch.tensor(float(count), device=self.device), reduce_op="sum"))
        if count:
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(f"{stage}: {count} unreadable videos skipped this epoch (each logged with its path and "
                           "reason by pipeline.training.clip_data)")
        if self._trainer is not None and stage in ("train", "val"):
            self.log(f"{stage}/skipped_videos", float(count), rank_zero_only=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._note_skipped(batch, "train")
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        self._report_skipped("train")

    def _eval_step(self, batch: dict, stage: str):
        self._note_skipped(batch, stage)
        if not len(batch["videos"]):  # every video of the batch was unreadable
            return None
        return super()._eval_step(batch, stage)

    def _eval_epoch_end(self, stage: str) -> None:
        self._report_skipped(stage)
        super()._eval_epoch_end(stage)

    # -- optimisation: two parameter groups ---------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        backbone = [p for p in self.encoder.parameters() if p.requires_grad]
        head = [p for n, p in self.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
        groups = [{"params": head, "lr": hp.lr, "name": "stack"}]
        if backbone:
            groups.append({"params": backbone, "lr": hp.backbone_lr, "name": "backbone"})
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if not hp.lr_patience:
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=self.monitor_mode, factor=0.1,
                                                               patience=hp.lr_patience)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": hp.monitor, "strict": False}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        hparams = checkpoint.get("hyper_parameters", {})
        for key in ("backbone", "in_chans"):
            stored = hparams.get(key)
            if stored is not None and stored != self.hparams[key]:
                raise UsageError(f"the checkpoint was trained with {key}={stored!r} but this run builds "
                                 f"{key}={self.hparams[key]!r}; pass --model.{key} {stored}")
        super().on_load_checkpoint(checkpoint)


def video_classifier_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "<checkpoint>") -> VideoEleAttClassifier:
    """The VideoEleAttClassifier a checkpoint dict holds, in eval mode, for training-side use (serving builds plain
    modules with `pipeline.trained.load`); its backbone weights come from the checkpoint (the network is built with
    random weights first: nothing is downloaded)."""
    stream = TrainedStream.from_checkpoint(checkpoint, path)
    if stream.encoder is None:
        raise UsageError(f"'{path}' is not an end-to-end checkpoint (no backbone in its record)")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    accepted = set(inspect.signature(VideoEleAttClassifier).parameters) - {"network"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    network = {k: v for k, v in stream.network.items() if k not in ("input_size", "num_classes")}
    model = VideoEleAttClassifier(**{**kwargs, "weights": "none"}, **network)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def load_video_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VideoEleAttClassifier:
    """A VideoEleAttClassifier from a checkpoint file (weights-only loading), in eval mode."""
    return video_classifier_from_checkpoint(read_checkpoint(path, map_location), path)
