"""`eleatt fit|validate|test|predict --config configs/<name>.yaml [overrides]`: the Lightning CLI for EleAtt
classifiers on feature folders.

Each run lives in `checkpoints/<run>/` (`<run>` = --run_name or `<config name>-<YYYYmmdd-HHMMSS>`, under
--trainer.default_root_dir when given): best.ckpt, last.ckpt, config.yaml, metrics.csv; `validate`/`test`/
`predict --ckpt_path P` write scores_<stage>.npz and confusion_<stage>.png into P's folder and print the metrics.
Checkpoints are loaded with weights-only semantics (no arbitrary unpickling).

A run folder stays whole across a resume: last.ckpt is rewritten at the end of every epoch (whatever the monitored
metric did), `fit --ckpt_path <run>/last.ckpt` (or `--ckpt_path last` with the run's config.yaml or --run_name)
continues in the same folder, and metrics.csv keeps the rows of the epochs before the resume. The config.yaml saved
in a run folder starts a fresh run beside it when given to `fit` again, and is what `validate`/`test`/`predict
--ckpt_path <run>/best.ckpt` read when given no --config (the run's own data paths and settings). `--config NAME`
finds a packaged config by name (`eleatt configs` lists them). The run folder itself (which folder, its checkpoint
callbacks and metrics logger) is `pipeline.training.run_folder`; this module is the CLI and its reports.

Written to a file or a pipe, a run prints one line per epoch naming the run (`pipeline.training.progress`) instead
of Lightning's progress bars, and evaluations print their own lines without Lightning's metric tables.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Optional

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from pipeline.arguments import LIST_HINT, resolve_config
from pipeline.training.feature_data import FeatureDataModule
from pipeline.errors import (
    EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, InputNotFoundError, InterruptWatch, is_user_error, usage_error,
    UsageError, watch_interrupts,
)
from pipeline.trained.record import read_checkpoint
from pipeline.training.module import EleAttClassifier
from pipeline.training.progress import EpochLines, on_terminal
from pipeline.training.run_folder import (
    DEFAULT_ROOT, RUN_DIR_ENV, BestCheckpoint, LastCheckpoint, RunMetricsLogger, checkpoint_epoch, choose_run_dir,
    named_checkpoint, refuse_taken, run_checkpoints,
)
from pipeline.paths import ensure_writable_dir
from pipeline.evaluation.scores import accuracy_summary, read_scores

EVALUATIONS = ("validate", "test", "predict")

# Noise that says nothing to a user of this command: we override the model's default optimiser on purpose when a
# config names one, we pass `args` on purpose, and run folders are reused on purpose (resume, test).
QUIET = (
    r".*configure_optimizers` will be overridden.*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*This DataLoader will create \d+ worker processes in total.*",  # torch's, at every stage of a run: more workers
    # than cores still work (a config's num_workers is the user's choice)
    r".*callbacks used to create the checkpoint need to be provided.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"(?s).*(JsonargparseDeprecationWarning|was deprecated in v4\.).*",  # from Lightning's own jsonargparse calls
)


LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


class _SaveFitConfig(SaveConfigCallback):
    """Saves config.yaml into the run folder when training only: an evaluation must not overwrite the training
    config of the run it evaluates. The saved config describes the training, not this invocation: without
    ckpt_path and run_name, so that `fit --config <run>/config.yaml` starts a fresh run beside it."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.config = self.config.clone()
            self.config["ckpt_path"] = None
            self.config["run_name"] = None
            super().setup(trainer, pl_module, stage)


