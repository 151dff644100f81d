"""The LightningModule for feature sequences: cross-entropy, top-1/top-5/mean-class accuracy, per-video scores files.

Evaluation averages the class probabilities over a video's views before any metric; videos labelled -1 get scores
but count in no metric. `validate`, `test` and `predict` write DESIGN's `scores_<stage>.npz` into the trainer's
`default_root_dir` (the run folder when started from the CLI).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from pipeline.nn.classifier import SequenceClassifier
from pipeline.data.features import FeatureSettings
from pipeline.trained.record import RECORD_KEY, TrainedStream, read_checkpoint
from pipeline.evaluation.scores import write_scores
from pipeline.errors import UsageError

SCORE_STAGES = {"validate": "val", "test": "test", "predict": "predict"}  # trainer.fn -> scores_<name>.npz


class NonFiniteError(UsageError):
    """Training produced a NaN/inf loss or gradient, or a checkpoint would hold non-finite weights."""


class EleAttClassifier(pl.LightningModule):
    """An EleAtt sequence classifier (pipeline.nn.classifier.SequenceClassifier) trained with cross-entropy.

    Args:
        input_size: feature dimension D (linked from the data by the CLI).
        num_classes: number of classes C (linked from the data by the CLI).
        monitor: the validation metric that picks best.ckpt and drives the default learning-rate schedule:
            val/top1, val/top5 (top<k>, k = min(5, classes)), val/mca (maximised) or val/loss (minimised).
        class_names: label order (classes.txt; linked from the data), recorded in checkpoints.
        extraction_settings: the feature folder's settings.json (linked from the data), recorded in checkpoints
            so that the features of a new video can be made the same way.
        **network: the network's configuration, the arguments of `pipeline.nn.classifier.SequenceClassifier`
            (cell, hidden_size, num_layers, attention_layers, dropout, input_dropout, proj_size, pooling), defined
            and documented there once; the CLI offers each as `--model.<name>`.

    Every checkpoint holds the trained-stream record (`pipeline.trained.record`): what serving reads.

    Without an optimizer from the config, `configure_optimizers` uses the paper's recipe: Adam (lr 1e-3) and the
    learning rate divided by 10 when `monitor` stops improving for 5 epochs.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        monitor: str = "val/top1",
        class_names: list[str] | None = None,
        extraction_settings: dict | None = None,
        **network,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise UsageError(f"{len(class_names)} class names for num_classes={num_classes}; they must agree")
        self.topk = min(5, num_classes)
        metrics = ["val/top1", f"val/top{self.topk}", "val/mca", "val/loss"]
        if monitor not in metrics:
            raise UsageError(f"monitor={monitor!r} is not a logged validation metric; use one of {metrics}")
        self.save_hyperparameters()
        self.net = SequenceClassifier(input_size, num_classes, **network)
        # The network's whole configuration, defaults included (sizes stay as this module's own arguments give
        # them: Lightning parses the hyper-parameters of a --ckpt_path as arguments of the module).
        self.hparams.update({k: v for k, v in self.net.config.items() if k not in ("input_size", "num_classes")})
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.confusion = nn.ModuleDict({s: MulticlassConfusionMatrix(num_classes) for s in ("val", "test")})
        self.topk_acc = nn.ModuleDict(
            {s: MulticlassAccuracy(num_classes, top_k=self.topk, average="micro") for s in ("val", "test")}
        )
        # Mean negative log-likelihood of the view-averaged probabilities; a torchmetrics metric, so that DDP
        # reduces it over the ranks (and every rank takes the same branch below).
        self.eval_loss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self._collected: dict[str, list] = {}
        self._batch_videos: list[str] = []  # the videos of the current training batch, for error messages
        self.scores_paths: dict[str, Path] = {}  # stage -> the scores file written last

    @property
    def monitor_mode(self) -> str:
        return "min" if self.hparams.monitor.endswith("loss") else "max"

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, D), lengths (B,) -> logits (B, C)."""
        return self.net(feats, lengths)

    def video_probs(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, V, T, D) (or (B, T, D)), lengths (B,) -> class probabilities (B, C) averaged over the V views."""
        return self.net.video_probs(feats, lengths)

    # -- training ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["feats"], batch["lengths"])  # (B, C)
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        self._batch_videos = list(batch.get("videos", []))
        # Every rank takes the decision together (a rank raising alone would leave the others waiting forever).
        if self._any_rank(not bool(torch.isfinite(loss))):
            self._stop_non_finite(f"the training loss is {float(loss.detach())}")
        self.train_top1(logits, labels)
        size = len(labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # A finite loss can still give inf/NaN gradients (overflow); stepping would make every weight NaN.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            bad = not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
            if self._any_rank(bad):
                self._stop_non_finite("the gradients are not finite")

    def _any_rank(self, flag: bool) -> bool:
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _stop_non_finite(self, what: str) -> None:
        shown = ", ".join(self._batch_videos[:8]) + (" ..." if len(self._batch_videos) > 8 else "")
        where = f" in epoch {self.current_epoch}, step {self.global_step}" if self._trainer is not None else ""
        raise NonFiniteError(
            f"{what}{where} (batch videos: {shown or 'on another rank'}); training stopped, the checkpoints "
            "already written are kept. Check those videos' features (`eleatt fit` refuses NaN/inf features when it "
            "reads them), then lower the learning rate (--optimizer.init_args.lr) or clip gradients "
            "(--trainer.gradient_clip_val 1.0), and resume from last.ckpt"
        )

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=self.monitor_mode, factor=0.1, patience=5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.monitor, "strict": False},
        }

    # -- evaluation -------------------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str) -> torch.Tensor:
        probs = self.video_probs(batch["feats"], batch["lengths"])  # (B, C)
        labels = batch["labels"]
        indices = batch.get("indices")
        if indices is None:
            indices = torch.full((len(labels),), -1, dtype=torch.long)
        self._collected.setdefault(stage, []).append(
            (list(batch["videos"]), probs.detach().cpu(), labels.cpu(), indices.cpu()))
        known = labels >= 0
        if stage in self.confusion and known.any():
            p, y = probs[known], labels[known]
            self.confusion[stage].update(p, y)
            self.topk_acc[stage].update(p, y)
            nll = -torch.log(p.gather(1, y[:, None]).clamp_min(1e-12))[:, 0]  # (B',)
            self.eval_loss[stage].update(nll.float())
        return probs

    def _eval_epoch_end(self, stage: str) -> None:
        collected = self._collected.pop(stage, [])
        if stage in self.confusion:
            # compute() reduces over the ranks under DDP (a collective: every rank gets here); the confusion
            # matrix's total is the labelled count over all ranks, the same on each, so all take the same branch.
            cm = self.confusion[stage].compute().double()  # (C, C), rows = true class
            if cm.sum() > 0:
                support = cm.sum(1)
                # Values already reduced over the ranks: sync_dist only tells Lightning so (no warning under DDP).
                log = dict(sync_dist=True)
                self.log(f"{stage}/loss", self.eval_loss[stage].compute(), **log)
                self.log(f"{stage}/top1", cm.trace() / cm.sum(), prog_bar=True, **log)
                self.log(f"{stage}/top{self.topk}", self.topk_acc[stage].compute(), **log)
                self.log(f"{stage}/mca", (cm.diag()[support > 0] / support[support > 0]).mean(), **log)
            self.confusion[stage].reset()
            self.topk_acc[stage].reset()
            self.eval_loss[stage].reset()
        fn = str(self.trainer.state.fn.value) if self._trainer is not None else ""
        if SCORE_STAGES.get(fn) == stage:
            videos, scores, labels = self._gather_scores(collected)
            if not videos or not self.trainer.is_global_zero:
                return
            path = Path(self.trainer.default_root_dir) / f"scores_{stage}.npz"
            self.scores_paths[stage] = write_scores(path, videos, scores, labels, self.hparams.class_names)

    def _gather_scores(self, collected: list) -> tuple[list[str], np.ndarray, np.ndarray]:
        """This stage's per-video results from every rank, in list order, each video once.

        Under DDP each rank scores its share of the list (the distributed sampler pads the shares with repeated
        videos); results are gathered and ordered by their position in the list, repeats dropped.
        """
        videos = [v for batch_videos, *_ in collected for v in batch_videos]
        scores = torch.cat([p for _, p, _, _ in collected]).numpy() if collected else np.zeros((0, 0), np.float32)
        labels = torch.cat([y for _, _, y, _ in collected]).numpy() if collected else np.zeros(0, np.int64)
        order = torch.cat([i for *_, i in collected]).numpy() if collected else np.zeros(0, np.int64)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shards: list = [None] * world
            torch.distributed.all_gather_object(shards, (videos, scores, labels, order))
            shards = [s for s in shards if len(s[0])]
            if not shards:
                return [], scores, labels
            videos = [v for s in shards for v in s[0]]
            scores = np.concatenate([s[1] for s in shards])
            labels = np.concatenate([s[2] for s in shards])
            order = np.concatenate([s[3] for s in shards])
        if len(order) and (order >= 0).all():
            keep = np.unique(order, return_index=True)[1]  # first occurrence of each list position, sorted
            videos = [videos[i] for i in keep]
            scores, labels = scores[keep], labels[keep]
        return videos, scores, labels

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "predict")

    def on_predict_epoch_end(self) -> None:
        self._eval_epoch_end("predict")

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never replace a good best.ckpt/last.ckpt with weights that went NaN/inf.
        bad = [name for name, value in checkpoint["state_dict"].items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            self._stop_non_finite(f"the weights {bad[:3]} are not finite")
        # The generator state lets a resumed run draw the same shuffles, samples and dropout masks as an
        # uninterrupted one (a uint8 tensor: still weights-only loadable).
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[RECORD_KEY] = self.trained_stream().to_dict()

    def trained_stream(self) -> TrainedStream:
        """What this module is as a trained stream (`pipeline.trained.record`): the network's configuration, its
        classes and feature settings, and the evaluation state of the data it is trained on (test-time steps and
        the normaliser's statistics, from the data module when there is one)."""
        settings = self.hparams.extraction_settings
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        state = datamodule.eval_state() if hasattr(datamodule, "eval_state") else {}
        return TrainedStream(
            network=dict(self.net.config),
            class_names=list(self.hparams.class_names or [f"class_{i}" for i in range(self.net.config["num_classes"])]),
            features=FeatureSettings.from_json(settings, "the model's extraction_settings") if settings else None,
            num_steps=state.get("num_steps"),
            normalizer=state.get("normalizer") or {"mode": "none", "mean": None, "std": None},
            encoder=self._encoder_record(),
        )

    def _encoder_record(self) -> dict | None:
        """The backbone inside this module, for an end-to-end stream (None here: features come from outside)."""
        return None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get("hyper_parameters", {}).get("class_names")
        mine = self.hparams.class_names
        if stored is not None and mine is not None and list(stored) != list(mine):
            raise UsageError(
                f"the checkpoint was trained on classes {list(stored)[:10]}{'...' if len(stored) > 10 else ''} but "
                f"the data's classes.txt lists {list(mine)[:10]}{'...' if len(mine) > 10 else ''}; evaluate with the "
                "lists (and classes.txt) of the training data's label space"
            )
        hparams = checkpoint.get("hyper_parameters", {})
        for key, fix in (("input_size", "features extracted the way the training features were (backbone, modality)"),
                         ("num_classes", "lists (and classes.txt) of the training data's label space")):
            stored = hparams.get(key)
            if stored is not None and stored != self.hparams[key]:
                raise UsageError(
                    f"the checkpoint was trained with {key}={stored} but the data gives {key}={self.hparams[key]}; "
                    f"evaluate on {fix}"
                )
        # The data module evaluates with the statistics of the training data, which the record holds.
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "load_eval_state"):
            datamodule.load_eval_state(TrainedStream.from_checkpoint(checkpoint, "--ckpt_path"))
        if self._trainer is not None and str(self.trainer.state.fn.value) == "fit" and "rng_states" in checkpoint:
            torch.set_rng_state(checkpoint["rng_states"]["torch"])
            if "cuda" in checkpoint["rng_states"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["rng_states"]["cuda"])


def classifier_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "<checkpoint>") -> EleAttClassifier:
    """The EleAttClassifier a checkpoint dict (from `read_checkpoint`) holds, in eval mode (for training-side use;
    serving builds plain modules with `pipeline.trained.load`)."""
    stream = TrainedStream.from_checkpoint(checkpoint, path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    settings = None if stream.features is None else stream.features.to_json()
    model = EleAttClassifier(**stream.network, monitor=hparams.get("monitor", "val/top1"),
                             class_names=hparams.get("class_names"), extraction_settings=settings)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> EleAttClassifier:
    """An EleAttClassifier from a checkpoint file, loaded with weights-only semantics (no arbitrary unpickling), in
    eval mode; its `hparams` hold `class_names` and `extraction_settings`."""
    return classifier_from_checkpoint(read_checkpoint(path, map_location), path)
