"""The hostile round of issue 28, one test per bad case: outputs never replace inputs, folders are locked, every file
read is validated before use (one line naming the file and the fix, exit 2 or 3; never a traceback or a silent NaN),
and memory stays bounded whatever the input's shape or the options."""
from __future__ import annotations

import json
import os
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as eleatt
from pipeline.data import flow_estimation
from pipeline.data.features import FeatureFolder
from pipeline.data.flow_files import FlowFileError, FlowFolder, FlowOptions, flow_folder_settings, load_flow
from pipeline.errors import UserError
from pipeline.evaluation.scores import write_scores
from pipeline.nn.classifier import SequenceClassifier
from pipeline.trained.record import RECORD_KEY, TrainedStream
from preprocessing.synthetic import write_lossless_video


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"eleatt {command}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _checkpoint(path: Path, dim: int = 8, classes: int = 3) -> Path:
    """A checkpoint with a trained-stream record and a small classifier's weights, as `eleatt fit` writes them."""
    torch.manual_seed(0)
    net = SequenceClassifier(input_size=dim, num_classes=classes, hidden_size=6)
    record = TrainedStream(network=net.config, class_names=[f"c{i}" for i in range(classes)])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, RECORD_KEY: record.to_dict()},
               path)
    return path


def _levels(pairs: int = 3, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (pairs, 2, h, w), dtype=np.uint8)


def _rezip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


# ------------------------------------------------------------------------------------------------ outputs vs inputs
@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("exported", ".pt2"), ("torchscript", ".ts")])
def test_export_refuses_to_overwrite_its_checkpoint(tmp_path, capsys, fmt, suffix):
    ckpt = _checkpoint(tmp_path / "run" / "best.ckpt")
    before = ckpt.read_bytes()
    assert eleatt(["export", "--ckpt", str(ckpt), "--out", str(ckpt), "--format", fmt]) == 2
    assert f"--out '{ckpt}' is one of the input files" in _one_line_error(capsys, "export")
    # nor may the description file written beside --out (--out + .json)
    desc = tmp_path / "run" / f"model{suffix}.json"
    desc.write_bytes(before)
    assert eleatt(["export", "--ckpt", str(desc), "--out", str(desc)[:-5], "--format", fmt]) == 2
    assert "--out's description file (--out + .json)" in _one_line_error(capsys, "export")
    assert ckpt.read_bytes() == before == desc.read_bytes()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.ckpt", f"model{suffix}.json"]


def test_export_names_the_checkpoint_it_refuses(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "best.ckpt")
    os.link(ckpt, tmp_path / "copy.ckpt")  # the same file under another name
    assert eleatt(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "copy.ckpt"), "--format", "torchscript"]) == 2
    err = _one_line_error(capsys, "export")
    assert f"--out '{tmp_path / 'copy.ckpt'}' is one of the input files ('{ckpt}')" in err


def test_export_out_that_is_a_folder_is_one_line(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "best.ckpt")
    (tmp_path / "models").mkdir()
    assert eleatt(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "models"), "--format", "torchscript"]) == 2
    assert f"--out '{tmp_path / 'models'}' is an existing folder, not a file" in _one_line_error(capsys, "export")
    assert list((tmp_path / "models").iterdir()) == []


def test_export_writes_its_model_file_whole_or_not_at_all(tmp_path, monkeypatch):
    from pipeline.serving import export

    ckpt = _checkpoint(tmp_path / "best.ckpt")
    out = tmp_path / "model.ts"
    out.write_bytes(b"the earlier export")

    class Half:
        def save(self, path):
            Path(path).write_bytes(b"half a model")
            raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_scripted", lambda module, example: Half())
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_checkpoint(ckpt, out, fmt="torchscript")
    assert out.read_bytes() == b"the earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "model.ts"]  # no temporary left


# ------------------------------------------------------------------------------------------------ fuse
def _scores(path: Path, scores, labels, classes=("a", "b", "c")) -> str:
    scores = np.asarray(scores, dtype=np.float32)
    write_scores(path, [f"v{i}.mp4" for i in range(len(scores))], scores, np.asarray(labels), list(classes))
    return str(path)


