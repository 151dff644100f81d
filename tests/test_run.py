"""`eleatt run` on a folder of your own videos (pipeline/run.py): every stage through its command, one policy for bad
inputs (a video that fails anywhere is left out of both streams, listed with its stage and reason, exit 3), the
report, resuming and refusing other settings, and the demo's log sent to a file."""
from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest

from pipeline.cli import main as eleatt
from pipeline.data.lists import read_list
from pipeline.evaluation.scores import read_scores
from tests.helpers import make_video_folder

BAD = {"brighten/twin.avi": "prepare", "brighten/twin.mp4": "prepare", "grow/damaged.mp4": "flow",
       "shrink/one_frame.mp4": "flow"}


def run_eleatt(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = eleatt(argv)
        except SystemExit as stop:  # the parser's own errors (argparse's exit 2)
            code = stop.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """`eleatt run` once on a generated folder of 3 classes x 4 videos plus a damaged video, a one-frame video, a
    same-stem pair (twin.avi, twin.mp4) and a video with a 90-degree display rotation."""
    root = tmp_path_factory.mktemp("mine")
    folder = make_video_folder(root / "videos")
    out = root / "run"
    argv = ["run", "--videos", str(folder["root"]), "--out", str(out), "--backbone", "test_resnet", "--weights",
            "none", "--stack", "2", "--epochs", "2", "--train-config", "tiny", "--workers", "1", "--short-side", "0"]
    code, stdout, stderr = run_eleatt(argv)
    return {**folder, "out": out, "argv": argv, "code": code, "stdout": stdout, "stderr": stderr}


def test_a_run_with_bad_videos_finishes_with_both_streams_on_the_same_videos(mine):
    out, stdout = mine["out"], mine["stdout"]
    assert mine["code"] == 3, mine["stderr"][-3000:]
    # the problems file names each bad video once, with the stage where it failed and the reason
    problems = [json.loads(line) for line in (out / "lists-ok" / "problems.jsonl").read_text().splitlines()]
    assert {p["video"]: p["stage"] for p in problems} == BAD
    reasons = {p["video"]: p["reason"] for p in problems}
    assert "not a video FFmpeg can read" in reasons["grow/damaged.mp4"]
    assert "1 frame(s)" in reasons["shrink/one_frame.mp4"]
    assert "'brighten/twin.mp4'" in reasons["brighten/twin.avi"] and "'brighten/twin.avi'" in reasons["brighten/twin.mp4"]
    assert "4 video(s) left out of every stream" in stdout
    assert stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    # the lists both streams used: every good video (the rotated one too), none of the bad ones
    lists = {s: [e.path for e in read_list(out / "lists-ok" / f"{s}.txt")] for s in ("train", "val", "test", "all")}
    assert len(lists["all"]) == 13 and not set(BAD) & set(lists["all"]) and mine["rotated"] in lists["all"]
    assert sorted(lists["all"]) == sorted(lists["train"] + lists["val"] + lists["test"])
    for split, stage in (("val", "val"), ("test", "test")):
        rgb = read_scores(out / "checkpoints" / "rgb" / f"scores_{stage}.npz")
        flow = read_scores(out / "checkpoints" / "flow" / f"scores_{stage}.npz")
        assert list(rgb["videos"]) == list(flow["videos"]) == lists[split]
    assert list(read_scores(out / "fused_test.npz")["videos"]) == lists["test"]
    for stream in ("rgb", "flow"):  # trained on the same list, the filtered one
        config = (out / "checkpoints" / stream / "config.yaml").read_text()
        assert f"train_list: {out / 'lists-ok' / 'train.txt'}" in config
    # one line per epoch naming the stream, no progress bars in a captured output
    assert re.findall(r"^(rgb|flow) epoch (\d)/2: train/loss", stdout, re.M) == [
        ("rgb", "1"), ("rgb", "2"), ("flow", "1"), ("flow", "2")]
    assert "\r" not in stdout + mine["stderr"] and "it/s]" not in stdout + mine["stderr"]


def test_the_report_lists_the_videos_left_out_and_the_commands_it_ran(mine):
    out = mine["out"]
    assert (out / "report.html").is_file()
    markdown = (out / "report.md").read_text()
    left = markdown.split("## Videos left out", 1)[1].split("##", 1)[0]
    for video, stage in BAD.items():
        assert f"| {video} | {stage} |" in left
    reproduce = markdown.split("## Reproduce", 1)[1]
    commands = re.findall(r"^eleatt (\w+)", reproduce, re.M)
    assert commands == ["prepare", "flow", "extract", "extract", "prepare", "fit", "fit", "validate", "test",
                        "validate", "test", "fuse", "classify"]
    weights = read_scores(out / "fused_test.npz")["weights"].tolist()
    assert (f"--ckpt {out / 'checkpoints' / 'rgb' / 'best.ckpt'} {out / 'checkpoints' / 'flow' / 'best.ckpt'} "
            f"--weights {weights[0]:g} {weights[1]:g}") in " ".join(reproduce.replace("\\\n", " ").split())
    assert f"eleatt prepare filter --lists {out / 'lists'}" in reproduce
    for name in ("curves.png", "confusion_rgb.png", "confusion_flow.png", "confusion_fused.png", "attention.png"):
        assert (out / name).is_file() and f"]({name})" in markdown


def test_a_rerun_resumes_and_other_settings_are_refused(mine):
    out = mine["out"]
    best = (out / "checkpoints" / "rgb" / "best.ckpt").read_bytes()
    state = json.loads((out / "run.json").read_text())
    assert state["done"][:7] == ["lists", "flow", "extract-rgb", "extract-flow", "filter", "fit-rgb", "fit-flow"]
    # as if the flow stream's training had been stopped: its stage is not recorded as finished
    (out / "run.json").write_text(json.dumps({**state, "done": [d for d in state["done"] if d != "fit-flow"]}))
    code, stdout, _ = run_eleatt(mine["argv"])
    assert code == 3
    assert stdout.count("done in an earlier run (kept)") == 5  # lists, flow, 2 extractions, the RGB fit
    assert f"resuming flow from {out / 'checkpoints' / 'flow' / 'last.ckpt'}" in stdout  # its latest epoch
    assert (out / "checkpoints" / "rgb" / "best.ckpt").read_bytes() == best  # not trained again
    assert "4 video(s) left out" in stdout
    code, _, stderr = run_eleatt([*mine["argv"], "--epochs", "3", "--streams", "rgb"])
    assert code == 2
    assert stderr.count("\n") == 1 and "--epochs 2 (asked now: 3)" in stderr and "--streams rgb,flow (asked now: rgb)" in stderr


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_the_rotated_video_comes_out_in_display_orientation(mine, backend):
    """The video stored 32 wide x 40 high with a 90-degree display matrix is shown 40 x 32: FFmpeg (and a player)
    show frame t as np.rot90(stored[t]) (counter-clockwise); every backend must give those frames."""
    from pipeline.data.video import load_frames, probe

    path = mine["root"] / mine["rotated"]
    stored = mine["rotated_frames"]  # (T, 40, 32, 3) as stored
    shown = np.rot90(stored, 1, axes=(1, 2))  # (T, 32, 40, 3) as displayed
    info = probe(path)
    assert stored.shape[1:] == (40, 32, 3) and (info.width, info.height) == (40, 32)
    np.testing.assert_array_equal(np.asarray(load_frames(path, np.arange(len(stored)), backend=backend)), shown)


def test_decord_is_refused_on_the_rotated_video_by_name(mine):
    """decord 0.6 garbles quarter turns: asked for by name on a rotated file, it is refused naming the file and the
    backends that read it (auto never picks it there)."""
    from pipeline.data.video import VideoReadError, load_frames

    path = mine["root"] / mine["rotated"]
    with pytest.raises(VideoReadError, match=f"^{path}: decord mis-decodes videos with a display rotation \\(this one "
                                             "is turned 90 degrees\\); use backend='auto', 'pyav' or 'torchcodec'$"):
        load_frames(path, [0], backend="decord")


def test_ctrl_c_names_the_command_that_resumes(tmp_path, monkeypatch):
    import pipeline.run

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.run, "invoke", interrupted)
    (tmp_path / "videos" / "a").mkdir(parents=True)
    argv = ["run", "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "my run")]
    code, _, stderr = run_eleatt(argv)
    assert code == 130 and stderr.count("\n") == 1
    assert f"finished stages are kept in {tmp_path / 'my run'}" in stderr
    assert f"resume with: eleatt run --videos {tmp_path / 'videos'} --out '{tmp_path / 'my run'}'" in stderr


@pytest.mark.parametrize("args, message", [
    (["--streams", "rgb,depth"], "'rgb,depth': a comma-separated choice of rgb, flow"),
    (["--train-config", "no_such_config"], "--train-config no_such_config: no such file, and no packaged config"),
    (["--epochs", "0"], "--epochs 0: both must be at least 1"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    (tmp_path / "videos").mkdir()
    code, _, stderr = run_eleatt(["run", "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "o"), *args])
    assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr


def test_missing_videos_and_an_out_inside_them_are_refused(tmp_path):
    code, _, stderr = run_eleatt(["run", "--videos", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2 and f"--videos '{tmp_path / 'nowhere'}' is not a folder" in stderr
    (tmp_path / "videos").mkdir()
    code, _, stderr = run_eleatt(["run", "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "videos" / "r")])
    assert code == 2 and "lies inside --videos" in stderr


def test_the_demo_log_sent_to_a_file_is_short(quick_demo):
    """`eleatt demo --quick > log 2>&1`: one line per stage and per epoch, the stream named, no progress bars; the
    full demo adds 2 x 36 epoch lines to it (40 epochs instead of 4), and must stay under ~150 lines."""
    log = quick_demo["stdout"]
    lines = log.splitlines()
    assert "\r" not in log and "it/s" not in log and "━" not in log and "─" not in log
    assert re.findall(r"^(rgb|flow) epoch (\d)/4:", log, re.M) == [(s, str(k)) for s in ("rgb", "flow") for k in range(1, 5)]
    assert len(lines) + 2 * 36 < 150, len(lines)
    for stage in ("val", "test"):  # each metric line names its run
        assert len(re.findall(rf"^{stage}: top1 .* labelled\), run '(rgb|flow)'$", log, re.M)) == 2


def test_lists_of_your_own_and_one_stream(mine, tmp_path):
    """--lists: the given lists (here the first run's filtered ones, without val.txt: one is held out) through
    prepare's checks; --streams rgb: no flow, no fusion, six stages."""
    import shutil

    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("train.txt", "test.txt", "classes.txt"):
        shutil.copy(mine["out"] / "lists-ok" / name, lists / name)
    argv = ["run", "--videos", str(mine["root"]), "--lists", str(lists), "--out", str(tmp_path / "run"),
            "--streams", "rgb", "--backbone", "test_resnet", "--weights", "none", "--epochs", "1", "--train-config",
            "tiny", "--val-fraction", "0.25"]
    code, stdout, stderr = run_eleatt(argv)
    assert code == 0, stderr[-2000:]
    assert re.findall(r"^== \[(\d)/6\] (\w+)", stdout, re.M) == [
        ("1", "lists"), ("2", "extract"), ("3", "fit"), ("4", "validate"), ("5", "classify"), ("6", "report")]
    out = tmp_path / "run"
    given = [e.path for e in read_list(lists / "train.txt")]
    used = {s: [e.path for e in read_list(out / "lists-ok" / f"{s}.txt")] for s in ("train", "val", "test")}
    assert sorted(used["train"] + used["val"]) == sorted(given) and used["val"]  # val held out of the given train
    assert used["test"] == [e.path for e in read_list(lists / "test.txt")]
    assert not (out / "flow").exists() and not (out / "fused_test.npz").exists() and (out / "report.html").is_file()
    assert (lists / "train.txt").read_text() == (mine["out"] / "lists-ok" / "train.txt").read_text()  # not rewritten
