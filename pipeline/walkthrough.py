"""The commands of the pipeline on real data, written once.

`folder_steps` (a folder of class sub-folders of your own videos) and `ucf101_steps` (UCF101 split 1) return the
stages as `Step`s of `eleatt` command lines. Everything that shows or runs these commands renders them from here:

* the docs' walkthroughs (README.md, docs/getting-started.md, docs/real-datasets.md): the code block after a
  `<!-- walkthrough: NAME -->` line is `as_bash(DOCS[NAME]())`; tests/test_walkthrough.py checks each block, and
  `python -m pipeline.walkthrough --write` rewrites them after a change here;
* `eleatt run` executes `folder_steps` on its own layout (`pipeline.run`), and its report's "Reproduce" section
  shows exactly the commands it ran;
* `eleatt demo` runs them on the generated dataset, and its report shows `ucf101_steps`.

No shell loops or variables: every line works as printed, one command each.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

STREAMS = ("rgb", "flow")
WIDTH = 116  # rendered command lines wrap before this column (with ` \` continuations)


@dataclass(frozen=True)
class Step:
    """One stage: `key` (what `eleatt run` records as done), a title, and its commands (argv after `eleatt`)."""

    key: str
    title: str
    commands: tuple[tuple[str, ...], ...]
    stream: str | None = None  # the stream a per-stream stage belongs to


@dataclass(frozen=True)
class Layout:
    """Where a two-stream run keeps its files (all paths as they are to be printed: relative or absolute)."""

    videos: str  # the folder the lists' paths are relative to
    lists: str  # train.txt, val.txt, test.txt, all.txt, classes.txt
    flow: str  # the flow folder
    features: dict[str, str]  # stream -> feature folder
    filtered: str  # the lists without the videos that failed (`eleatt prepare filter`)
    runs: str  # the checkpoint root: <runs>/<run name>/best.ckpt
    run_names: dict[str, str]  # stream -> run folder name
    fused: str  # the fused test scores

    def run(self, stream: str) -> str:
        return f"{self.runs}/{self.run_names[stream]}"

    @classmethod
    def under(cls, data: str, videos: str | None = None, runs: str = "checkpoints", name: str = "mine") -> "Layout":
        """The walkthrough's layout: lists, flow and features under `data`, runs `<runs>/<name>-<stream>`."""
        return cls(videos=videos or f"{data}/videos", lists=f"{data}/lists", flow=f"{data}/flow",
                   features={s: f"{data}/features/{s}" for s in STREAMS}, filtered=f"{data}/lists-ok", runs=runs,
                   run_names={s: f"{name}-{s}" for s in STREAMS}, fused=f"{runs}/{name}-fused.npz")


@dataclass(frozen=True)
class Options:
    """The settings a walkthrough is rendered with (the documented defaults; tests use tiny ones)."""

    backbone: str = "resnet50"
    weights: str = "imagenet"
    stack: int = 5
    config: str = "features_lstm"  # the training config (a packaged name or a file)
    streams: tuple[str, ...] = STREAMS
    flow_args: tuple[str, ...] = ()  # more `eleatt flow` options
    extract_args: tuple[str, ...] = ()  # more `eleatt extract` options
    fit_args: tuple[str, ...] = ()  # more `eleatt fit` options (overrides of the config)
    prepare_args: tuple[str, ...] = ()  # more `eleatt prepare folder` options
    new_videos: tuple[str, ...] = ("new.mp4",)  # what the last step classifies
    weights_fused: tuple[str, ...] = ("1", "1.5")  # classify's fusion weights (RGB : flow, TSN's)


def _backbone(o: Options) -> tuple[str, ...]:
    return ("--backbone", o.backbone, "--weights", o.weights)


def extraction_steps(layout: Layout, o: Options) -> list[Step]:
    """Optical flow (for the flow stream) and the features of each stream, from `layout.lists`/all.txt."""
    every = f"{layout.lists}/all.txt"
    steps = []
    if "flow" in o.streams:
        steps.append(Step("flow", "optical flow of every video, once (OpenCV DIS; one .flow.zip per video)",
                          (("flow", "--list", every, "--root", layout.videos, "--out", layout.flow, *o.flow_args),)))
    if "rgb" in o.streams:
        steps.append(Step("extract-rgb", f"per-frame RGB features ({o.backbone})",
                          (("extract", "--list", every, "--root", layout.videos, "--out", layout.features["rgb"],
                            *_backbone(o), *o.extract_args),), "rgb"))
    if "flow" in o.streams:
        steps.append(Step("extract-flow", f"flow features: stacks of {o.stack} flow fields ({2 * o.stack} channels) "
                                          f"through {o.backbone}, its RGB filters adapted to them",
                          (("extract", "--modality", "flow", "--stack", str(o.stack), "--list", every, "--root",
                            layout.flow, "--out", layout.features["flow"], *_backbone(o), *o.extract_args),), "flow"))
    return steps