@pytest.fixture
def two_scores(tmp_path) -> tuple[str, str]:
    good = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]
    return _scores(tmp_path / "rgb.npz", good, [0, 1]), _scores(tmp_path / "flow.npz", good, [0, 1])


@pytest.mark.parametrize("bad,count", [(np.nan, 1), (np.inf, 1), (-np.inf, 2)])
def test_fuse_refuses_non_finite_scores_before_writing(tmp_path, capsys, two_scores, bad, count):
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    scores[0, 1] = bad
    if count == 2:
        scores[1, 2] = bad
    nan_file = _scores(tmp_path / "nan.npz", scores, [0, 1])
    assert eleatt(["fuse", "--scores", two_scores[0], nan_file, "--out", str(tmp_path / "fused.npz")]) == 2
    err = _one_line_error(capsys, "fuse")
    assert f"'{nan_file}': {count} of its 2x3 scores are NaN or infinite" in err
    assert not (tmp_path / "fused.npz").exists() and not (tmp_path / "confusion_fused.png").exists()


@pytest.mark.parametrize("label", [3, 7, -2])
def test_fuse_refuses_a_label_outside_the_classes_before_writing(tmp_path, capsys, two_scores, label):
    bad = _scores(tmp_path / "bad.npz", [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], [0, label])
    assert eleatt(["fuse", "--scores", two_scores[0], bad, "--out", str(tmp_path / "fused.npz")]) == 2
    err = _one_line_error(capsys, "fuse")
    assert f"video 'v1.mp4' has label {label}, outside the 3 classes (0..2, or -1 for unknown)" in err
    assert not (tmp_path / "fused.npz").exists()


def test_fuse_out_that_is_a_folder_names_the_folder(tmp_path, capsys, two_scores):
    (tmp_path / "fused").mkdir()
    assert eleatt(["fuse", "--scores", *two_scores, "--out", str(tmp_path / "fused")]) == 2
    err = _one_line_error(capsys, "fuse")
    assert f"--out '{tmp_path / 'fused'}' is an existing folder, not a file" in err and ".eleatt-tmp" not in err
    assert list((tmp_path / "fused").iterdir()) == []


def test_fuse_plot_that_is_an_input_is_refused(tmp_path, capsys, two_scores):
    assert eleatt(["fuse", "--scores", *two_scores, "--out", str(tmp_path / "f.npz"), "--plot", two_scores[1]]) == 2
    assert "--plot" in _one_line_error(capsys, "fuse")
    assert not (tmp_path / "f.npz").exists()


# ------------------------------------------------------------------------------------------------ flow folders
@pytest.fixture
def flow_folder(tmp_path) -> FlowFolder:
    folder = FlowFolder(tmp_path / "flow")
    folder.check_settings(flow_folder_settings(FlowOptions()))
    folder.write_quantized("cls/a.mp4", _levels(), 20.0)
    return folder


@pytest.mark.parametrize("escape", ["../outside/x.flow.zip", "ABSOLUTE", "symlink"])
def test_a_manifest_path_never_leads_outside_the_flow_folder(tmp_path, capsys, flow_folder, escape):
    outside = tmp_path / "outside"
    outside.mkdir()
    FlowFolder(outside).write_quantized("x.mp4", _levels(pairs=2), 20.0)  # a valid flow file, outside the folder
    if escape == "symlink":  # the record is right, but its file is a link out of the folder
        (flow_folder.root / "evil.flow.zip").symlink_to(outside / "x.flow.zip")
        record = {"video": "evil.mp4", "feature": "evil.flow.zip", "pairs": 2}
    else:
        feature = str(outside / "x.flow.zip") if escape == "ABSOLUTE" else escape
        record = {"video": "cls/evil.mp4", "feature": feature, "pairs": 2}
    with open(flow_folder.manifest_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    assert set(flow_folder.finished()) == {"cls/a.mp4"} == set(flow_folder.finished(verify=False))
    dest = tmp_path / "jpg"
    assert eleatt(["flow", "--out", str(flow_folder.root), "--export-jpg", str(dest), "--no-progress"]) == 3
    out = capsys.readouterr().out
    assert "1 exported" in out and "failed: " in out and "evil.mp4" in out
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.jpg")) == [
        f"cls/a/{c}_{i:05d}.jpg" for c in "xy" for i in (1, 2, 3)]
    assert sorted(p.name for p in outside.iterdir()) == [".eleatt-tmp", "manifest.jsonl", "x.flow.zip"]
    assert [p for p in tmp_path.rglob("*.jpg") if dest not in p.parents] == []


