"""`eleatt flow`: known motion measured, chunked decoding, workers, failures, refusals, crash states, RAFT plumbing."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import preprocessing.flow as flowmod
from pipeline.cli import main as cli_main
from pipeline.data.flow_files import FlowFolder, FlowOptions, flow_info, load_flow, load_quantized
from preprocessing.flow import compute, main, tvl1_available
from preprocessing.synthetic import write_lossless_video

# (name, dx, dy): a smooth texture translating by a whole number of pixels per frame
MOTIONS = (("right_up", 2, -1), ("left_down", -1, 3))
H, W, T = 64, 80, 6


def _texture(size: int, seed: int) -> np.ndarray:
    """uint8 (size, size, 3) smooth random texture (blurred noise): DIS and Farneback track it well."""
    noise = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 3)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.uint8)


def _translating(dx: int, dy: int, frames: int = T, seed: int = 0) -> np.ndarray:
    tex = _texture(200, seed)
    y0, x0 = 60, 60
    return np.stack([tex[y0 - t * dy:y0 - t * dy + H, x0 - t * dx:x0 - t * dx + W] for t in range(frames)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """root with the translating videos, a one-frame video, a damaged file and list files."""
    root = tmp_path_factory.mktemp("flow_videos")
    for i, (name, dx, dy) in enumerate(MOTIONS):
        write_lossless_video(root / "move" / f"{name}.mp4", _translating(dx, dy, seed=i))
    write_lossless_video(root / "one_frame.mp4", _translating(1, 1, frames=1))
    (root / "damaged.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (root / "good.txt").write_text("".join(f"move/{name}.mp4 0\n" for name, _, _ in MOTIONS))
    (root / "mixed.txt").write_text("move/right_up.mp4 0\ndamaged.mp4 1\none_frame.mp4 0\nmove/left_down.mp4 1\n")
    return root


def _run(videos: Path, out: Path, *extra: str, list_name: str = "good.txt") -> int:
    return main(["--list", str(videos / list_name), "--root", str(videos), "--out", str(out), "--short-side", "0",
                 "--workers", "1", "--no-progress", *extra])


def _records(out: Path) -> list[dict]:
    records = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


METHODS = ["dis", "farneback", pytest.param("tvl1", marks=pytest.mark.skipif(
    not tvl1_available(), reason="TV-L1 needs opencv-contrib-python-headless"))]


@pytest.mark.parametrize("method", METHODS)
def test_known_translation_is_measured(videos, tmp_path, method):
    out = tmp_path / method
    assert _run(videos, out, "--method", method) == 0
    folder = FlowFolder(out)
    for name, dx, dy in MOTIONS:
        flow = folder.load(f"move/{name}.mp4")  # (T-1, 2, H, W) pixels
        assert flow.shape == (T - 1, 2, H, W)
        inner = flow[:, :, 8:-8, 8:-8]  # borders see texture entering the frame
        for pair in inner:
            assert abs(np.median(pair[0]) - dx) <= 0.5, (method, name, np.median(pair[0]))
            assert abs(np.median(pair[1]) - dy) <= 0.5, (method, name, np.median(pair[1]))
    settings = FlowFolder(out).settings
    assert (settings.modality, settings.backbone, settings.in_chans) == ("flow", None, 2)
    options = FlowOptions.of(settings)
    assert options.method == method and options.bound == 20.0 and options.short_side is None


def test_flow_files_are_at_most_2_5x_the_jpeg_layout(videos, tmp_path):
    from pipeline.data.flow_files import jpeg_bytes

    out = tmp_path / "size"
    assert _run(videos, out) == 0
    for path in sorted(out.rglob("*.flow.zip")):
        q = load_quantized(path)[0]
        assert path.stat().st_size <= 2.5 * jpeg_bytes(q, quality=95), path


def test_ctrl_c_keeps_finished_videos_and_exits_130(videos, tmp_path, monkeypatch, capsys):
    real = flowmod._work
    calls = []

    def interrupted_on_second(video):
        calls.append(video)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(video)

    monkeypatch.setattr(flowmod, "_work", interrupted_on_second)
    out = tmp_path / "ctrl_c"
    assert _run(videos, out) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert [r["video"] for r in _records(out)] == [f"move/{MOTIONS[0][0]}.mp4"]
    assert not list(out.rglob("*.tmp*"))
    monkeypatch.undo()
    assert _run(videos, out) == 0
    assert len(_records(out)) == len(MOTIONS)


def test_short_side_resizes_and_flow_is_in_stored_pixels(videos, tmp_path):
    out = tmp_path / "half"
    assert main(["--list", str(videos / "good.txt"), "--root", str(videos), "--out", str(out), "--short-side", "32",
                 "--workers", "1", "--no-progress"]) == 0
    flow = FlowFolder(out).load("move/right_up.mp4")
    assert flow.shape == (T - 1, 2, 32, 40)
    assert abs(np.median(flow[:, 0, 4:-4, 4:-4]) - 1.0) <= 0.5  # 2 px at 80 wide = 1 px at 40 wide
    assert abs(np.median(flow[:, 1, 4:-4, 4:-4]) + 0.5) <= 0.5


def test_chunked_decoding_pairs_across_chunks_and_two_workers_agree(videos, tmp_path, monkeypatch):
    assert _run(videos, tmp_path / "whole") == 0
    reference = {n: load_quantized(tmp_path / "whole" / "move" / f"{n}.flow.zip")[0] for n, _, _ in MOTIONS}
    # chunks of 2 frames: every pair but the first of a chunk spans two decode calls
    monkeypatch.setattr(flowmod, "DECODE_BYTES", 2 * H * W * 3)
    assert _run(videos, tmp_path / "chunked") == 0
    for name, q in reference.items():
        assert np.array_equal(load_quantized(tmp_path / "chunked" / "move" / f"{name}.flow.zip")[0], q)
    monkeypatch.undo()
    summary = compute(videos / "good.txt", videos, tmp_path / "two", short_side=0, workers=2, progress=False)
    assert (summary.done, summary.failed) == (len(MOTIONS), {})
    for name, q in reference.items():
        assert np.array_equal(load_quantized(tmp_path / "two" / "move" / f"{name}.flow.zip")[0], q)


def test_bad_videos_are_reported_and_the_rest_finish(videos, tmp_path, capsys):
    out = tmp_path / "mixed"
    assert _run(videos, out, list_name="mixed.txt") == 3
    text = capsys.readouterr().out
    assert "2 done, 0 skipped, 2 failed of 4 videos" in text
    assert "failed: one_frame.mp4:" in text and "no frame pairs" in text
    assert "failed: damaged.mp4:" in text
    folder = FlowFolder(out)
    assert set(folder.finished()) == {"move/right_up.mp4", "move/left_down.mp4"}
    assert set(folder.failed()) == {"damaged.mp4", "one_frame.mp4"}
    assert not (out / "one_frame.flow.zip").exists() and not list(out.rglob("*.tmp*"))
    # a rerun retries only the failures
    assert _run(videos, out, list_name="mixed.txt") == 3
    assert "0 done, 2 skipped, 2 failed of 4 videos" in capsys.readouterr().out
    assert [r["video"] for r in _records(out)] == ["move/right_up.mp4", "move/left_down.mp4"]


def test_other_settings_into_the_same_folder_are_refused(videos, tmp_path, capsys):
    out = tmp_path / "f"
    assert _run(videos, out) == 0
    capsys.readouterr()
    assert _run(videos, out, "--bound", "15") == 2
    err = capsys.readouterr().err
    assert "refused" in err and "bound: stored 20.0, asked 15.0" in err


def test_resume_after_crash_states(videos, tmp_path):
    """A torn manifest line, a file renamed without its record, a temporary file: the rerun leaves each video once."""
    out = tmp_path / "crash"
    assert _run(videos, out) == 0
    folder = FlowFolder(out)
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text(lines[0] + lines[1][:20])  # killed while appending the second record
    stale = out / ".eleatt-tmp" / ".eleatt-tmp.abc123.part"  # killed while writing
    stale.write_bytes(b"PK partial")
    keep = out / "move" / ".notes.tmp.flow.zip"  # a user's file that only looks like a temporary
    keep.write_bytes(b"mine")
    assert _run(videos, out) == 0
    counts: dict[str, int] = {}
    for record in _records(out):
        counts[record["video"]] = counts.get(record["video"], 0) + 1
    assert counts == {f"move/{n}.mp4": 1 for n, _, _ in MOTIONS}
    assert not list(out.rglob("*.tmp*.part")) and not any((out / ".eleatt-tmp").iterdir())
    assert keep.read_bytes() == b"mine"
    for name, _, _ in MOTIONS:
        assert flow_info(folder.feature_path(f"move/{name}.mp4"))["pairs"] == T - 1


def test_a_rerun_redoes_flow_files_damaged_or_deleted_after_their_record(videos, tmp_path, capsys):
    """Resume trusts a manifest record only with its file whole: a truncated file, one overwritten with garbage,
    one replaced by another whole flow file of other pairs, and a deleted one are redone; the untouched is skipped."""
    from pipeline.data.flow_files import save_flow

    root = tmp_path / "videos"
    root.mkdir()
    names = ["trunc.mp4", "garbage.mp4", "other.mp4", "deleted.mp4", "kept.mp4"]
    for i, name in enumerate(names):
        (root / name).write_bytes((videos / "move" / f"{MOTIONS[i % 2][0]}.mp4").read_bytes())
    (root / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    out = tmp_path / "flow"
    argv = ["flow", "--list", str(root / "list.txt"), "--root", str(root), "--out", str(out), "--short-side", "0",
            "--workers", "1", "--no-progress"]
    assert cli_main(argv) == 0
    assert "flow: 5 done, 0 skipped, 0 failed of 5 videos" in capsys.readouterr().out
    path = {n: out / n.replace(".mp4", ".flow.zip") for n in names}
    first = {n: load_quantized(path[n])[0] for n in names}
    assert all(q.shape == (T - 1, 2, H, W) for q in first.values())

    data = path["trunc.mp4"].read_bytes()
    path["trunc.mp4"].write_bytes(data[: len(data) // 2])  # cut: the zip directory at the end is gone
    path["garbage.mp4"].write_bytes(bytes(range(256)) * (path["garbage.mp4"].stat().st_size // 256 + 1))
    save_flow(path["other.mp4"], first["other.mp4"][:2], 20.0)  # a whole flow file, but of 2 pairs, not 5
    path["deleted.mp4"].unlink()
    kept = path["kept.mp4"].stat()
    assert set(FlowFolder(out).finished()) == {"kept.mp4"}

    assert cli_main(argv) == 0
    assert "flow: 4 done, 1 skipped, 0 failed of 5 videos" in capsys.readouterr().out
    for name in names:
        assert np.array_equal(load_quantized(path[name])[0], first[name]), name
    again = path["kept.mp4"].stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not rewritten
    counts: dict[str, int] = {}
    for record in _records(out):
        counts[record["video"]] = counts.get(record["video"], 0) + 1
    assert counts == {"trunc.mp4": 2, "garbage.mp4": 2, "other.mp4": 2, "deleted.mp4": 2, "kept.mp4": 1}
    assert set(FlowFolder(out).finished()) == set(names) and not FlowFolder(out).failed()
    assert cli_main(argv) == 0
    assert "flow: 0 done, 5 skipped, 0 failed of 5 videos" in capsys.readouterr().out


def test_skipped_counts_only_the_listed_videos_and_the_bound_reaches_the_files(videos, tmp_path, capsys):
    out = tmp_path / "b10"
    assert _run(videos, out, "--bound", "10") == 0
    assert "flow: 2 done, 0 skipped, 0 failed of 2 videos" in capsys.readouterr().out
    path = out / "move" / "right_up.flow.zip"
    assert flow_info(path)["bound"] == 10.0 and FlowOptions.of(FlowFolder(out).settings).bound == 10.0
    # dx = 2 px at bound 10 is level round((2 + 10) / 20 * 255) = 153 (at bound 20 it would be 140)
    levels = load_quantized(path)[0][:, 0, 8:-8, 8:-8]
    assert abs(float(np.median(levels)) - 153) <= 2
    # a list holding one of the two finished videos: 1 skipped, not the folder's 2
    (videos / "one_done.txt").write_text("move/left_down.mp4 1\n")
    assert _run(videos, out, "--bound", "10", list_name="one_done.txt") == 0
    assert "flow: 0 done, 1 skipped, 0 failed of 1 videos" in capsys.readouterr().out


def test_usage_errors(videos, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--list and --root are required" in capsys.readouterr().err
    assert _run(videos, tmp_path / "x", "--workers", "0") == 2
    assert main(["--list", str(videos / "nope.txt"), "--root", str(videos), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--import-jpg" in capsys.readouterr().out
    assert cli_main(["flow", "--out", str(tmp_path / "y")]) == 2  # registered in the dispatcher
    capsys.readouterr()
    (videos / "collide.txt").write_text("move/right_up.mp4 0\nmove/right_up.avi 0\n")
    assert _run(videos, tmp_path / "c", list_name="collide.txt") == 2
    assert "would both be stored as" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.skipif(tvl1_available(), reason="contrib OpenCV is installed: TV-L1 runs")
def test_tvl1_without_contrib_names_the_package(videos, tmp_path, capsys):
    assert _run(videos, tmp_path / "t", "--method", "tvl1") == 2
    assert "opencv-contrib-python-headless" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # refused before anything is written


def test_raft_plumbing_with_random_weights(videos, tmp_path, capsys):
    """Random weights (nothing can be downloaded): only shapes, files and settings are checked, not the values."""
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    weights = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), weights)
    (videos / "one.txt").write_text("move/right_up.mp4 0\n")
    out = tmp_path / "raft"
    assert _run(videos, out, "--method", "raft", "--weights", str(weights), list_name="one.txt") == 0
    flow = load_flow(out / "move" / "right_up.flow.zip")
    assert flow.shape == (T - 1, 2, H, W) and np.isfinite(flow).all()
    options = FlowOptions.of(FlowFolder(out).settings)
    assert (options.method, options.raft, options.weights) == ("raft", "small", "raft_small.pth")
    capsys.readouterr()
    assert _run(videos, tmp_path / "r2", "--method", "raft", list_name="one.txt") == 2
    assert "--weights" in capsys.readouterr().err
    torch.save({"not": torch.zeros(1)}, tmp_path / "junk.pth")
    assert _run(videos, tmp_path / "r3", "--method", "raft", "--weights", str(tmp_path / "junk.pth"),
                list_name="one.txt") == 2
    assert "not a torchvision raft_large or raft_small state dict" in capsys.readouterr().err


def test_import_export_commands(tmp_path, capsys):
    src = tmp_path / "jpg" / "video_a"
    src.mkdir(parents=True)
    levels = np.random.default_rng(0).integers(60, 200, size=(3, 2, 16, 20), dtype=np.uint8)
    levels = cv2.GaussianBlur(levels.reshape(-1, 20), (5, 5), 0).reshape(levels.shape)  # JPEG-friendly
    for i, pair in enumerate(levels, 1):
        cv2.imwrite(str(src / f"flow_x_{i:05d}.jpg"), pair[0], [cv2.IMWRITE_JPEG_QUALITY, 100])
        cv2.imwrite(str(src / f"flow_y_{i:05d}.jpg"), pair[1], [cv2.IMWRITE_JPEG_QUALITY, 100])
    out = tmp_path / "flows"
    assert main(["--import-jpg", str(tmp_path / "jpg"), "--out", str(out), "--no-progress"]) == 0
    assert "1 imported" in capsys.readouterr().out
    stored = load_quantized(out / "video_a.flow.zip")[0]
    assert np.abs(stored.astype(int) - levels.astype(int)).max() <= 2
    assert main(["--export-jpg", str(tmp_path / "back"), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "back" / "video_a").iterdir())[:2] == ["x_00001.jpg", "x_00002.jpg"]
    assert main(["--export-jpg", str(tmp_path / "b"), "--import-jpg", str(src), "--out", str(out)]) == 2


@pytest.mark.slow  # a subprocess start-up and a run; test_resume_after_crash_states covers the states quickly
def test_kill_and_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    root = tmp_path / "videos"
    write_lossless_video(root / "v000.mp4", _translating(1, 2, frames=24))
    names = [f"v{i:03d}.mp4" for i in range(30)]
    for name in names[1:]:
        (root / name).write_bytes((root / "v000.mp4").read_bytes())
    (root / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    out = tmp_path / "flow"
    args = ["--list", str(root / "list.txt"), "--root", str(root), "--out", str(out), "--short-side", "0",
            "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    log = open(tmp_path / "stderr.txt", "w+b")  # a file, not a pipe: a stray worker cannot block the read
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "flow", *args], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    try:
        while (not (out / "manifest.jsonl").exists() or len(_records(out)) < 3) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    log.seek(0)
    assert proc.returncode == -signal.SIGKILL, f"finished before it was killed: {log.read().decode()[-2000:]}"
    assert 3 <= len(_records(out)) < len(names)
    time.sleep(2.5)  # the orphaned workers notice their parent is gone and exit (polled each second)
    assert main(args) == 0
    counts: dict[str, int] = {}
    for record in _records(out):
        counts[record["video"]] = counts.get(record["video"], 0) + 1
    assert counts == {n: 1 for n in names}
    assert not list(out.rglob("*.tmp*"))
    first = load_quantized(out / "v000.flow.zip")[0]
    for name in names:
        assert np.array_equal(load_quantized(out / name.replace(".mp4", ".flow.zip"))[0], first)