def filter_step(layout: Layout, o: Options) -> Step:
    folders = ([layout.flow] if "flow" in o.streams else []) + [layout.features[s] for s in o.streams]
    return Step("filter", "the lists without the videos that failed above, for every stream (problems.jsonl: why)",
                (("prepare", "filter", "--lists", layout.lists, "--folders", *folders, "--out", layout.filtered),))


def fit_command(layout: Layout, o: Options, stream: str) -> tuple[str, ...]:
    lists = layout.filtered
    return ("fit", "--config", o.config, "--data.features_dir", layout.features[stream],
            "--data.train_list", f"{lists}/train.txt", "--data.val_list", f"{lists}/val.txt",
            "--data.test_list", f"{lists}/test.txt", "--trainer.default_root_dir", layout.runs,
            "--run_name", layout.run_names[stream], *o.fit_args)


def training_steps(layout: Layout, o: Options) -> list[Step]:
    """fit per stream, validate and test per stream, fuse (two streams), classify new videos."""
    steps = [Step(f"fit-{s}", f"an EleAtt-LSTM on the {s} features (run folder {layout.run(s)}/)",
                  (fit_command(layout, o, s),), s) for s in o.streams]
    steps.append(Step("evaluate", "validation and test scores of each best checkpoint (each reads its run's "
                                  "config.yaml)",
                      tuple((stage, "--ckpt_path", f"{layout.run(s)}/best.ckpt") for s in o.streams
                            for stage in ("validate", "test"))))
    if len(o.streams) > 1:
        steps.append(Step("fuse", "fuse the streams' test scores, with weights picked on the validation scores",
                          (("fuse", "--scores", *(f"{layout.run(s)}/scores_test.npz" for s in o.streams),
                            "--search-weights", *(f"{layout.run(s)}/scores_val.npz" for s in o.streams),
                            "--out", layout.fused),)))
    ckpts = tuple(f"{layout.run(s)}/best.ckpt" for s in o.streams)
    fused = ("--weights", *o.weights_fused) if len(o.streams) > 1 else ()
    steps.append(Step("classify", "classify new videos with every stream (their flow computed as above)"
                      + (f", fused {' : '.join(o.weights_fused)}" if fused else ""),
                      (("classify", *o.new_videos, "--ckpt", *ckpts, *fused),)))
    return steps


def folder_steps(layout: Layout | None = None, options: Options | None = None) -> list[Step]:
    """Your own videos, one folder per class (`<videos>/<class>/<video>`), stage by stage."""
    layout = layout or Layout.under("data/mine")
    o = options or Options()
    lists = Step("lists", "lists: train.txt, val.txt (held out of train), test.txt, all.txt (the three), "
                          "classes.txt",
                 (("prepare", "folder", "--root", layout.videos, "--out", layout.lists, *o.prepare_args),))
    return [lists, *extraction_steps(layout, o), filter_step(layout, o), *training_steps(layout, o)]


def run_steps(videos: str = "data/mine/videos", out: str = "runs/mine", options: Options | None = None) -> list[Step]:
    """The same in one command: `eleatt run` (resumable; the report lists the commands it ran)."""
    o = options or Options()
    return [Step("run", "the whole pipeline: lists, flow, features, both streams, test, fuse, report",
                 (("run", "--videos", videos, "--out", out, *_backbone(o)),))]


UCF101 = Layout(videos="data/ucf101/videos", lists="data/ucf101/lists/split1", flow="data/ucf101/flow",
                features={s: f"data/ucf101/features/{s}" for s in STREAMS}, filtered="data/ucf101/lists/split1",
                runs="checkpoints", run_names={s: f"ucf101-{s}-s1" for s in STREAMS},
                fused="checkpoints/ucf101-fused-s1.npz")


