"""`eleatt extract` on one process: features and formats, batching invariance, failures, refusals, kill and resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.data.features import FeatureFolder
from pipeline.data.sampling import Sampling
from pipeline.data.transforms import eval_views
from pipeline.data.video import load_frames, probe
from pipeline.nn.backbone import FrameEncoder
from preprocessing.extract import main

REPO = Path(__file__).resolve().parents[2]
BACKBONE = "test_resnet"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Fixed random test_resnet weights (with head), so that every run and process encodes alike."""
    torch.manual_seed(3)
    model = timm.create_model(BACKBONE)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _videos(dataset: Path, n: int) -> list[str]:
    lines = (dataset / "train.txt").read_text().splitlines() + (dataset / "val.txt").read_text().splitlines()
    return [line.rsplit(maxsplit=1)[0] for line in lines if line.strip()][:n]


def _write_list(path: Path, videos: list[str]) -> Path:
    path.write_text("".join(f"{v} 0\n" for v in videos))
    return path


def _args(list_path: Path, root: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["--list", str(list_path), "--root", str(root), "--out", str(out), "--backbone", BACKBONE,
            "--weights", str(weights), "--device", "cpu", "--no-progress", *extra]


def _records(out: Path) -> list[dict]:
    records = []
    for shard in sorted(out.glob("manifest*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line torn by a kill
    return records


def _assert_exactly_once(out: Path, videos: list[str]) -> None:
    counts: dict[str, int] = {}
    for record in _records(out):
        counts[record["video"]] = counts.get(record["video"], 0) + 1
    assert counts == {v: 1 for v in videos}
    assert not list(out.glob(".eleatt-tmp/*")), "temporary files left behind"


def _reference(root: Path, video: str, weights: Path, views: str = "center") -> np.ndarray:
    enc = FrameEncoder(BACKBONE, weights=weights)
    info = probe(root / video)
    frames = load_frames(root / video, np.arange(info.num_frames))
    x = eval_views(frames, enc.data_config, views)  # (V, T, C, H, W)
    v, t = x.shape[:2]
    return enc.encode(x.flatten(0, 1)).reshape(v, t, -1).numpy()


def test_features_settings_and_manifest(synthetic_dataset, weights, tmp_path, capsys):
    videos = _videos(synthetic_dataset, 4)
    out = tmp_path / "feats"
    lst = _write_list(tmp_path / "list.txt", videos + videos[:1])  # a repeated line is extracted once
    assert main(_args(lst, synthetic_dataset, out, weights, "--batch-size", "6", "--workers", "0")) == 0
    assert "4 done, 0 skipped, 0 failed of 4 videos" in capsys.readouterr().out

    settings = FeatureFolder(out).settings
    assert settings.backbone == BACKBONE and settings.weights == str(weights.resolve())
    assert settings.sampling == Sampling() and settings.in_chans == 3
    assert settings.views == "center" and settings.dtype == "float16" and settings.modality == "rgb"
    assert settings.input_size == (3, 160, 160) and settings.dim == 96
    assert settings.data_config["crop_pct"] == 0.95
    raw = json.loads((out / "settings.json").read_text())  # the file itself: versioned, sampling spelled out
    assert raw["format"] == 1 and raw["sampling"] == {"mode": "all", "fps": None, "num_segments": None}
    assert raw["input_size"] == [3, 160, 160]

    folder = FeatureFolder(out)
    assert set(folder.finished()) == set(videos)
    for video in videos:
        feats = folder.load(video)
        assert feats.shape == (16, 96) and feats.dtype == np.float16
        assert folder.feature_path(video) == out / video.replace(".mp4", ".npy")
        np.testing.assert_allclose(feats.astype(np.float32), _reference(synthetic_dataset, video, weights)[0],
                                   rtol=2e-3, atol=2e-3)
    record = folder.finished()[videos[0]]
    assert (record["frames"], record["dim"], record["views"], record["source_frames"]) == (16, 96, 1, 16)
    _assert_exactly_once(out, videos)

    # A second run has nothing to do.
    assert main(_args(lst, synthetic_dataset, out, weights)) == 0
    assert "0 done, 4 skipped, 0 failed of 4 videos" in capsys.readouterr().out


def test_views_and_sampling(synthetic_dataset, weights, tmp_path):
    videos = _videos(synthetic_dataset, 2)
    lst = _write_list(tmp_path / "list.txt", videos)
    out = tmp_path / "three"
    # Batch 4 < 3 views x 2 frames: one frame's three crops per batch.
    assert main(_args(lst, synthetic_dataset, out, weights, "--views", "three", "--num-segments", "5",
                      "--batch-size", "4", "--workers", "1")) == 0
    feats = FeatureFolder(out).load(videos[0])
    assert feats.shape == (3, 5, 96) and feats.dtype == np.float16
    segments = np.array([1, 4, 8, 11, 14])  # centres of 5 segments of 16 frames
    ref = _reference(synthetic_dataset, videos[0], weights, views="three")[:, segments]
    np.testing.assert_allclose(feats.astype(np.float32), ref, rtol=2e-3, atol=2e-3)

    out = tmp_path / "fps"
    assert main(_args(lst, synthetic_dataset, out, weights, "--fps", "6", "--workers", "0")) == 0  # 12 -> 6 fps
    assert FeatureFolder(out).load(videos[1]).shape == (8, 96)
    assert json.loads((out / "settings.json").read_text())["sampling"] == {"mode": "fps", "fps": 6.0, "num_segments": None}


def test_features_do_not_depend_on_batch_size_or_workers(synthetic_dataset, weights, tmp_path):
    videos = _videos(synthetic_dataset, 5)
    lst = _write_list(tmp_path / "list.txt", videos)
    a, b = tmp_path / "a", tmp_path / "b"
    # 5 images a batch: every video spans several batches; 64 with 2 workers: videos share batches, out of order.
    assert main(_args(lst, synthetic_dataset, a, weights, "--batch-size", "5", "--workers", "0")) == 0
    assert main(_args(lst, synthetic_dataset, b, weights, "--batch-size", "64", "--workers", "2")) == 0
    fa, fb = FeatureFolder(a), FeatureFolder(b)
    for video in videos:
        np.testing.assert_allclose(fa.load(video).astype(np.float32), fb.load(video).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


def test_bad_videos_are_recorded_and_retried(synthetic_dataset, weights, tmp_path, capsys):
    root = tmp_path / "root"
    good = _videos(synthetic_dataset, 2)
    for video in good:
        (root / video).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic_dataset / video, root / video)
    (root / "bad.mp4").write_bytes(b"\x00not a video" * 50)
    lst = _write_list(tmp_path / "list.txt", [good[0], "bad.mp4", "gone.mp4", good[1]])
    out = tmp_path / "feats"

    assert main(_args(lst, root, out, weights, "--workers", "1")) == 3
    printed = capsys.readouterr().out
    assert "2 done, 0 skipped, 2 failed of 4 videos" in printed
    assert "failed: bad.mp4:" in printed and "failed: gone.mp4:" in printed
    folder = FeatureFolder(out)
    assert set(folder.finished()) == set(good)
    failed = folder.failed()
    assert set(failed) == {"bad.mp4", "gone.mp4"} and "gone.mp4" in failed["gone.mp4"]
    assert not folder.feature_path("bad.mp4").exists()

    # A rerun retries the failures only; once the files are fixed, they succeed and supersede the failures.
    assert main(_args(lst, root, out, weights, "--workers", "0")) == 3
    assert "0 done, 2 skipped, 2 failed of 4 videos" in capsys.readouterr().out
    shutil.copy(root / good[0], root / "bad.mp4")
    shutil.copy(root / good[0], root / "gone.mp4")
    assert main(_args(lst, root, out, weights, "--workers", "0")) == 0
    assert "2 done, 2 skipped, 0 failed of 4 videos" in capsys.readouterr().out
    assert folder.failed() == {}
    _assert_exactly_once(out, [good[0], "bad.mp4", "gone.mp4", good[1]])


def test_other_settings_into_the_same_folder_are_refused(synthetic_dataset, weights, tmp_path, capsys):
    lst = _write_list(tmp_path / "list.txt", _videos(synthetic_dataset, 1))
    out = tmp_path / "feats"
    assert main(_args(lst, synthetic_dataset, out, weights, "--workers", "0")) == 0
    before = (out / "settings.json").read_text()
    assert main(_args(lst, synthetic_dataset, out, weights, "--num-segments", "4")) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "sampling" in err and "--out" in err
    assert main(_args(lst, synthetic_dataset, out, "none")) == 2
    assert "weights" in capsys.readouterr().err
    assert (out / "settings.json").read_text() == before


def test_usage_errors(synthetic_dataset, weights, tmp_path, capsys, monkeypatch):
    lst = _write_list(tmp_path / "list.txt", _videos(synthetic_dataset, 1))
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--num-segments" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: the two samplings exclude each other
        main(_args(lst, synthetic_dataset, tmp_path / "x", weights, "--fps", "5", "--num-segments", "3"))
    assert main(_args(lst, tmp_path / "nowhere", tmp_path / "x", weights)) == 2
    assert "nowhere" in capsys.readouterr().err

    # timm weights while offline with an empty cache: refused at once, saying what to pass instead.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.perf_counter()
    assert main(_args(lst, synthetic_dataset, tmp_path / "y", "imagenet")) == 2
    assert time.perf_counter() - start < 5
    assert "--weights PATH" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_device_errors_and_colliding_feature_paths_are_usage_errors(synthetic_dataset, weights, tmp_path, capsys):
    """Refused before any work, with one line (no traceback) and no folder left behind."""
    video = _videos(synthetic_dataset, 1)[0]
    lst = _write_list(tmp_path / "list.txt", [video])
    out = tmp_path / "feats"
    assert main(_args(lst, synthetic_dataset, out, weights, "--devices", "abc")) == 2
    err = capsys.readouterr().err
    assert err.startswith("eleatt extract: error: --device cpu --devices abc") and "Traceback" not in err
    assert not out.exists()

    # Two list paths differing only in their extension would share one feature file: the second would silently
    # overwrite the first, and both would be "finished". (Checked before any video is opened.)
    stem, _ = os.path.splitext(video)
    other = f"{stem}.avi"
    assert main(_args(_write_list(tmp_path / "two.txt", [video, other]), synthetic_dataset, out, weights)) == 2
    err = capsys.readouterr().err
    assert video in err and other in err and f"{stem}.npy" in err
    assert not out.exists()


def test_features_that_cannot_be_stored_fail_only_their_video(tmp_path):
    """Features that overflow float16 are a per-video failure (recorded, run goes on), not a crash of the run."""
    from preprocessing.extract import FeatureWriter

    writer = FeatureWriter(tmp_path / "feats", progress=False)
    writer.folder = FeatureFolder(tmp_path / "feats")
    piece = {"video": "a/huge.mp4", "start": 0, "count": 2, "total": 2, "views": 1, "source_frames": 2,
             "source_fps": 12.0}
    writer._add(piece, np.full((1, 2, 4), 1e6, np.float32))  # (V, k, D), beyond float16's range
    writer._add({**piece, "video": "b/fine.mp4"}, np.ones((1, 2, 4), np.float32))
    assert writer.stats.failed == 1 and writer.stats.videos == 1
    assert "not finite in float16" in writer.folder.failed()["a/huge.mp4"]
    assert set(writer.folder.finished()) == {"b/fine.mp4"}


def test_resume_after_crash_states(synthetic_dataset, weights, tmp_path):
    """The states a kill can leave: a torn manifest line, a file renamed without its record, a temporary file; and a
    finished file damaged since (truncated) is redone, while a user's file that looks like a temporary is kept."""
    videos = _videos(synthetic_dataset, 4)
    out = tmp_path / "feats"
    assert main(_args(_write_list(tmp_path / "a.txt", videos[:3]), synthetic_dataset, out, weights,
                      "--workers", "0")) == 0
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])["video"]
    manifest.write_text("".join(lines[:-1]) + lines[-1][:25])  # killed while appending
    orphan = FeatureFolder(out).feature_path(videos[3])  # killed between rename and record
    np.save(orphan, np.zeros((2, 2), np.float16))
    (out / ".eleatt-tmp").mkdir(exist_ok=True)
    stale = out / ".eleatt-tmp" / ".eleatt-tmp.abc.part"  # killed while writing
    stale.write_bytes(b"partial")
    lookalike = orphan.parent / f".{orphan.stem}.abc.tmp.npy"  # a user's file named like an old temporary
    lookalike.write_bytes(b"mine")
    damaged = FeatureFolder(out).feature_path(videos[0])
    damaged.write_bytes(damaged.read_bytes()[:-10])  # truncated after its record was written
    assert videos[0] not in FeatureFolder(out).finished()  # the manifest says done, the file says otherwise

    assert main(_args(_write_list(tmp_path / "b.txt", videos), synthetic_dataset, out, weights,
                      "--workers", "0")) == 0
    folder = FeatureFolder(out)
    assert set(folder.finished()) == set(videos)
    assert not stale.exists() and lookalike.read_bytes() == b"mine"
    assert oct(damaged.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the umask's permissions, not 0600
    for video in (torn, videos[3], videos[0]):
        np.testing.assert_allclose(folder.load(video).astype(np.float32),
                                   _reference(synthetic_dataset, video, weights)[0], rtol=2e-3, atol=2e-3)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_second_extract_into_the_same_folder_is_refused(synthetic_dataset, weights, tmp_path, capsys):
    from pipeline.cli import main as eleatt

    out = tmp_path / "feats"
    lst = _write_list(tmp_path / "a.txt", _videos(synthetic_dataset, 1))
    with FeatureFolder(out).lock("extract"):  # another process holds the folder
        assert eleatt(["extract", *_args(lst, synthetic_dataset, out, weights)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{out}' is being written by `eleatt extract` (pid {os.getpid()}" in err
    assert not (out / "manifest.jsonl").exists()
    (tmp_path / "file").write_text("x")
    assert eleatt(["extract", *_args(lst, synthetic_dataset, tmp_path / "file", weights)]) == 2
    assert "is an existing file" in capsys.readouterr().err


# Not marked slow (about a minute): the real kill of a running process is the one check of crash safety that
# test_resume_after_crash_states (states written by hand) cannot make, so `make test` / CI runs it every time.
def test_kill_and_resume(synthetic_dataset, weights, tmp_path):
    videos = _videos(synthetic_dataset, 12)
    lst = _write_list(tmp_path / "list.txt", videos)
    out = tmp_path / "feats"
    args = _args(lst, synthetic_dataset, out, weights, "--batch-size", "4", "--workers", "1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while len(_records(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"finished before it was killed: {err.decode()[-2000:]}"
    done_before = {r["video"] for r in _records(out)}
    assert 3 <= len(done_before) < len(videos)

    assert main(args) == 0
    _assert_exactly_once(out, videos)
    folder = FeatureFolder(out)
    for video in videos:
        assert folder.load(video).shape == (16, 96)
    np.testing.assert_allclose(folder.load(videos[-1]).astype(np.float32),
                               _reference(synthetic_dataset, videos[-1], weights)[0], rtol=2e-3, atol=2e-3)
