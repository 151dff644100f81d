"""Start-up cost: a command imports only what it uses. `--help` and `prepare` load no deep-learning or media
package, and `eleatt flow` (parent and workers) runs the OpenCV methods without torch.

Read from `python -X importtime`, which reports every module an import statement loads, with the modules those
import (forked workers inherit the flag and the stderr, so their imports are reported too)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.flow_files import load_quantized
from preprocessing.flow import compute
from preprocessing.synthetic import write_lossless_video

REPO = Path(__file__).resolve().parents[1]
DEEP = {"torch", "torchvision", "timm", "pytorch_lightning", "lightning", "lightning_fabric"}
MEDIA = {"cv2", "av", "decord", "matplotlib", "PIL"}


def imported(*argv: str, cwd: Path = REPO) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs `python -X importtime -m pipeline ARGV`; (the finished process, the top-level packages it imported)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2}
    return proc, {n.split(".")[0] for n in names} | names


@pytest.mark.parametrize("argv", [
    ("--help",), ("flow", "--help"), ("prepare", "--help"), ("prepare", "folder", "--help"),
    ("prepare", "synthetic", "--help"), ("prepare", "ntu", "--help"), ("fuse", "--help"), ("demo", "--help"),
    ("classify", "--help"), ("classify", "--stream", "rtsp://camera", "--help"), ("visualize", "--help"),
])
def test_help_imports_no_deep_learning_or_media_package(argv):
    proc, names = imported(*argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: eleatt" in proc.stdout
    assert "pipeline.cli" in names  # importtime's report was read
    assert not names & DEEP, sorted(names & DEEP)
    assert not names & MEDIA, sorted(names & MEDIA)


def test_prepare_folder_runs_without_deep_learning_or_media_packages(tmp_path):
    for cls in ("jump", "run"):
        for i in range(3):
            (tmp_path / "videos" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "videos" / cls / f"{cls}_{i}.mp4").write_bytes(b"not decoded by prepare")
    proc, names = imported("prepare", "folder", "--root", str(tmp_path / "videos"), "--out", str(tmp_path / "lists"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "lists" / "classes.txt").read_text().split() == ["jump", "run"]
    assert "preprocessing.splits" in names  # (the dispatcher's importlib.import_module is not in the report)
    assert not names & (DEEP | MEDIA), sorted(names & (DEEP | MEDIA))


def _moving_videos(root: Path, count: int, frames: int = 8) -> Path:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    for i in range(count):
        clip = np.stack([np.roll(texture, (t, (i + 1) * t), axis=(0, 1))[:48, :64] for t in range(frames)])
        write_lossless_video(root / f"v{i}.mp4", clip)
    (root / "list.txt").write_text("".join(f"v{i}.mp4 0\n" for i in range(count)))
    return root / "list.txt"


def test_flow_with_two_workers_imports_no_torch_and_equals_one_process(tmp_path):
    """`eleatt flow --workers 2` as a user runs it (fork, workers started before the list is read): no torch in the
    parent or the workers (whose imports, cv2 and the decoding module, are in the report; PyAV loads in the decoding
    process, pipeline.data.decode_guard), and the same files as one process."""
    root = tmp_path / "videos"
    list_path = _moving_videos(root, 3)
    proc, names = imported("flow", "--list", str(list_path), "--root", str(root), "--out", str(tmp_path / "two"),
                           "--workers", "2", "--short-side", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "flow: 3 done, 0 skipped, 0 failed of 3 videos" in proc.stdout
    assert {"cv2", "pipeline.data.video"} <= names  # imported by the workers alone: their report was read
    assert not names & DEEP, sorted(names & DEEP)
    one = compute(list_path, root, tmp_path / "one", short_side=0, workers=1, progress=False)
    assert one.done == 3
    for i in range(3):
        a, b = (load_quantized(tmp_path / run / f"v{i}.flow.zip")[0] for run in ("one", "two"))
        assert a.shape == (7, 2, 48, 64)
        assert np.array_equal(a, b)


def test_workers_fork_only_from_a_process_without_torch_or_other_threads():
    code = ("import threading, sys; import preprocessing.flow as f; a = f._start_method(); import torch; "
            "b = f._start_method(); sys.modules.pop('torch'); t = threading.Thread(target=threading.Event().wait, "
            "args=(5,), daemon=True); t.start(); print(a, b, f._start_method())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["fork", "forkserver", "forkserver"]


def test_startup_benchmark_quick_prints_every_command_against_the_bare_interpreter(capsys):
    from pipeline.benchmarks import startup

    assert startup.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = {line[:40].strip(): line.split() for line in out.splitlines()[2:]}
    assert list(rows) == ["python -c pass (reference)", "eleatt --help", "eleatt flow --help",
                          "eleatt prepare folder --help", "eleatt classify --help", "flow worker start (spawned)"]
    assert rows["python -c pass (reference)"][-1] == "1.0"
    assert all(float(r[-1]) > 0 for r in rows.values())