def ucf101_steps(options: Options | None = None) -> list[Step]:
    """UCF101 split 1 with the packaged configs ucf101_rgb and ucf101_flow (their data paths are `UCF101`'s)."""
    o = options or Options()
    layout = UCF101
    lists = Step("lists", "lists from the official split files: train, val (held out of train), test, all, classes",
                 (("prepare", "ucf101", "--splits-dir", "data/ucf101/ucfTrainTestlist", "--split", "1", "--out",
                   layout.lists, "--check-root", layout.videos),))
    fits = [Step(f"fit-{s}", f"an EleAtt-LSTM on the {s} features (packaged config ucf101_{s}: the paths above)",
                 (("fit", "--config", f"ucf101_{s}", "--run_name", layout.run_names[s]),), s) for s in o.streams]
    rest = [s for s in training_steps(layout, o) if not s.key.startswith("fit-")]
    visualize = Step("visualize", "the attention of one video: gate values per element and step, class "
                                  "probabilities over time (PNGs)",
                     (("visualize", "--ckpt", f"{layout.run('rgb')}/best.ckpt", "--video", o.new_videos[0],
                       "--out", "visualize"),))
    return [lists, *extraction_steps(layout, o), *fits, *rest, visualize]


# -- rendering -------------------------------------------------------------------------------------------------------
def command_line(argv: tuple[str, ...], width: int = WIDTH) -> str:
    """`eleatt <argv>` quoted for a shell, wrapped with ` \\` continuations (indented 4) before `width`; an option
    stays on the line of its value."""
    words = [shlex.quote(a) for a in ("eleatt", *argv)]
    groups: list[str] = []
    for word in words:
        if groups and groups[-1].startswith("--") and " " not in groups[-1] and not word.startswith("--"):
            groups[-1] += " " + word  # `--flag value` together
        else:
            groups.append(word)
    lines, line = [], ""
    for group in groups:
        if line and len(line) + 1 + len(group) + 2 > width:
            lines.append(line + " \\")
            line = "    " + group
        else:
            line = f"{line} {group}" if line else group
    return "\n".join([*lines, line])


def as_bash(steps: list[Step], numbered: bool = True) -> str:
    """The steps as one bash block's text: `# N. title` then each command."""
    out = []
    for i, step in enumerate(steps, 1):
        out.append(f"# {i}. {step.title}" if numbered else f"# {step.title}")
        out += [command_line(c) for c in step.commands]
    return "\n".join(out)


def as_pairs(steps: list[Step]) -> list[tuple[str, str]]:
    """(stage, commands) pairs, as the report's "Reproduce" section shows them."""
    return [(f"{i}. {step.title}", "\n".join(command_line(c) for c in step.commands))
            for i, step in enumerate(steps, 1)]


def parse_commands(text: str) -> list[list[str]]:
    """The argv (after `eleatt`) of every command of a rendered block (comments skipped, continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            words = shlex.split(line, comments=True)
            if words[:1] == ["eleatt"]:
                commands.append(words[1:])
    return commands


# -- the docs --------------------------------------------------------------------------------------------------------
DOCS = {
    "folder": folder_steps,
    "run": run_steps,
    "ucf101": ucf101_steps,
}
DOC_FILES = ("README.md", "docs/getting-started.md", "docs/real-datasets.md")
MARK = re.compile(r"<!-- walkthrough: (\w+) -->\n```bash\n(.*?)\n```", re.S)


def doc_blocks(text: str) -> list[tuple[str, str, tuple[int, int]]]:
    """(name, block text, span of the block text) of every marked block of a markdown text."""
    return [(m.group(1), m.group(2), m.span(2)) for m in MARK.finditer(text)]


def rendered(name: str) -> str:
    if name not in DOCS:
        raise KeyError(f"unknown walkthrough {name!r} (known: {', '.join(DOCS)})")
    return as_bash(DOCS[name](), numbered=name != "run")


def check_docs(root: Path, write: bool = False) -> list[str]:
    """The marked blocks of DOC_FILES under `root` that differ from their rendering (rewritten with `write`)."""
    stale = []
    for name in DOC_FILES:
        path = root / name
        text = path.read_text(encoding="utf-8")
        new = text
        for block, body, (start, end) in reversed(doc_blocks(text)):
            want = rendered(block)
            if body != want:
                stale.append(f"{name}: walkthrough {block}")
                new = new[:start] + want + new[end:]
        if write and new != text:
            path.write_text(new, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.walkthrough",
                                     description="Print a walkthrough, or check/rewrite the docs' marked blocks.")
    parser.add_argument("name", nargs="?", choices=sorted(DOCS), help="print this walkthrough")
    parser.add_argument("--write", action="store_true", help="rewrite the stale blocks of the docs")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout")
    args = parser.parse_args(argv)
    if args.name:
        print(rendered(args.name))
        return 0
    stale = check_docs(args.root, write=args.write)
    for line in stale:
        print(("rewrote " if args.write else "stale: ") + line)
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