def test_a_zip_bomb_fails_before_inflating(tmp_path):
    """A deflated member that would inflate to 200 MB: refused from the directory alone, in milliseconds."""
    path = tmp_path / "bomb.flow.zip"
    meta = {"format": "eleatt-flow-png-zip", "version": 1, "bound": 20.0, "pairs": 1, "height": 6, "width": 5}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("meta.json", json.dumps(meta), compress_type=zipfile.ZIP_STORED)
        with z.open("000000.png", "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(200):
                f.write(block)
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(FlowFileError, match=r"member '000000.png' is compressed or encrypted.*zip bomb"):
            load_flow(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20 and time.perf_counter() - start < 1.0


def test_a_stored_member_larger_than_a_frame_is_refused(tmp_path, flow_folder):
    """Declared sizes are bounded by the frame size in meta.json (6x5: a PNG of at most ~4.2 KB), before reading."""
    path = flow_folder.existing("cls/a.mp4")
    members = _members(path)
    members["000001.png"] = members["000001.png"] + bytes(20_000)
    _rezip(path, members)
    with pytest.raises(FlowFileError, match=f"'{path}': member '000001.png' declares 20[0-9]+ bytes, more than a PNG"):
        load_flow(path)


@pytest.mark.parametrize("key,value,message", [
    ("bound", 1e39, "bound 1e\\+39 is not a number of pixels in \\(0, 10000\\)"),
    ("bound", -3.0, "bound -3.0 is not a number of pixels"),
    ("pairs", "x", "pairs x, height 6, width 5 are not counts in range"),
    ("pairs", None, "pairs None"),
    ("height", 10**9, "height 1000000000"),
    ("fps", float("nan"), "fps nan is not a positive frame rate"),
    ("format", "other", "not a flow file \\(format 'other'"),
])
def test_a_damaged_flow_header_is_one_error_naming_the_file(flow_folder, key, value, message):
    path = flow_folder.existing("cls/a.mp4")
    members = _members(path)
    meta = json.loads(members["meta.json"])
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    members["meta.json"] = json.dumps(meta).encode()
    _rezip(path, members)
    with pytest.raises(FlowFileError, match=message) as err:
        load_flow(path)
    assert str(err.value).startswith(f"'{path}'") and "\n" not in str(err.value)
    assert "rerun `eleatt flow`" in str(err.value) or "upgrade" in str(err.value)


def test_a_png_whose_header_claims_another_size_is_not_decoded(flow_folder, monkeypatch):
    import cv2

    path = flow_folder.existing("cls/a.mp4")
    members = _members(path)
    ok, big = cv2.imencode(".png", np.zeros((2 * 6, 500), np.uint8))  # right height, wrong width
    members["000002.png"] = big.tobytes()[:4000]
    _rezip(path, members)
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(1))
    with pytest.raises(FlowFileError, match="flow pair 2 is damaged \\(not an 8-bit grey PNG of 12x5\\)"):
        load_flow(path, [2])
    assert decoded == []


def test_a_second_flow_run_into_the_same_folder_is_refused(tmp_path, capsys):
    root = tmp_path / "videos"
    write_lossless_video(root / "a.mp4", np.random.default_rng(0).integers(0, 255, (3, 40, 48, 3), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("a.mp4 0\n")
    out = tmp_path / "flow"
    args = ["flow", "--list", str(tmp_path / "list.txt"), "--root", str(root), "--out", str(out), "--workers", "1",
            "--no-progress"]
    with FlowFolder(out).lock("flow"):  # the first run, at work
        in_flight = out / ".eleatt-tmp" / ".eleatt-tmp.first-run.part"
        in_flight.parent.mkdir()
        in_flight.write_bytes(b"half")
        assert eleatt(args) == 2
        err = _one_line_error(capsys, "flow")
        assert f"flow folder '{out}' is being written by `eleatt flow` (pid {os.getpid()} on " in err
        assert in_flight.read_bytes() == b"half" and not (out / "manifest.jsonl").exists()
    assert eleatt(args) == 0  # released: the run goes on, once
    capsys.readouterr()
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 1
    dest = tmp_path / "jpg"
    assert eleatt(["flow", "--out", str(out), "--export-jpg", str(dest), "--no-progress"]) == 0
    capsys.readouterr()
    for held, extra in ((out, ["--import-jpg", str(dest)]), (dest, ["--export-jpg", str(dest)])):
        with FeatureFolder(held).lock("someone"):
            assert eleatt(["flow", "--out", str(out), *extra, "--no-progress"]) == 2
            assert f"'{held}' is being written by `eleatt someone`" in _one_line_error(capsys, "flow")


def test_flow_refuses_an_export_folder_inside_the_flow_folder(tmp_path, capsys, flow_folder):
    assert eleatt(["flow", "--out", str(flow_folder.root), "--export-jpg", str(flow_folder.root / "jpg")]) == 2
    assert "is inside the input" in _one_line_error(capsys, "flow")
    assert not (flow_folder.root / "jpg").exists()


# ------------------------------------------------------------------------------------------------ optical flow bounds
@pytest.mark.parametrize("h,w,short,expected", [
    (16, 4000, 256, (16, 4000)),  # upscaling by 16 would give 256x64000: the long side is capped at 4 x 256
    (16, 500, 256, (33, 1024)),  # scaled up by 1024 / 500 only
    (1, 1, 256, (256, 256)),
    (240, 320, 256, (256, 341)),
    (2160, 3840, 256, (256, 455)),  # scaling down is not capped
    (32, 8000, 16, (16, 4000)),
])
def test_upscaling_for_flow_stops_at_four_times_the_short_side(h, w, short, expected):
    assert flow_estimation.target_size(h, w, short) == expected


def test_a_4000x16_video_keeps_its_size_and_dis_refuses_it_in_one_line(tmp_path, capsys):
    root = tmp_path / "videos"
    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 4000, 3), dtype=np.uint8)
    write_lossless_video(root / "strip.mp4", frames)
    write_lossless_video(root / "ok.mp4", np.random.default_rng(1).integers(0, 255, (3, 40, 48, 3), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("strip.mp4 0\nok.mp4 0\n")
    base = ["flow", "--list", str(tmp_path / "list.txt"), "--root", str(root), "--workers", "1", "--no-progress"]
    assert eleatt([*base, "--out", str(tmp_path / "dis")]) == 3
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "failed: strip.mp4" in line)
    assert "its frames are 4000x16; dis needs at least 32x32" in line and "--method farneback" in line
    assert "1 done" in out  # the other video is computed
    assert eleatt([*base, "--out", str(tmp_path / "fb"), "--method", "farneback"]) == 0
    capsys.readouterr()
    q = load_flow(FlowFolder(tmp_path / "fb").existing("strip.mp4"))
    assert q.shape == (3, 2, 16, 4000)  # not 256x64000


@pytest.mark.parametrize("h,w", [(1, 1), (8, 100), (12, 100), (20, 20)])
def test_frames_too_small_for_dis_are_one_line_not_an_opencv_crash(tmp_path, h, w):
    """OpenCV's DIS raises on frames under 12 px and crashes (segfault) on frames under 32 px high and wider: such
    frames are refused before DIS sees them, naming the video and the minimum size."""
    path = tmp_path / "tiny.mp4"
    write_lossless_video(path, np.random.default_rng(0).integers(0, 255, (3, h, w, 3), dtype=np.uint8))
    estimator = flow_estimation.OpenCVFlow("dis")
    with pytest.raises(UserError, match=f"'{path}': its frames are {w}x{h}; dis needs at least 32x32"):
        list(flow_estimation.video_flow(path, estimator, short_side=None, bound=20.0))
    q = list(flow_estimation.video_flow(path, estimator, short_side=256, bound=20.0))  # scaled up: computed
    assert len(q) == 2 and min(q[0].shape[1:]) >= 32


def test_an_opencv_error_on_a_video_becomes_one_line_naming_it(tmp_path, monkeypatch):
    import cv2

    path = tmp_path / "v.mp4"
    write_lossless_video(path, np.random.default_rng(0).integers(0, 255, (3, 40, 48, 3), dtype=np.uint8))
    estimator = flow_estimation.OpenCVFlow("farneback")

    def fails(images):
        raise cv2.error("OpenCV(5.1.0) /io/opencv/modules/x.cpp:1: error: (-215:Assertion failed)\n  in 'calc'\n")
        yield

    monkeypatch.setattr(estimator, "flows", fails)
    with pytest.raises(UserError, match=f"^'{path}': OpenCV failed on its 48x40 frames \\(in 'calc'\\); ") as err:
        list(flow_estimation.video_flow(path, estimator, short_side=None, bound=20.0))
    assert "\n" not in str(err.value)


def test_decoded_chunks_shrink_for_frames_scaled_up(tmp_path, monkeypatch):
    """Memory holds `decode_bytes` of frames at the larger of the decoded and the target size: 16x16 frames scaled
    to 256x256 come 4 at a time at 4 x 256 x 256 x 3 bytes, not 1024 (the decoded size's share)."""
    from pipeline.data import video

    path = tmp_path / "v.mp4"
    write_lossless_video(path, np.random.default_rng(0).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8))
    sizes = []
    real = video.read_frames
    monkeypatch.setattr(video, "read_frames", lambda p, idx, **kw: sizes.append(len(idx)) or real(p, idx, **kw))
    flows = list(flow_estimation.video_flow(path, flow_estimation.OpenCVFlow("farneback"), 256, 20.0,
                                            decode_bytes=4 * 256 * 256 * 3))
    assert sizes == [4, 4, 2] and len(flows) == 9


# ------------------------------------------------------------------------------------------------ extract --stack
def test_extract_refuses_a_flow_stack_beyond_the_memory_bound(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("a.mp4 0\n")
    args = ["extract", "--modality", "flow", "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path),
            "--out", str(tmp_path / "feats"), "--backbone", "test_resnet", "--weights", "none"]
    assert eleatt([*args, "--stack", "1000"]) == 2
    err = capsys.readouterr().err
    assert "--stack 1000: at most 32 flow fields per input" in err and err.count("\n") == 1
    assert not (tmp_path / "feats").exists()


def test_longer_flow_stacks_read_fewer_positions_at_once():
    """A chunk holds as many flow fields whatever the stack: 64 positions of 5 fields, 10 of 32, 64 of 1."""
    from preprocessing.extract import FrameBatches
    from pipeline.data.features import FeatureSettings

    def chunk(stack):
        settings = FeatureSettings(modality="flow", in_chans=2 * stack, stack=stack)
        return FrameBatches("/nonexistent", [], settings).chunk

    assert [chunk(5), chunk(32), chunk(1), chunk(6)] == [64, 10, 64, 53]


# ------------------------------------------------------------------------------------------------ poor messages
def test_prepare_ntu_skeleton_on_an_empty_folder_names_its_own_option(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert eleatt(["prepare", "ntu-skeleton", "--skeletons", str(tmp_path / "empty"), "--out",
                   str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys, "prepare")
    assert "no NTU files named SsssCcccPpppRrrrAaaa.skeleton" in err and "(check --skeletons" in err
    assert "--videos" not in err and "--suffix" not in err


class _Pickled:
    """A class in a pickle: weights-only loading refuses it."""


def test_no_message_advises_unpickling_a_file(tmp_path, capsys):
    from pipeline.data.flow_estimation import build_raft
    from pipeline.nn.backbone import load_weights_file

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Pickled()}, evil)
    assert eleatt(["export", "--ckpt", str(evil), "--out", str(tmp_path / "m.ts"), "--format", "torchscript"]) == 2
    messages = [_one_line_error(capsys, "export")]
    for load in (lambda: build_raft(evil), lambda: load_weights_file(torch.nn.Linear(2, 2), evil)):
        with pytest.raises(UserError) as err:
            load()
        messages.append(str(err.value))
    for message in messages:
        assert str(evil) in message and "never unpickled" in message
        assert "weights_only=False" not in message and "Weights only load failed" not in message, message


def test_visualize_refuses_non_finite_features(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run" / "best.ckpt")
    feats = np.ones((5, 8), np.float32)
    feats[2, 3] = np.nan
    np.save(tmp_path / "v.npy", feats)
    np.save(tmp_path / "all.npy", np.full((5, 8), np.nan, np.float32))
    np.save(tmp_path / "inf.npy", np.where(np.eye(5, 8) > 0, np.inf, 1.0).astype(np.float32))
    for name, count in (("v.npy", 1), ("all.npy", 40), ("inf.npy", 5)):
        assert eleatt(["visualize", "--ckpt", str(ckpt), "--features", str(tmp_path / name)]) == 2
        err = _one_line_error(capsys, "visualize")
        assert f"'{tmp_path / name}': {count} of its 40 feature values are NaN or infinite" in err
    assert not (tmp_path / "run" / "visualize").exists() or not list((tmp_path / "run" / "visualize").iterdir())


def test_plots_and_pictures_never_overwrite_their_inputs(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "v_probabilities.png")  # a checkpoint named like visualize's picture
    np.save(tmp_path / "v.npy", np.ones((4, 8), np.float32))
    before = ckpt.read_bytes()
    assert eleatt(["visualize", "--ckpt", str(ckpt), "--features", str(tmp_path / "v.npy"), "--out",
                   str(tmp_path)]) == 2
    assert f"output '{ckpt}' is one of the input files" in _one_line_error(capsys, "visualize")
    assert eleatt(["classify", "--stream", str(tmp_path / "v.npy"), "--ckpt", str(ckpt), "--plot", str(ckpt)]) == 2
    assert f"--plot '{ckpt}' is one of the input files" in _one_line_error(capsys, "classify")
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["v.npy", ckpt.name]


# ------------------------------------------------------------------------------------------------ bounds of what is read
@pytest.mark.parametrize("change,message", [
    (dict(stack=33, in_chans=64), "stack 33 is beyond 32"),
    (dict(dim=65537), "dim 65537 is beyond 65536"),
    (dict(data_config={"input_size": [3, 4097, 224], "mean": [0.5] * 3, "std": [0.5] * 3}), "input_size must be"),
    (dict(data_config={"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}), "std must be positive"),
    (dict(data_config={"input_size": [3, 224, 224], "mean": [0.5, float("nan"), 0.5], "std": [0.5] * 3}),
     "mean must be a list of finite numbers"),
    (dict(data_config={"input_size": [3, 224, 224], "crop_pct": 0.0}), "crop_pct must be a number in \\(0, 10\\]"),
])
def test_settings_values_out_of_range_are_refused(change, message):
    from pipeline.data.features import FeatureSettings, SettingsFormatError

    FeatureSettings(modality="flow", stack=32, in_chans=64, dim=65536,
                    data_config={"input_size": [64, 4096, 224], "mean": [0.5] * 64, "std": [0.5] * 64,
                                 "crop_pct": 10.0})  # the limits themselves are accepted
    with pytest.raises(SettingsFormatError, match=message):
        FeatureSettings(**{"modality": "flow", **change})


def test_an_oversized_settings_file_is_refused_unread(tmp_path):
    from pipeline.data.features import FeatureFolder, SettingsFormatError

    (tmp_path / "f").mkdir()
    with open(tmp_path / "f" / "settings.json", "wb") as f:
        f.truncate((1 << 20) + 1)  # sparse: a 1 MB + 1 byte file of zeros
    with pytest.raises(SettingsFormatError, match=r"settings.json' is 1048577 bytes, not a settings file"):
        FeatureFolder(tmp_path / "f").settings


def test_extract_refuses_an_out_that_is_its_root(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("a.mp4 0\n")
    assert eleatt(["extract", "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path), "--out", str(tmp_path),
                   "--backbone", "test_resnet", "--weights", "none"]) == 2
    assert f"--out feature folder '{tmp_path}' is one of the input folders" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt"]


def test_flow_frames_larger_than_a_flow_file_are_refused_before_decoding(tmp_path, monkeypatch):
    from pipeline.data import video

    path = tmp_path / "v.mp4"
    write_lossless_video(path, np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3), dtype=np.uint8))
    monkeypatch.setattr(video, "load_frames", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(UserError, match=f"'{path}': its frames are 4100x4100 \\(decoded 20x20, short side 4100\\), "
                                        "larger than a flow file holds"):
        list(flow_estimation.video_flow(path, flow_estimation.OpenCVFlow("farneback"), 4100, 20.0))
    from pipeline.data.flow_files import FlowWriter

    with pytest.raises(UserError, match="flow frames of 4097x4097 are larger than a flow file holds"):
        FlowWriter(tmp_path / "x.flow.zip").add(np.zeros((2, 4097, 4097), np.uint8))


def test_a_record_claiming_a_larger_network_than_its_weights_is_not_built(tmp_path, monkeypatch):
    from pipeline.trained.load import load_stream
    from pipeline.trained.record import StreamRecordError

    # hidden 6, input 8, 3 classes, one EleAtt-LSTM layer: W_ih 24x8, W_hh 24x6, two biases of 24, the gate's W_xa
    # 8x8, W_ha 8x6 and bias 8, the head 3x6 + 3: 525 weights
    path = _checkpoint(tmp_path / "best.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint[RECORD_KEY]["network"]["hidden_size"] = 30  # needs >= 30 * 30 + 30 * 3 + 8 = 998 weights
    torch.save(checkpoint, path)
    monkeypatch.setattr(SequenceClassifier, "__init__", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(StreamRecordError, match=f"'{path}': bad weights: the record describes a network of at least "
                                                "998 weights but the checkpoint holds 525"):
        load_stream(path)


def test_skeleton_files_beyond_the_bounds_are_refused_unread(tmp_path):
    from pipeline.data.skeleton import SkeletonFormatError, load_skeleton

    path = tmp_path / "S001C001P001R001A001.skeleton"
    path.write_text("20001\n" + "0\n" * 20001)
    with pytest.raises(SkeletonFormatError, match=r"A001\.skeleton:1: expected the frame count \(an integer in "
                                                  r"0\.\.20000\), got '20001'"):
        load_skeleton(path)
    with open(path, "wb") as f:
        f.truncate(32 * 2**20 + 1)  # sparse
    with pytest.raises(SkeletonFormatError, match="33554433 bytes, more than a skeleton file holds \\(32 MB at most"):
        load_skeleton(path)


def test_a_jpeg_larger_than_a_flow_frame_is_refused_from_its_header(tmp_path, capsys, monkeypatch):
    import cv2

    src = tmp_path / "jpg" / "clip"
    src.mkdir(parents=True)
    for name, size in (("x_00001.jpg", (8, 8200)), ("y_00001.jpg", (8, 8200))):  # 8200 px wide: beyond 8192
        cv2.imwrite(str(src / name), np.zeros(size, np.uint8))
    monkeypatch.setattr(cv2, "imread", lambda *a: pytest.fail("decoded"))
    assert eleatt(["flow", "--import-jpg", str(tmp_path / "jpg"), "--out", str(tmp_path / "flow"),
                   "--no-progress"]) == 3
    out = capsys.readouterr().out
    assert f"'{src / 'x_00001.jpg'}' is 8200x8: larger than a flow frame may be" in out


def test_visualize_reads_no_more_than_a_feature_file_holds(tmp_path, capsys):
    """A 200-byte .npy whose header claims a (2**28, 8) float32 array: refused from the header, not allocated (1 GB)."""
    import io

    ckpt = _checkpoint(tmp_path / "best.ckpt")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**28, 8)})
    (tmp_path / "claim.npy").write_bytes(header.getvalue() + bytes(64))
    tracemalloc.start()
    try:
        assert eleatt(["visualize", "--ckpt", str(ckpt), "--features", str(tmp_path / "claim.npy")]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = _one_line_error(capsys, "visualize")
    assert "its header describes a float32 array of shape (268435456, 8) (8589934720 bytes) but the file has " \
           "192 bytes (truncated or damaged)" in err
    assert peak < 64 * 2**20
