"""`eleatt fit|validate|test|predict --config configs/<name>.yaml [overrides]`: the Lightning CLI for EleAtt
classifiers on feature folders.

Each run lives in `checkpoints/<run>/` (`<run>` = --run_name or `<config name>-<YYYYmmdd-HHMMSS>`, under
--trainer.default_root_dir when given): best.ckpt, last.ckpt, config.yaml, metrics.csv; `validate`/`test`/
`predict --ckpt_path P` write scores_<stage>.npz and confusion_<stage>.png into P's folder and print the metrics.
Checkpoints are loaded with weights-only semantics (no arbitrary unpickling).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger

from pipeline.data.datamodules import FeatureDataModule
from pipeline.lit import EleAttClassifier
from pipeline.scores import accuracy_summary, read_scores

DEFAULT_ROOT = "checkpoints"
CHECKPOINT_FILES = ("best.ckpt", "last.ckpt")

# Noise that says nothing to a user of this command: we override the model's default optimiser on purpose when a
# config names one, we pass `args` on purpose, and run folders are reused on purpose (resume, test).
QUIET = (
    r".*configure_optimizers` will be overridden.*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*Experiment logs directory .* exists and is not empty.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*callbacks used to create the checkpoint need to be provided.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"(?s).*(JsonargparseDeprecationWarning|was deprecated in v4\.).*",  # from Lightning's own jsonargparse calls
)


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


class _SaveFitConfig(SaveConfigCallback):
    """Saves config.yaml into the run folder when training only: an evaluation must not overwrite the training
    config of the run it evaluates."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def is_end_to_end(args: list[str] | None) -> bool:
    """True when the command line (or a --config it names) sets `data.video_root`: an end-to-end run on videos
    (VideoEleAttClassifier + VideoDataModule) rather than one on a feature folder."""
    args = list(sys.argv[1:] if args is None else args)
    configs = []
    for i, arg in enumerate(args):
        if arg == "--data.video_root" or arg.startswith("--data.video_root="):
            return True
        if arg == "--config" and i + 1 < len(args):
            configs.append(args[i + 1])
        elif arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
    for config in configs:
        try:
            import yaml

            data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
        except (OSError, ValueError, AttributeError):  # the parser reports a bad config itself
            continue
        if isinstance(data, dict) and ("video_root" in data or "video_root" in (data.get("init_args") or {})):
            return True
    return False