def _option_value(args: list[str], flag: str) -> str | None:
    """The last value given to `flag` (`--flag V` or `--flag=V`) in `args`, or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _config_file(value: str) -> str:
    """A --config value as a file: as given when it exists, else the packaged config of that name; a name that is
    neither is refused here, naming where the packaged configs are listed (YAML text given inline passes)."""
    resolved = resolve_config(value)
    if resolved == value and not Path(value).exists() and not any(c in value for c in ":{}\n"):
        raise InputNotFoundError(f"--config {value}: no such file, and no packaged config of that name "
                                 f"({LIST_HINT}; give a file path or one of their names)")
    return str(resolved)


def resolve_arguments(args: list[str] | None) -> list[str]:
    """The command line with each --config resolved to a file (`--config ucf101_rgb` finds the packaged config),
    and an evaluation (`validate|test|predict --ckpt_path <run>/best.ckpt`) given no --config reading the run's own
    `config.yaml` (the data paths and settings it was trained with)."""
    args = list(sys.argv[1:] if args is None else args)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += [arg, _config_file(args[i + 1])]
            i += 2
            continue
        out.append("--config=" + _config_file(arg.split("=", 1)[1]) if arg.startswith("--config=") else arg)
        i += 1
    if out and out[0] in EVALUATIONS and _option_value(out, "--config") is None:
        ckpt = _option_value(out, "--ckpt_path")
        saved = Path(ckpt).parent / "config.yaml" if ckpt else None
        if saved is not None and Path(ckpt).is_file() and saved.is_file():
            out[1:1] = ["--config", str(saved)]
    return out


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


class _InterruptNote(Callback):
    """Remembers a Ctrl-C (Lightning catches it, tears down, and exits with status 1) and what the run kept."""

    def __init__(self, cli: "EleAttCLI") -> None:
        self.cli = cli

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.cli.interrupted = True


class EleAttCLI(LightningCLI):
    """LightningCLI with the project's run folders, links from the data module to the model, and reports.

    A run whose data sets `video_root` trains end to end (`pipeline.training.end_to_end.VideoEleAttClassifier` on
    `pipeline.training.clip_data.VideoDataModule`); every other run trains on a feature folder.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.run_dir: Path | None = None
        self.ckpt_epoch: int | None = None  # the epoch --ckpt_path ends (read before Lightning loads it)
        self.interrupted = False
        _last_cli[0] = self
        args = resolve_arguments(args)
        self.end_to_end = is_end_to_end(args)
        if self.end_to_end:
            from pipeline.training.clip_data import VideoDataModule
            from pipeline.training.end_to_end import VideoEleAttClassifier

            model_class, data_class = VideoEleAttClassifier, VideoDataModule
        else:
            model_class, data_class = EleAttClassifier, FeatureDataModule
        super().__init__(
            model_class,
            data_class,
            save_config_callback=_SaveFitConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "eleatt", "description": "Train and evaluate EleAtt-RNN classifiers on features."},
            parser_class=_OneLineErrorParser,
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

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parses as LightningCLI does, then resolves `--ckpt_path last|best` to the run's file, refuses an
        evaluation without a checkpoint, and refuses a --ckpt_path that is not a Lightning checkpoint before
        Lightning reads it (a text file, a bare state dict or a truncated file would otherwise end in a
        KeyError/UnpicklingError traceback)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt in ("last", "best", "hpc", "registry"):
            root = Path(cfg.trainer.get("default_root_dir") or DEFAULT_ROOT)
            cfg["ckpt_path"] = ckpt = str(named_checkpoint(ckpt, cfg.get("run_name"), root, cfg.get("config")))
        if ckpt is None and subcommand in EVALUATIONS:
            raise UsageError(
                f"`{subcommand}` needs --ckpt_path: the checkpoint to score (e.g. checkpoints/<run>/best.ckpt); "
                "without one it would score an untrained, randomly initialised model"
            )
        if ckpt and Path(ckpt).is_file():
            self.ckpt_epoch = checkpoint_epoch(ckpt)  # a resume drops the metrics rows logged after it

    # -- run folder --------------------------------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt is not None and not Path(ckpt).is_file():
            raise InputNotFoundError(
                f"checkpoint '{ckpt}' not found (--ckpt_path takes a file such as checkpoints/<run>/best.ckpt)"
            )
        if cfg.get("weights_only") is None:
            cfg["weights_only"] = True  # never unpickle arbitrary objects from a checkpoint
        root = Path(cfg.trainer.get("default_root_dir") or DEFAULT_ROOT)
        self.run_dir = choose_run_dir(self.subcommand, ckpt, cfg.get("run_name"), root, cfg.get("config"))
        if self.subcommand == "fit" and ckpt is None and not cfg.trainer.get("fast_dev_run"):
            refuse_taken(self.run_dir)
        scheduler = cfg.get("lr_scheduler")
        if self.subcommand == "fit" and not cfg.data.get("val_list") and scheduler is not None:
            monitor = (scheduler.get("init_args") or {}).get("monitor", "")
            if str(monitor).startswith("val/"):
                raise UsageError(
                    f"the lr_scheduler watches {monitor!r} but there is no validation list: pass --data.val_list, "
                    "or train without validation with a config that has no lr_scheduler section"
                )
        os.environ[RUN_DIR_ENV] = str(self.run_dir)  # for the DDP processes Lightning starts from this one
        what = "run folder" if self.subcommand == "fit" else "folder of --ckpt_path (scores and plots go there)"
        ensure_writable_dir(self.run_dir, what)
        # The root, not the run folder, goes into the config saved with the run (instantiate_trainer passes the
        # run folder to the trainer), so that the saved config.yaml starts new runs beside this one.
        cfg.trainer["default_root_dir"] = str(root)

    def instantiate_trainer(self, **kwargs):
        if self.run_dir is None:  # built with run=False: a plain LightningCLI trainer
            return super().instantiate_trainer(**kwargs)
        trainer_cfg = self.config_init[self.subcommand].get("trainer") or {}
        kwargs["default_root_dir"] = str(self.run_dir)
        fitting = self.subcommand == "fit"
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self._loggers() if fitting else False
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        dry_run = bool(trainer_cfg.get("fast_dev_run"))
        if fitting and not dry_run and trainer_cfg.get("enable_checkpointing") is not False:
            validated = "val_list" in self.datamodule.list_paths
            monitor = self.model.hparams.monitor if validated else None  # no validation: best = latest
            callbacks += run_checkpoints(self.run_dir, monitor, self.model.monitor_mode)
        callbacks.append(_InterruptNote(self))
        # Progress bars on a terminal only; written to a file or a pipe, one line per epoch naming the run.
        bar = trainer_cfg.get("enable_progress_bar")
        if bar is None and not on_terminal():
            bar = kwargs["enable_progress_bar"] = False
        if fitting and bar is False and not dry_run:
            callbacks.append(EpochLines(self.run_dir.name))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("validate", "test") and not on_terminal():
            kwargs["verbose"] = False  # Lightning's metric table; `_report` prints the metrics, naming the run
        return kwargs

    def _loggers(self) -> list:
        resumed = self.config[self.subcommand].get("ckpt_path") is not None
        # run_dir/metrics.csv (the rows up to the resumed epoch kept) and hparams.yaml
        loggers = [RunMetricsLogger(self.run_dir, resume_epoch=self.ckpt_epoch if resumed else None)]
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(self.run_dir, name="", version="tensorboard"))
        return loggers

    # -- reports -----------------------------------------------------------------------------------------------------
    def after_fit(self) -> None:
        if self.trainer.fast_dev_run or not self.trainer.is_global_zero or self.trainer.interrupted:
            return
        best = next((c for c in self.trainer.checkpoint_callbacks if isinstance(c, BestCheckpoint)), None)
        last = next((c for c in self.trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)), None)
        lines = [f"run folder: {self.run_dir}"]
        if best is not None and best.best_model_path:
            score = best.best_model_score
            metric = f" ({best.monitor} = {float(score):.4f})" if best.monitor and score is not None else ""
            lines.append(f"best checkpoint: {best.best_model_path}{metric}")
        if last is not None and last.best_model_path:
            lines.append(f"last checkpoint: {last.best_model_path}")
        print("\n".join(lines))

    def _report(self, stage: str) -> None:
        """Prints top-1, top-k and mean class accuracy with the paths, and plots the confusion matrix."""
        path = self.model.scores_paths.get(stage)
        if path is None or not self.trainer.is_global_zero:  # fast_dev_run, no videos, or not rank 0
            return
        scores = read_scores(path)
        run = self.run_dir.name if self.run_dir is not None else path.parent.name
        settings = getattr(self.datamodule, "settings", None)
        kind = f" ({settings.modality} features)" if getattr(settings, "modality", None) else ""
        lines = [f"{stage}: run '{run}'{kind}, {len(scores['videos'])} videos, scores: {path}"]
        summary = accuracy_summary(scores["scores"], scores["labels"])
        if summary is None:
            lines.append(f"{stage}: no labelled videos, so no metrics")
        else:
            # From the file, not the logged metrics: under DDP the distributed sampler pads the shares with
            # repeated videos, which the logged metrics count twice and the scores file holds once.
            labelled = int((scores["labels"] >= 0).sum())
            lines.append(f"{stage}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items())
                         + f"  ({labelled} labelled), run '{run}'")
            from pipeline.evaluation.plots import confusion_matrix, plot_confusion

            classes = [str(c) for c in scores["classes"]] if "classes" in scores else None
            png = plot_confusion(
                confusion_matrix(scores["scores"], scores["labels"]), path.with_name(f"confusion_{stage}.png"),
                classes, title=f"{stage}: top-1 {summary['top1']:.3f} ({labelled} videos)",
            )
            lines[0] += f", confusion matrix: {png}"
        print("\n".join(lines))

    def after_validate(self) -> None:
        self._report("val")

    def after_test(self) -> None:
        self._report("test")

    def after_predict(self) -> None:
        self._report("predict")


