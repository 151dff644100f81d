"""The real-data commands are written once (pipeline/walkthrough.py): the docs' blocks are its rendering, every
command parses with its command's parser, the UCF101 configs hold the paths the UCF101 commands write, and the
folder walkthrough runs as printed on a generated folder of videos."""
from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.walkthrough import (
    DOC_FILES, UCF101, Layout, Options, as_bash, check_docs, command_line, doc_blocks, folder_steps, parse_commands,
    rendered, run_steps, ucf101_steps,
)
from tests.helpers import make_video_folder

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_show_the_rendered_walkthroughs():
    assert check_docs(REPO) == [], "run `python -m pipeline.walkthrough --write` after changing the walkthrough"
    found = {(name, block) for name in DOC_FILES for block, _, _ in doc_blocks((REPO / name).read_text())}
    assert found >= {("README.md", "run"), ("docs/getting-started.md", "run"), ("docs/real-datasets.md", "run"),
                     ("docs/real-datasets.md", "folder"), ("docs/real-datasets.md", "ucf101")}


def test_a_stale_block_is_found_and_rewritten(tmp_path):
    for name in DOC_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((REPO / name).read_text())
    page = tmp_path / "docs/real-datasets.md"
    page.write_text(page.read_text().replace("--split 1 --out data/ucf101/lists/split1", "--split 1 --out elsewhere"))
    assert check_docs(tmp_path) == ["docs/real-datasets.md: walkthrough ucf101"]
    assert check_docs(tmp_path, write=True) == ["docs/real-datasets.md: walkthrough ucf101"]
    assert check_docs(tmp_path) == [] and page.read_text() == (REPO / "docs/real-datasets.md").read_text()


def test_rendering_wraps_and_reads_back():
    argv = ("extract", "--list", "a b/all.txt", "--root", "videos", "--out", "features/rgb", "--backbone", "resnet50")
    text = command_line(argv, width=50)
    # each line as full as it can be within 50 columns, ` \` included; `--flag value` never split
    assert text == ("eleatt extract --list 'a b/all.txt' \\\n    --root videos --out features/rgb \\\n"
                    "    --backbone resnet50")
    assert parse_commands(f"# a comment\n{text}\n") == [list(argv)]
    assert as_bash([*run_steps()]).splitlines()[1] == ("eleatt run --videos data/mine/videos --out runs/mine "
                                                       "--backbone resnet50 --weights imagenet")


def _parses(argv: list[str]) -> None:
    """The command's own parser takes argv (the Lightning commands are checked by the run below)."""
    from pipeline.cli import COMMANDS, LIGHTNING_COMMANDS

    if argv[0] in LIGHTNING_COMMANDS:
        return
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    if argv[0] == "classify":
        from pipeline.serving.classify import build_parser
    else:
        build_parser = module.build_parser
    build_parser().parse_args(argv[1:])


@pytest.mark.parametrize("name", ["folder", "ucf101", "run"])
def test_every_command_parses(name):
    commands = parse_commands(rendered(name))
    assert commands and all(c[0] for c in commands)
    for argv in commands:
        _parses(argv)


def test_the_ucf101_configs_hold_the_paths_the_commands_write():
    steps = {s.key: s for s in ucf101_steps()}
    prepare = steps["lists"].commands[0]
    assert prepare[prepare.index("--out") + 1] == UCF101.lists
    for stream in ("rgb", "flow"):
        extract = steps[f"extract-{stream}"].commands[0]
        data = yaml.safe_load((REPO / "configs" / f"ucf101_{stream}.yaml").read_text())["data"]
        assert data["features_dir"] == extract[extract.index("--out") + 1] == f"data/ucf101/features/{stream}"
        assert (data["train_list"], data["val_list"], data["test_list"]) == tuple(
            f"{UCF101.lists}/{s}.txt" for s in ("train", "val", "test"))
        assert steps[f"fit-{stream}"].commands[0] == ("fit", "--config", f"ucf101_{stream}", "--run_name",
                                                      f"ucf101-{stream}-s1")


def test_the_folder_walkthrough_runs_as_printed(tmp_path, monkeypatch):
    """The documented commands, quick (test_resnet, 2 epochs), on a generated folder with a damaged video: each
    exits as said (prepare filter 3: one video left out), both streams are trained on the same videos."""
    from pipeline.cli import main as eleatt
    from pipeline.data.lists import read_list
    from pipeline.evaluation.scores import read_scores

    monkeypatch.chdir(tmp_path)
    make_video_folder(Path("data/mine/videos"), per_class=4, bad=False)
    good = Path("data/mine/videos/grow/grow_0.mp4").read_bytes()
    Path("data/mine/videos/grow/broken.mp4").write_bytes(good[: len(good) // 2])
    options = Options(backbone="test_resnet", weights="none", stack=2, config="tiny", flow_args=("--workers", "1"),
                      fit_args=("--trainer.max_epochs", "2"), new_videos=("data/mine/videos/shrink/shrink_0.mp4",))
    text = as_bash(folder_steps(Layout.under("data/mine"), options))
    expected = {"flow": 3, "extract": 3}  # the broken video fails in flow and both extractions
    codes = []
    for argv in parse_commands(text):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = eleatt(argv)
        codes.append((argv[0] if argv[0] != "prepare" else f"prepare {argv[1]}", code))
        assert code == (3 if argv[:2] == ["prepare", "filter"] else expected.get(argv[0], 0)), (argv, out.getvalue())
    assert [c for c, _ in codes] == ["prepare folder", "flow", "extract", "extract", "prepare filter", "fit", "fit",
                                     "validate", "test", "validate", "test", "fuse", "classify"]
    problems = [json.loads(line) for line in Path("data/mine/lists-ok/problems.jsonl").read_text().splitlines()]
    assert [(p["video"], p["stage"]) for p in problems] == [("grow/broken.mp4", "flow")]
    test = [e.path for e in read_list("data/mine/lists-ok/test.txt")]
    for stream in ("rgb", "flow"):
        assert list(read_scores(f"checkpoints/mine-{stream}/scores_test.npz")["videos"]) == test
    assert Path("checkpoints/mine-fused.npz").is_file()
    assert shlex.split(text.splitlines()[1])[:3] == ["eleatt", "prepare", "folder"]
