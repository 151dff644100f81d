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


WORKER_STATE = """
import multiprocessing, os, signal, sys
import preprocessing.flow as flow

def state():
    return (signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []),
            "torch" in sys.modules, "cv2" in sys.modules and "pipeline.data.video" in sys.modules,
            flow._STATE["config"]["preset"])

if __name__ == "__main__":
    config = dict(method="dis", preset="medium", short_side=None, bound=20.0, weights_path=None, root=".", out=".",
                  backend="pyav", parent_pid=os.getpid())
    pool = flow._wanted_pool(2, config)  # what compute starts before it reads the list
    started = len(multiprocessing.active_children())  # before any video is handed out
    print(*pool.submit(state).result())
    print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []),
          signal.getsignal(signal.SIGINT) is signal.default_int_handler, "cv2" in sys.modules, started,
          flow._wanted_pool(1, config) is None)
    pool.shutdown()
"""


def test_a_forked_worker_ignores_ctrl_c_unblocked_and_starts_warm_without_torch(tmp_path):
    """The fork pool is started with both workers before any video is handed out (one worker: no pool). A worker:
    SIGINT ignored (the parent handles Ctrl-C) and no longer blocked (the block only
    covers the fork), the run's config and OpenCV and the decoder loaded by its initializer, no torch; the parent's
    own signal mask and handler are as they were, and it has not loaded OpenCV itself."""
    script = tmp_path / "state.py"
    script.write_text(WORKER_STATE)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    worker, parent = out.splitlines()
    assert worker.split() == ["True", "False", "False", "True", "medium"]
    assert parent.split() == ["False", "True", "False", "2", "True"]


def test_the_pool_started_before_the_list_is_read_is_the_one_that_computes(tmp_path):
    """Without torch loaded (as `eleatt flow` runs) the workers are forked before the list and the folder are read;
    that pool computes the videos: no second pool is started once the folder's lock is held."""
    root = tmp_path / "videos"
    texture = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    for i in range(3):
        write_lossless_video(root / f"v{i}.mp4", np.stack([np.roll(texture, (t, t), (0, 1))[:40, :48] for t in range(6)]))
    (root / "list.txt").write_text("".join(f"v{i}.mp4 0\n" for i in range(3)))
    code = f"""
import sys
import preprocessing.flow as flow
method = flow._start_method()  # as the command starts (threads come later)
starts = []
real = flow._start_pool
flow._start_pool = lambda *a, **k: starts.append(a[0]) or real(*a, **k)
summary = flow.compute({str(root / 'list.txt')!r}, {str(root)!r}, {str(tmp_path / 'out')!r}, short_side=0, workers=2,
                       progress=False)
print(method, starts, summary.done, "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["fork", "[2]", "3", "False"]
