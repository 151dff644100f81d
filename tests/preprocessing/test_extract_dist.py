"""`eleatt extract` on two CPU processes (Lightning DDP on gloo): disjoint shards, parity, resume across world sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pipeline.data.features import FeatureFolder
from preprocessing.extract import main, shard

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return path


def _videos(dataset: Path, n: int) -> list[str]:
    lines = (dataset / "train.txt").read_text().splitlines()
    return [line.rsplit(maxsplit=1)[0] for line in lines if line.strip()][:n]


def _write_list(path: Path, videos: list[str]) -> Path:
    path.write_text("".join(f"{v} 0\n" for v in videos))
    return path


def _args(lst: Path, root: Path, out: Path, weights: Path) -> list[str]:
    return ["--list", str(lst), "--root", str(root), "--out", str(out), "--backbone", "test_resnet",
            "--weights", str(weights), "--device", "cpu", "--workers", "0", "--batch-size", "8", "--no-progress"]


def _shard_videos(path: Path) -> list[str]:
    return [json.loads(line)["video"] for line in path.read_text().splitlines()] if path.exists() else []


def test_shard_is_a_disjoint_cover():
    videos = [f"v{i}" for i in range(7)]
    for world in (1, 2, 3, 8):
        shares = [shard(videos, r, world) for r in range(world)]
        assert sorted(v for s in shares for v in s) == videos
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_two_processes_resume_and_match_one(synthetic_dataset, weights, tmp_path, capsys):
    videos = _videos(synthetic_dataset, 7)
    ref, out = tmp_path / "ref", tmp_path / "dist"
    assert main(_args(_write_list(tmp_path / "all.txt", videos), synthetic_dataset, ref, weights)) == 0

    # One process finishes 2 videos; then two processes resume the other 5 (not divisible by 2).
    assert main(_args(_write_list(tmp_path / "first.txt", videos[:2]), synthetic_dataset, out, weights)) == 0
    capsys.readouterr()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", *_args(tmp_path / "all.txt", synthetic_dataset, out, weights),
         "--devices", "2", "--strategy", "ddp"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 done, 2 skipped, 0 failed of 7 videos" in proc.stdout
    assert proc.stdout.count("extract:") == 1  # one summary, from rank 0

    single = _shard_videos(out / "manifest.jsonl")
    rank0, rank1 = _shard_videos(out / "manifest.rank0.jsonl"), _shard_videos(out / "manifest.rank1.jsonl")
    assert single == videos[:2]
    assert sorted(rank0) == sorted(videos[2::2]) and sorted(rank1) == sorted(videos[3::2])  # 3 + 2
    assert sorted(single + rank0 + rank1) == sorted(videos)  # each exactly once
    assert not list(out.rglob("*.tmp*"))

    a, b = FeatureFolder(ref), FeatureFolder(out)
    assert set(b.finished()) == set(videos)
    for video in videos:
        np.testing.assert_allclose(b.load(video).astype(np.float32), a.load(video).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)

    # And back to one process over a longer list: only the new videos are done, into the unsharded manifest.
    more = _videos(synthetic_dataset, 9)
    assert main(_args(_write_list(tmp_path / "more.txt", more), synthetic_dataset, out, weights)) == 0
    assert "2 done, 7 skipped, 0 failed of 9 videos" in capsys.readouterr().out
    assert _shard_videos(out / "manifest.jsonl") == videos[:2] + more[7:]
    assert set(b.finished()) == set(more)
