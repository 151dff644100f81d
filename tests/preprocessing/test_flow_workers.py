"""`eleatt flow`'s worker pool as a user runs it (a command in a terminal, so the workers are forked): Ctrl-C reaches
every process of the group, the parent finishes the videos in progress and exits 130, nothing is recorded as failed,
no process is left behind, and a rerun finishes the rest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from preprocessing.synthetic import write_lossless_video

REPO = Path(__file__).resolve().parents[2]


def _records(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_ctrl_c_finishes_the_videos_in_progress_and_a_rerun_the_rest(tmp_path):
    root = tmp_path / "videos"
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    write_lossless_video(root / "v000.mp4", np.stack([np.roll(texture, (t, 2 * t), (0, 1)) for t in range(24)]))
    names = [f"v{i:03d}.mp4" for i in range(40)]
    for name in names[1:]:
        (root / name).write_bytes((root / "v000.mp4").read_bytes())
    (root / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    out = tmp_path / "flow"
    command = [sys.executable, "-m", "pipeline", "flow", "--list", str(root / "list.txt"), "--root", str(root),
               "--out", str(out), "--short-side", "0", "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "stderr.txt", "w+b")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)  # its own group, as a terminal's foreground job
    deadline = time.monotonic() + 120
    try:
        while len(_records(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the parent and both workers get it
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log.seek(0)
    stderr = log.read().decode()
    assert code == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    for _ in range(50):  # the workers end with the pool's shutdown
        if not _group_alive(proc.pid):
            break
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "a worker outlived the interrupted run"
    done = [r["video"] for r in _records(out)]
    assert 2 <= len(done) < len(names) and len(set(done)) == len(done)
    assert not (out / "failed.jsonl").exists() or not (out / "failed.jsonl").read_text().strip()
    assert not list(out.rglob("*.tmp*"))
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(names) - len(done)} done, {len(done)} skipped, 0 failed of {len(names)} videos" in again.stdout
    assert sorted(r["video"] for r in _records(out)) == names