@contextlib.contextmanager
def quiet_lightning():
    """Silences the Lightning warnings and tips in QUIET for the duration (warning filters are restored after), and,
    when the output is not a terminal, Lightning's informational lines (devices available, seed set, checkpoint
    restored): a log file keeps one line per epoch and the reports."""
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    no_tips = _NoTips()
    lightning_log.addFilter(no_tips)
    levels = {}
    if not on_terminal():
        for name in LIGHTNING_LOGGERS:
            levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(max(logging.WARNING, levels[name]))
    try:
        with warnings.catch_warnings():
            for pattern in QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        lightning_log.removeFilter(no_tips)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


_last_cli: list = [None]  # the CLI of the current call, for the note printed on Ctrl-C


class _OneLineErrorParser(LightningArgumentParser):
    """Parser errors (an unknown key in a config, a bad value) as the error and one hint, without the usage lines
    of every option first."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        text = " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {text}\n  ({prog} --help lists the options)\n")
        sys.exit(EXIT_USAGE)


def _interrupt_message(command: str, argv: list[str]) -> str:
    cli = _last_cli[0]
    run = getattr(cli, "run_dir", None)
    if command == "fit" and run is not None:
        last = run / "last.ckpt"
        if last.is_file():
            try:
                epoch = read_checkpoint(last, mmap=True).get("epoch")
            except ValueError:
                epoch = None
            done = f" (end of epoch {epoch})" if isinstance(epoch, int) else ""
            args = list(argv[1:])
            for flag in ("--ckpt_path", "--run_name"):  # replaced by the checkpoint
                while flag in args:
                    i = args.index(flag)
                    del args[i:i + 2]
            args = [a for a in args if not a.startswith(("--ckpt_path=", "--run_name="))]
            resume = shlex.join(["eleatt", "fit", *args, "--ckpt_path", str(last)])
            return f"eleatt fit: interrupted (Ctrl-C); kept {run}/ with {last.name}{done}; resume with: {resume}"
        return f"eleatt fit: interrupted (Ctrl-C) before the first epoch ended; nothing kept in {run}/ to resume"
    kept = f"; nothing written in {run}/" if command in EVALUATIONS and run is not None else ""
    return f"eleatt {command}: interrupted (Ctrl-C){kept}; rerun the same command"


def main(argv: list[str] | None = None) -> int:
    """`eleatt fit|validate|test|predict ...`; argv[0] is the subcommand. Returns 0, 2 for a usage error or a
    refused run (the reason and the fix printed in one line), or 130 after Ctrl-C (with the command that resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    _last_cli[0] = None
    ctrl_c = InterruptWatch()
    try:
        with quiet_lightning(), watch_interrupts() as ctrl_c:
            EleAttCLI(args=argv)
    except SystemExit as exit_:  # --help, --print_config, parser errors; Lightning's own exit after Ctrl-C
        cli = _last_cli[0]
        if ctrl_c.happened or (cli is not None and cli.interrupted):
            print(_interrupt_message(command, argv), file=sys.stderr)
            return EXIT_INTERRUPTED
        code = exit_.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    except KeyboardInterrupt:  # outside Lightning's loops (set-up, reading the data)
        print(_interrupt_message(command, argv), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:  # bad input: one line naming the file and the fix (pipeline.errors)
        if not is_user_error(err):
            raise
        return usage_error(command, err)
    return EXIT_OK