class EleAttCLI(LightningCLI):
    """LightningCLI with the project's run folders, links from the data module to the model, and reports.

    A run whose data sets `video_root` trains end to end (`pipeline.lit_video.VideoEleAttClassifier` on
    `pipeline.data.videodata.VideoDataModule`); every other run trains on a feature folder.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.run_dir: Path | None = None
        self.end_to_end = is_end_to_end(args)
        if self.end_to_end:
            from pipeline.data.videodata import VideoDataModule
            from pipeline.lit_video import VideoEleAttClassifier

            model_class, data_class = VideoEleAttClassifier, VideoDataModule
        else:
            model_class, data_class = EleAttClassifier, FeatureDataModule
        super().__init__(
            model_class,
            data_class,
            save_config_callback=_SaveFitConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "eleatt", "description": "Train and evaluate EleAtt-RNN classifiers on features."},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=Optional[str], default=None,
            help="run folder name under checkpoints/ (default: <config name>-<YYYYmmdd-HHMMSS>)",
        )
        # Sizes and names come from the data, never configured twice.
        if self.end_to_end:  # the backbone sets the frame size and normalisation; the data sets its input channels
            parser.link_arguments("model.backbone", "data.backbone", apply_on="parse")
            parser.link_arguments("data.in_chans", "model.in_chans", apply_on="instantiate")
        else:
            parser.link_arguments("data.feature_dim", "model.input_size", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.extraction_settings", "model.extraction_settings", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Refuses a --ckpt_path that is not a Lightning checkpoint before Lightning reads it: a text file, a bare
        state dict or a pickle of arbitrary objects would otherwise end in a KeyError/UnpicklingError traceback."""
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt and Path(ckpt).is_file():
            try:
                loaded = torch.load(ckpt, weights_only=True, map_location="cpu", mmap=True)
            except Exception as err:  # pickle/zip errors name no file
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(
                    f"cannot read checkpoint '{ckpt}' with weights-only loading ({reason}); pass a best.ckpt or "
                    "last.ckpt written by `eleatt fit`"
                ) from err
            if not (isinstance(loaded, dict) and "state_dict" in loaded and "pytorch-lightning_version" in loaded):
                raise ValueError(
                    f"'{ckpt}' is not a Lightning checkpoint (no state_dict/pytorch-lightning_version); pass a "
                    "best.ckpt or last.ckpt written by `eleatt fit`"
                )
        super()._parse_ckpt_path()

    # -- run folder --------------------------------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt is not None and not Path(ckpt).is_file():
            raise FileNotFoundError(
                f"checkpoint '{ckpt}' not found (--ckpt_path takes a file such as checkpoints/<run>/best.ckpt)"
            )
        if cfg.get("weights_only") is None:
            cfg["weights_only"] = True  # never unpickle arbitrary objects from a checkpoint
        run_name = cfg.get("run_name")
        root = Path(cfg.trainer.get("default_root_dir") or DEFAULT_ROOT)
        if ckpt is not None and not (self.subcommand == "fit" and run_name):
            self.run_dir = Path(ckpt).resolve().parent  # evaluations and resumed fits write beside the checkpoint
        elif run_name:
            self.run_dir = root / run_name
        else:
            configs = cfg.get("config") or []
            stem = Path(str(configs[-1])).stem if configs else "eleatt"
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            self.run_dir = root / f"{stem}-{stamp}"
            k = 2
            while self.run_dir.exists():  # two runs started within the same second
                self.run_dir, k = root / f"{stem}-{stamp}-{k}", k + 1
        if self.subcommand == "fit" and ckpt is None and not cfg.trainer.get("fast_dev_run"):
            taken = [name for name in CHECKPOINT_FILES if (self.run_dir / name).exists()]
            if taken:
                raise ValueError(
                    f"run folder '{self.run_dir}' already holds {', '.join(taken)}; choose another --run_name, or "
                    f"resume that run with --ckpt_path {self.run_dir / 'last.ckpt'}"
                )
        scheduler = cfg.get("lr_scheduler")
        if self.subcommand == "fit" and not cfg.data.get("val_list") and scheduler is not None:
            monitor = (scheduler.get("init_args") or {}).get("monitor", "")
            if str(monitor).startswith("val/"):
                raise ValueError(
                    f"the lr_scheduler watches {monitor!r} but there is no validation list: pass --data.val_list, "
                    "or train without validation with a config that has no lr_scheduler section"
                )
        cfg.trainer["default_root_dir"] = str(self.run_dir)

    def instantiate_trainer(self, **kwargs):
        if self.run_dir is None:  # built with run=False: a plain LightningCLI trainer
            return super().instantiate_trainer(**kwargs)
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        kwargs["default_root_dir"] = str(self.run_dir)
        fitting = self.subcommand == "fit"
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self._loggers() if fitting else False
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        dry_run = bool(trainer_cfg.get("fast_dev_run"))
        if fitting and not dry_run and trainer_cfg.get("enable_checkpointing") is not False:
            validated = "val_list" in self.datamodule.list_paths
            callbacks.append(ModelCheckpoint(
                dirpath=self.run_dir,
                filename="best",
                monitor=self.model.hparams.monitor if validated else None,  # no validation: best = latest
                mode=self.model.monitor_mode,
                save_top_k=1,
                save_last=True,
                auto_insert_metric_name=False,
            ))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _loggers(self) -> list:
        loggers = [CSVLogger(self.run_dir, name="", version="")]  # run_dir/metrics.csv, hparams.yaml
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(self.run_dir, name="", version="tensorboard"))
        return loggers

    # -- reports -----------------------------------------------------------------------------------------------------
    def after_fit(self) -> None:
        if self.trainer.fast_dev_run:
            return
        callback = self.trainer.checkpoint_callback
        lines = [f"run folder: {self.run_dir}"]
        if callback is not None and callback.best_model_path:
            score = callback.best_model_score
            metric = f" ({callback.monitor} = {float(score):.4f})" if callback.monitor and score is not None else ""
            lines.append(f"best checkpoint: {callback.best_model_path}{metric}")
            lines.append(f"last checkpoint: {callback.last_model_path or self.run_dir / 'last.ckpt'}")
        print("\n".join(lines))

    def _report(self, stage: str) -> None:
        """Prints top-1, top-k and mean class accuracy with the paths, and plots the confusion matrix."""
        path = self.model.scores_paths.get(stage)
        if path is None:  # fast_dev_run or no videos
            return
        scores = read_scores(path)
        lines = [f"{stage}: {len(scores['videos'])} videos, scores: {path}"]
        summary = accuracy_summary(scores["scores"], scores["labels"])
        if summary is None:
            lines.append(f"{stage}: no labelled videos, so no metrics")
        else:
            # From the file, not the logged metrics: under DDP the distributed sampler pads the shares with
            # repeated videos, which the logged metrics count twice and the scores file holds once.
            labelled = int((scores["labels"] >= 0).sum())
            lines.append(f"{stage}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items()) + f"  ({labelled} labelled)")
            from pipeline.viz import confusion_matrix, plot_confusion

            classes = [str(c) for c in scores["classes"]] if "classes" in scores else None
            png = plot_confusion(
                confusion_matrix(scores["scores"], scores["labels"]), path.with_name(f"confusion_{stage}.png"),
                classes, title=f"{stage}: top-1 {summary['top1']:.3f} ({labelled} videos)",
            )
            lines.append(f"{stage}: confusion matrix: {png}")
        print("\n".join(lines))

    def after_validate(self) -> None:
        self._report("val")

    def after_test(self) -> None:
        self._report("test")

    def after_predict(self) -> None:
        self._report("predict")


@contextlib.contextmanager
def quiet_lightning():
    """Silences the Lightning warnings and tips in QUIET for the duration (warning filters are restored after)."""
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    no_tips = _NoTips()
    lightning_log.addFilter(no_tips)
    try:
        with warnings.catch_warnings():
            for pattern in QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        lightning_log.removeFilter(no_tips)


def main(argv: list[str] | None = None) -> int:
    """`eleatt fit|validate|test|predict ...`; argv[0] is the subcommand. Returns 0, or 2 for a usage error or a
    refused run (the reason and the fix printed in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        with quiet_lightning():
            EleAttCLI(args=argv)
    except SystemExit as exit_:  # --help, --print_config, parser errors
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except (ValueError, FileNotFoundError) as err:
        print(f"eleatt {command}: error: {err}", file=sys.stderr)
        return 2
    return 0
