"""`eleatt run --videos DIR --out RUN`: the whole two-stream pipeline for a folder of class sub-folders, resumable.

lists (`eleatt prepare folder`) -> optical flow (`eleatt flow`) -> RGB and flow features (`eleatt extract`) ->
lists without the videos that failed (`eleatt prepare filter`) -> an EleAtt-LSTM per stream (`eleatt fit`) ->
validate and test (`eleatt validate|test`) -> fuse (`eleatt fuse`, weights picked on validation) -> classify a few
test videos from their files -> report. Each stage runs the command lines of `pipeline.walkthrough.folder_steps`
through the commands' own `main` functions, so `eleatt run` is exactly the documented walkthrough, and its report
shows the commands it ran.

One policy for bad inputs: a video that fails in any stage (a damaged file, a one-frame video that has no flow, two
videos whose outputs would share a name) is left out of every stream's training and evaluation, with its stage and
reason in `RUN/lists-ok/problems.jsonl`; the run finishes and exits 3 with the count.

Resumable: `RUN/run.json` records the settings and the finished stages. Rerunning the same command after a crash or
Ctrl-C skips the finished stages, resumes flow and extraction video by video and training from last.ckpt; a rerun
with other settings is refused, naming each difference. `eleatt demo` is this pipeline on the generated dataset.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.errors import (
    EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, InputNotFoundError, UsageError, set_interrupt_note,
)
from pipeline.walkthrough import STREAMS, Layout, Options, Step, as_pairs, folder_steps

STATE_FILE = "run.json"
KEPT = ("lists", "flow", "extract-", "fit-")  # stages a rerun skips once finished (the others are quick: redone)
STATE_VERSION = 1
LABELS = {"rgb": "RGB", "flow": "flow"}
CLASSIFIED = 4  # test videos classified from their files at the end
SETTING_FLAGS = {  # run.json's settings -> the option that sets each (named when a rerun asks for other ones)
    "videos": "--videos", "lists": "--lists", "streams": "--streams", "backbone": "--backbone", "weights": "--weights",
    "stack": "--stack", "epochs": "--epochs", "train_config": "--train-config", "test_fraction": "--test-fraction",
    "val_fraction": "--val-fraction", "seed": "--seed", "short_side": "--short-side",
}


# -- printing ----------------------------------------------------------------------------------------------------------
def _cpu() -> float:
    """CPU seconds (user + system) of this process and of its finished children (flow and decoding workers)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def stage_line(number: int, total: int, title: str) -> tuple[float, float]:
    print(f"\n== [{number}/{total}] {title}", flush=True)
    return time.perf_counter(), _cpu()


def done_line(start: tuple[float, float], what: str) -> None:
    # CPU time too: on a shared machine the wall time says more about the other jobs than about the stage.
    wall, cpu = time.perf_counter() - start[0], _cpu() - start[1]
    print(f"   -> {what} ({wall:.1f} s, CPU {cpu:.1f} s)", flush=True)


def invoke(argv: tuple[str, ...] | list[str]) -> int:
    """Runs one `eleatt` command line (argv after `eleatt`) in this process through the command's own `main`, as
    the dispatcher would; a user error it raises propagates (the caller's dispatcher prints it, exit 2)."""
    from pipeline.cli import COMMANDS, LIGHTNING_COMMANDS

    argv = list(argv)
    if argv[0] in LIGHTNING_COMMANDS:
        from pipeline.training.cli import main as lightning_main

        return lightning_main(argv)
    module, function, _ = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)


# -- the state file ----------------------------------------------------------------------------------------------------
class RunState:
    """`RUN/run.json`: the settings of the run and the stages it finished, rewritten atomically after each stage."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        self.settings = settings
        self.done: list[str] = []
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            stored, done = data["settings"], data["done"]
            if not isinstance(stored, dict) or not isinstance(done, list) or data.get("version") != STATE_VERSION:
                raise ValueError
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise UsageError(f"'{self.path}' is not the state file of an `eleatt run` (damaged or another version); "
                             "give another --out, or delete the file to start this run folder again") from None
        diffs = [f"{SETTING_FLAGS.get(k, k)} {_shown(stored.get(k))} (asked now: {_shown(self.settings.get(k))})"
                 for k in sorted(set(stored) | set(self.settings)) if stored.get(k) != self.settings.get(k)]
        if diffs:
            raise UsageError(f"run folder '{self.path.parent}' holds a run with other settings: {'; '.join(diffs)}; "
                             "rerun with its settings to resume it, or give another --out for a new run")
        self.done = [str(d) for d in done]

    def mark(self, stage: str) -> None:
        if stage not in self.done:
            self.done.append(stage)
        from pipeline.paths import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path, "w", encoding="utf-8") as f:
            json.dump({"version": STATE_VERSION, "settings": self.settings, "done": self.done}, f, indent=2)
            f.write("\n")


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "(not given)" if value is None else str(value)


# -- the pipeline ------------------------------------------------------------------------------------------------------
@dataclass
class Hooks:
    """What `eleatt demo` changes in the pipeline: its own first stage (generating the dataset), the threads of
    training, and its own report."""

    lists: Callable[[], str] | None = None  # does stage 1 and returns what it did; None: the walkthrough's lists
    lists_title: str = ""
    train_threads: int | None = None
    report: Callable | None = None  # (pipeline, streams, picks) -> (report path, more text for the summary)
    report_title: str = ""
    extra_summary: dict = field(default_factory=dict)


class Pipeline:
    """The stages of `folder_steps(layout, options)` with printing, the state file and the bad-input policy.

    `out` holds run.json, the fused scores and the report; `name` is the command named in messages.
    """

    def __init__(self, name: str, layout: Layout, options: Options, out: Path, settings: dict,
                 resume: str, hooks: Hooks | None = None) -> None:
        self.name, self.layout, self.options, self.out = name, layout, options, Path(out)
        self.hooks = hooks or Hooks()
        self.steps = {step.key: step for step in folder_steps(layout, options)}
        self.state = RunState(self.out / STATE_FILE, settings)
        self.resume = resume
        self.problems: list[dict] = []
        self.metrics: dict[str, dict] = {}
        self.weights: list[float] | None = None
        self.ran: list[Step] = []  # the steps whose commands this pipeline runs (the report's "Reproduce")

    @property
    def streams(self) -> tuple[str, ...]:
        return self.options.streams

    # -- plan ------------------------------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, str, Callable[[], str]]]:
        o, lay = self.options, self.layout
        plan = [("lists", self.hooks.lists_title or f"lists: classes from the folders of {lay.videos} -> {lay.lists}",
                 self._lists)]
        if "flow" in self.streams:
            plan.append(("flow", f"flow: OpenCV DIS between consecutive frames -> {lay.flow}", self._flow))
        if "rgb" in self.streams:
            plan.append(("extract-rgb", f"extract RGB: per-frame {o.backbone} features (weights {o.weights}) -> "
                                        f"{lay.features['rgb']}", lambda: self._extract("rgb")))
        if "flow" in self.streams:
            plan.append(("extract-flow", f"extract flow: {o.backbone} features of stacks of {o.stack} flow fields "
                                         f"({2 * o.stack} channels, weights {o.weights}) -> {lay.features['flow']}",
                         lambda: self._extract("flow")))
        for s in self.streams:
            plan.append((f"fit-{s}", f"fit {LABELS[s]}: EleAtt-LSTM on the {LABELS[s]} feature sequences -> "
                                     f"{lay.run(s)}", lambda s=s: self._fit(s)))
        two = len(self.streams) > 1
        which = "both streams with their best checkpoints" if two else \
            f"the {LABELS[self.streams[0]]} stream with its best checkpoint"
        plan.append(("evaluate", f"validate and test {which}", self._evaluate))
        if two:
            plan.append(("fuse", "fuse: weighted mean of the two streams' probabilities, weights picked on "
                                 "validation", self._fuse))
        ckpts = "both checkpoints (flow computed on the fly)" if two else "the checkpoint"
        plan.append(("classify", f"classify up to {CLASSIFIED} test videos from their files with {ckpts}",
                     self._classify))
        plan.append(("report", self.hooks.report_title or f"report: curves, confusion, attention -> {self.out}",
                     self._report))
        return plan

    def execute(self) -> int:
        """Runs every stage not finished before; returns 0, 3 (videos left out, counted) or a stage's failing
        exit status (2 usage, 130 interrupted)."""
        set_interrupt_note(f"finished stages are kept in {self.out} ({STATE_FILE}); resume with: {self.resume}")
        total = (time.perf_counter(), _cpu())
        plan = self.plan()
        last_extraction = max(i for i, (key, _, _) in enumerate(plan) if key.startswith("extract"))
        for number, (key, title, work) in enumerate(plan, 1):
            start = stage_line(number, len(plan), title)
            if key in self.state.done and key.startswith(KEPT):
                if key in self.steps:
                    self.ran.append(self.steps[key])
                done_line(start, "done in an earlier run (kept)")
            else:
                what = work()
                if isinstance(what, int):  # a stage's command failed: it said why
                    return self._failed(key, what)
                self.state.mark(key)
                done_line(start, what)
            if number - 1 == last_extraction:
                code = self._filter()  # the lists every stream trains and is tested on
                if code:
                    return self._failed("filter", code)
        return self._summary(total)

    def _failed(self, key: str, code: int) -> int:
        if code == EXIT_INTERRUPTED:
            print(f"{self.name}: interrupted in stage {key}; finished stages are kept in {self.out}; resume with: "
                  f"{self.resume}", file=sys.stderr)
        else:
            print(f"{self.name}: stage {key} ended with exit status {code} (see above); fix that and rerun the same "
                  f"command to resume: {self.resume}", file=sys.stderr)
        return code

    # -- stages ----------------------------------------------------------------------------------------------------
    def _run_step(self, key: str) -> int:
        step = self.steps[key]
        self.ran.append(step)
        worst = EXIT_OK
        for argv in step.commands:
            code = invoke(argv)
            if code not in (EXIT_OK, EXIT_SOME_FAILED):
                return code
            worst = max(worst, code)
        return worst

    def _lists(self):
        if self.hooks.lists is not None:
            return self.hooks.lists()
        code = self._run_step("lists")
        if code not in (EXIT_OK, EXIT_SOME_FAILED):
            return code
        return f"lists in {self.layout.lists}" + (" (some videos left out: see above)" if code else "")

    def _all(self) -> list[str]:
        from pipeline.data.lists import read_list

        return [e.path for e in read_list(Path(self.layout.lists) / "all.txt")]

    def _flow(self):
        code = self._run_step("flow")
        if code not in (EXIT_OK, EXIT_SOME_FAILED):
            return code
        from pipeline.data.flow_files import FlowFolder

        videos = self._all()
        finished = FlowFolder(self.layout.flow).finished()
        pairs = sorted({int(finished[v]["pairs"]) for v in videos if v in finished})
        each = f" ({pairs[0]} frame pairs each)" if len(pairs) == 1 else ""
        failed = sum(v not in finished for v in videos)
        return (f"{len(videos) - failed} flow files{each} in {self.layout.flow}"
                + (f"; {failed} failed (listed above)" if failed else ""))

    def _extract(self, stream: str):
        code = self._run_step(f"extract-{stream}")
        if code not in (EXIT_OK, EXIT_SOME_FAILED):
            return code
        from pipeline.data.features import FeatureFolder

        videos = self._all()
        finished = FeatureFolder(self.layout.features[stream]).finished()
        failed = sum(v not in finished for v in videos)
        return (f"{LABELS[stream]} features of {len(videos) - failed} videos in {self.layout.features[stream]}"
                + (f"; {failed} failed (listed above)" if failed else ""))

    def _filter(self) -> int:
        """The filtered lists (once; a resumed run keeps them, so that every stage trains and tests on the same
        videos); prints what was left out."""
        from pipeline.data.lists import read_list
        from preprocessing.splits import PROBLEMS_FILE, read_problems

        lists = Path(self.layout.filtered)
        if "filter" not in self.state.done:
            code = self._run_step("filter")
            if code not in (EXIT_OK, EXIT_SOME_FAILED):
                return code
            self.state.mark("filter")
        else:
            self.ran.append(self.steps["filter"])
        self.problems = read_problems(lists / PROBLEMS_FILE)
        empty = [name for name in ("train", "val", "test") if not read_list(lists / f"{name}.txt")]
        if empty:
            raise UsageError(f"after leaving out {len(self.problems)} videos ({lists / PROBLEMS_FILE}), the "
                             f"{' and '.join(empty)} list(s) in {lists} hold no video: add videos to the class "
                             "folders (at least a few per class), then run again with another --out")
        kept = len(read_list(lists / "all.txt"))
        print(f"   -> every stream trains and is tested on the same {kept} videos"
              + (f"; {len(self.problems)} left out ({lists / PROBLEMS_FILE})" if self.problems else ""), flush=True)
        return EXIT_OK

    def _fit(self, stream: str):
        run = Path(self.layout.run(stream))
        step = self.steps[f"fit-{stream}"]
        argv = list(step.commands[0])
        for name in ("last.ckpt", "best.ckpt"):  # a run stopped before: resume it (last.ckpt: the latest epoch)
            if (run / name).is_file():
                argv += ["--ckpt_path", str(run / name)]
                print(f"   resuming {run.name} from {run / name}", flush=True)
                break
        self.ran.append(step)
        threads = self._threads()
        try:
            code = invoke(argv)
        finally:
            self._threads(threads)
        if code != EXIT_OK:
            return code
        return f"{LABELS[stream]} checkpoints in {run}"

    def _threads(self, restore: int | None = None) -> int | None:
        """Training's threads (the demo's tiny model trains faster on one); returns the previous count."""
        if self.hooks.train_threads is None:
            return None
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(restore if restore is not None else self.hooks.train_threads)
        return previous

    def _evaluate(self):
        code = self._run_step("evaluate")
        if code != EXIT_OK:
            return code
        from pipeline.data.lists import read_classes
        from pipeline.evaluation.scores import accuracy_summary, read_scores

        for s in self.streams:
            scores = read_scores(Path(self.layout.run(s)) / "scores_test.npz")
            self.metrics[s] = accuracy_summary(scores["scores"], scores["labels"])
        self.chance = 1 / len(read_classes(Path(self.layout.filtered) / "classes.txt"))
        return ("test top-1 " + ", ".join(f"{LABELS[s]} {self.metrics[s]['top1']:.1%}" for s in self.streams)
                + f" (chance {self.chance:.1%})")

    def _fuse(self):
        code = self._run_step("fuse")
        if code != EXIT_OK:
            return code
        from pipeline.evaluation.scores import accuracy_summary, read_scores

        fused = read_scores(self.layout.fused)
        self.weights = [float(w) for w in fused["weights"]]
        self.metrics["fused"] = accuracy_summary(fused["scores"], fused["labels"])
        return (f"fused test top-1 {self.metrics['fused']['top1']:.1%} with weights "
                + " : ".join(f"{LABELS[s]} {w:g}" for s, w in zip(self.streams, self.weights)))

    def test_entries(self) -> list:
        from pipeline.data.lists import read_list

        return read_list(Path(self.layout.filtered) / "test.txt")

    def picks(self) -> list:
        """Up to CLASSIFIED test videos spread over the test list (it is in class order)."""
        tests = self.test_entries()
        return [tests[i] for i in range(0, len(tests), max(1, len(tests) // CLASSIFIED))][:CLASSIFIED]

    def _classify(self):
        """A few test videos from their files, with every stream's checkpoint (the flow computed on the fly) and the
        fusion's weights: the checkpoints classify new videos as the test scores say."""
        import torch

        from pipeline.evaluation.fusion import fuse_probs
        from pipeline.evaluation.scores import read_scores
        from pipeline.serving.classify import VideoClassifier

        reference = Path(self.layout.fused if len(self.streams) > 1 else
                         Path(self.layout.run(self.streams[0])) / "scores_test.npz")
        scores = read_scores(reference)
        rows = {str(v): i for i, v in enumerate(scores["videos"])}
        names = [str(c) for c in scores["classes"]]
        models = {s: VideoClassifier(Path(self.layout.run(s)) / "best.ckpt", device="cpu") for s in self.streams}
        weights = self.weights or [1.0] * len(self.streams)
        agree, picks = 0, self.picks()
        with torch.inference_mode():
            for entry in picks:
                preds = [models[s](Path(self.layout.videos) / entry.path, topk=1) for s in self.streams]
                for pred in preds:
                    if not pred.ok:
                        raise UsageError(f"classify '{Path(self.layout.videos) / entry.path}' failed: {pred.error}")
                probs = fuse_probs([p.scores for p in preds], weights)  # (C,)
                label = int(probs.argmax())
                agree += label == int(scores["scores"][rows[entry.path]].argmax())
                each = ", ".join(f"{LABELS[s]} {p.names[0]} {p.probs[0]:.0%}" for s, p in zip(self.streams, preds))
                how = f"fused {names[label]} {probs[label]:.0%}  ({each})" if len(preds) > 1 else each
                print(f"   {entry.path}  (true: {names[entry.label]})  ->  {how}", flush=True)
        # the report's command for it: `eleatt classify` with these checkpoints and weights
        ckpts = [str(Path(self.layout.run(s)) / "best.ckpt") for s in self.streams]
        fused = ["--weights", *(f"{w:g}" for w in weights)] if len(self.streams) > 1 else []
        title = "classify a video with " + (f"every stream (its flow computed as above), fused "
                                            f"{' : '.join(f'{w:g}' for w in weights)} as picked" if fused else
                                            "the checkpoint")
        self.ran.append(Step("classify", title, (
            ("classify", *(str(Path(self.layout.videos) / e.path) for e in picks[:1]), "--ckpt", *ckpts, *fused),)))
        what = "`fuse`" if len(self.streams) > 1 else "`test`"
        return f"top-1 agrees with {what} for {agree} of {len(picks)} videos"

    def report_streams(self) -> list:
        from pipeline.evaluation.report import Stream

        streams = [Stream(LABELS[s], Path(self.layout.run(s)) / "scores_test.npz", Path(self.layout.run(s)),
                          note=f"stacks of {self.options.stack} DIS flow fields" if s == "flow" else "")
                   for s in self.streams]
        if len(self.streams) > 1:
            streams.append(Stream("fused", self.layout.fused, None,
                                  note=" : ".join(f"{LABELS[s]} {w:g}" for s, w in zip(self.streams, self.weights))
                                  + ", picked on val"))
        return streams

    def _report(self):
        if self.hooks.report is not None:
            path, what = self.hooks.report(self, self.report_streams(), self.picks())
        else:
            path, what = write_run_report(self), ""
        self.report_path = Path(path)
        pictures = len(list(self.report_path.parent.glob("*.png")))
        return f"{what}report {self.report_path.name} with {pictures} pictures"

    def _summary(self, total: tuple[float, float]) -> int:
        from preprocessing.splits import PROBLEMS_FILE

        rows = [f"{LABELS.get(s, s)} {m['top1']:.1%}" for s, m in self.metrics.items()]
        extra = "".join(f", {k} {v}" for k, v in self.hooks.extra_summary.items())
        took = f"{time.perf_counter() - total[0]:.0f} s (CPU {_cpu() - total[1]:.0f} s)"
        print(f"\n{self.name.split()[-1]} done in {took}: "
              f"test top-1 {', '.join(rows)} ({extra.lstrip(', ')}{', ' if extra else ''}chance {self.chance:.1%}); "
              f"run folder {self.out}")
        code = EXIT_OK
        if self.problems:
            path = Path(self.layout.filtered) / PROBLEMS_FILE
            print(f"{len(self.problems)} video(s) left out of every stream, each with its stage and reason in {path}")
            code = EXIT_SOME_FAILED
        print(f"report: {self.report_path.resolve()}")
        return code


# -- the report --------------------------------------------------------------------------------------------------------
def attention_of(ckpt: Path, features: Path, videos: Path | None, entries: list, out: Path) -> Path:
    """`out`/attention.png: the gates of checkpoint `ckpt`'s first layer on the stored `features` of (up to three
    of) the list `entries`, beside a few frames of each video under `videos` (None: no frames)."""
    from pipeline.data.features import FeatureFolder
    from pipeline.serving.visualize import attention_picture
    from pipeline.trained.load import load_stream

    model = load_stream(ckpt)
    folder = FeatureFolder(features)
    shown = entries[:3]
    names = model.class_names
    picture, _ = attention_picture(
        model, [folder.load(e.path) for e in shown], out / "attention.png",
        titles=[f"{e.path} (true: {names[e.label]})" for e in shown],
        videos=[Path(videos) / e.path for e in shown] if videos is not None else None)
    return picture


def write_run_report(pipeline: Pipeline) -> Path:
    """`eleatt run`'s report in its run folder: the streams' table, curves, confusions, the attention picture, the
    videos left out and the commands the run ran."""
    from pipeline.evaluation.report import write_report

    out, stream = pipeline.out, pipeline.streams[0]
    picture = attention_of(Path(pipeline.layout.run(stream)) / "best.ckpt", Path(pipeline.layout.features[stream]),
                           Path(pipeline.layout.videos) if stream == "rgb" else None, pipeline.picks(), out)
    return write_report(
        out, pipeline.report_streams(), attention=picture,
        commands=as_pairs(_unique(pipeline.ran)), left_out=pipeline.problems,
        title=f"eleatt run: {', '.join(LABELS[s] for s in pipeline.streams)} on {pipeline.layout.videos}",
        intro="An EleAtt-LSTM per stream on the features of the videos, tested on the test list; figures measured in "
              "this run. The commands below are the ones this run ran, stage by stage; each works on its own.")


def _unique(steps: list[Step]) -> list[Step]:
    seen, out = set(), []
    for step in steps:
        if step.key not in seen:
            seen.add(step.key)
            out.append(step)
    return out


# -- the command -------------------------------------------------------------------------------------------------------
def _streams(text) -> tuple[str, ...]:
    parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
    streams = tuple(dict.fromkeys(str(s).strip() for s in parts if str(s).strip()))
    if not streams or any(s not in STREAMS for s in streams):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated choice of {', '.join(STREAMS)} (e.g. rgb,flow)")
    return tuple(s for s in STREAMS if s in streams)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser
    from preprocessing.prepare import _fraction

    parser = command_parser(
        prog="eleatt run",
        description="Your folder of videos, start to finish: lists from the class folders, optical flow, RGB and "
                    "flow features, an EleAtt-LSTM per stream, validation and test, fusion, a few videos classified "
                    "from their files, and a report. Each stage is the command of the walkthrough (the report lists "
                    "them). Videos that fail in any stage are left out of every stream, each listed with its reason.",
        epilog="exit status: 0 done; 3 done, with videos left out (counted, listed in RUN/lists-ok/problems.jsonl); "
               "2 usage error or refused run; 130 interrupted. Rerun the same command to resume (finished stages "
               "are kept); other settings into the same --out are refused.",
    )
    parser.add_argument("--videos", required=True, type=Path,
                        help="the folder of videos: one sub-folder per class (<videos>/<class>/<video>); with "
                             "--lists, the folder their paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="the run folder (created; a rerun resumes it)")
    parser.add_argument("--lists", type=Path, default=None,
                        help="use these lists (train.txt, test.txt, classes.txt; val.txt or one is held out) "
                             "instead of making them from the class folders")
    parser.add_argument("--streams", type=_streams, default=",".join(STREAMS), metavar="rgb,flow",
                        help="the streams to train (default rgb,flow; one of them alone skips the fusion)")
    parser.add_argument("--backbone", default="resnet50", help="timm backbone of both streams (default resnet50)")
    parser.add_argument("--weights", default="imagenet",
                        help="backbone weights: imagenet (default; needs the hub or its cache), none (random), or a "
                             "local .safetensors/.pth/.bin file (see docs: Pretrained weights offline)")
    parser.add_argument("--stack", type=int, default=5, help="flow fields per flow-stream input, L (default 5)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per stream (default: the "
                                                                 "training config's, 50)")
    parser.add_argument("--train-config", default="features_lstm",
                        help="training config, a packaged name or a file (default features_lstm; "
                             "`eleatt configs` lists them)")
    parser.add_argument("--test-fraction", type=_fraction, default=0.2, help="videos for test (default 0.2)")
    parser.add_argument("--val-fraction", type=_fraction, default=0.1,
                        help="training videos held out for validation (default 0.1; at least one per class)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and of training (default 0)")
    parser.add_argument("--short-side", type=int, default=256,
                        help="flow: frames resized to this short side (default 256; 0 keeps the decoded size)")
    parser.add_argument("--workers", type=int, default=None, help="flow: processes (default min(2, CPUs))")
    return parser


def run_layout(out: Path, videos: Path) -> Layout:
    """`eleatt run`'s files: RUN/lists, RUN/flow, RUN/features/<stream>, RUN/lists-ok, RUN/checkpoints/<stream>."""
    return Layout(videos=str(videos), lists=str(out / "lists"), flow=str(out / "flow"),
                  features={s: str(out / "features" / s) for s in STREAMS}, filtered=str(out / "lists-ok"),
                  runs=str(out / "checkpoints"), run_names={s: s for s in STREAMS}, fused=str(out / "fused_test.npz"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from pipeline.arguments import resolve_config
    from pipeline.paths import ensure_writable_dir

    if args.stack < 1 or (args.epochs is not None and args.epochs < 1):
        raise UsageError(f"--stack {args.stack} and --epochs {args.epochs}: both must be at least 1")
    videos = args.videos.resolve()
    if not videos.is_dir():
        raise InputNotFoundError(f"--videos '{args.videos}' is not a folder (give the folder holding one "
                                 "sub-folder of videos per class)")
    if args.lists is not None and not args.lists.is_dir():
        raise InputNotFoundError(f"--lists '{args.lists}' is not a folder (give the folder of train.txt, val.txt, "
                                 "test.txt and classes.txt)")
    config = resolve_config(args.train_config)
    if not Path(config).is_file():
        from pipeline.arguments import LIST_HINT

        raise InputNotFoundError(f"--train-config {args.train_config}: no such file, and no packaged config of "
                                 f"that name ({LIST_HINT})")
    out = ensure_writable_dir(args.out, "--out run folder").resolve()
    if out == videos or videos in out.parents:
        raise UsageError(f"--out '{args.out}' lies inside --videos '{args.videos}': its flow and feature files "
                         "would be taken for videos; choose a folder outside it")
    layout = run_layout(out, videos)
    fit_args = ["--seed_everything", str(args.seed), "--trainer.enable_model_summary", "false"]
    if args.epochs is not None:
        fit_args += ["--trainer.max_epochs", str(args.epochs)]
    flow_args = ["--short-side", str(args.short_side)] + (["--workers", str(args.workers)] if args.workers else [])
    # a packaged config by its name (as the report shows it, it works from any folder); a file by its full path
    shown = str(Path(args.train_config).resolve()) if Path(args.train_config).is_file() else args.train_config
    options = Options(backbone=args.backbone, weights=args.weights, stack=args.stack, config=shown,
                      streams=args.streams, flow_args=tuple(flow_args), fit_args=tuple(fit_args),
                      prepare_args=("--test-fraction", str(args.test_fraction), "--val-fraction",
                                    str(args.val_fraction), "--seed", str(args.seed), "--drop-collisions"))
    settings = {"videos": str(videos), "lists": str(args.lists.resolve()) if args.lists else None,
                "streams": list(args.streams), "backbone": args.backbone, "weights": args.weights,
                "stack": args.stack, "epochs": args.epochs, "train_config": str(Path(config).resolve()),
                "test_fraction": args.test_fraction, "val_fraction": args.val_fraction, "seed": args.seed,
                "short_side": args.short_side}
    hooks = Hooks()
    if args.lists is not None:
        hooks.lists = lambda: copy_lists(args.lists, Path(layout.lists), args.val_fraction, args.seed)
        hooks.lists_title = f"lists: {args.lists} (videos under {videos}) -> {layout.lists}"
    pipeline = Pipeline("eleatt run", layout, options, out, settings, resume=shlex.join(["eleatt", "run", *argv]),
                        hooks=hooks)
    return pipeline.execute()


def copy_lists(source: Path, out: Path, val_fraction: float, seed: int) -> str:
    """--lists: the given lists into the run folder through `prepare`'s checks (videos listed twice or in both
    train and test, colliding outputs: left out and listed), with all.txt; val.txt held out of train when absent."""
    from pipeline.data.lists import read_classes, read_list
    from preprocessing.splits import Prepared, finish

    def entries(name: str):
        path = source / f"{name}.txt"
        return read_list(path) if path.is_file() else None

    train, test = entries("train"), entries("test")
    if train is None or test is None:
        raise InputNotFoundError(f"--lists '{source}' needs train.txt and test.txt (and classes.txt; val.txt is "
                                 "optional): the files `eleatt prepare` writes")
    prepared = Prepared(title=f"lists {source}", classes=read_classes(source / "classes.txt"), train=train,
                        test=test, val=entries("val"), group_of=lambda e: e.path)
    code = finish(prepared, out, val_fraction=val_fraction, seed=seed, collisions="drop")
    return f"lists in {out}" + (" (some videos left out: see above)" if code else "")


if __name__ == "__main__":
    sys.exit(main())
