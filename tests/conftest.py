"""Shared fixtures: offline, seeded, real files from ../shared/data, one generated dataset per session."""
from __future__ import annotations

import os
import random
from pathlib import Path

# Never touch the network: an online hub lookup here retries for over a minute before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the project (real videos, raw frames, flow JPEGs); skips when absent."""
    if not (SHARED_DATA / "videos").is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the project expects ../shared/data beside it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A small generated order-only action dataset (videos + train/val/test lists + classes.txt), made once."""
    from preprocessing.synthetic import make_dataset

    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, videos_per_class=4, num_frames=16, size=64, seed=0)
    return out


def make_order_features(root: Path, num_classes: int = 4, videos: dict | None = None, dim: int = 8, views: int = 1,
                        seed: int = 0) -> dict[str, Path]:
    """A feature folder whose class lives only in the temporal ORDER of three prototype vectors (an order-blind
    model sees the same bag of features for every class), with lists in `lists/` and a copy with shuffled labels
    in `shuffled/`. Lengths vary (9..15 steps). Returns {"features", "lists", "shuffled"} paths."""
    from itertools import permutations

    from pipeline.data.features import FeatureFolder
    from pipeline.data.lists import ListEntry, write_classes, write_list

    videos = videos or {"train": 24, "val": 8, "test": 8}
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(3, dim))
    orders = list(permutations(range(3)))[:num_classes]
    names = [f"order_{''.join(map(str, o))}" for o in orders]
    folder = FeatureFolder(root / "features")
    folder.check_settings({"backbone": "synthetic", "weights": "none", "views": "center", "modality": "rgb",
                           "dtype": "float16", "dim": dim})
    for split, count in videos.items():
        entries, shuffled = [], []
        for c, order in enumerate(orders):
            for k in range(count):
                length = int(rng.integers(9, 16))
                cuts = np.sort(rng.choice(np.arange(2, length - 1), size=2, replace=False))
                steps = np.concatenate([np.full(n, order[i]) for i, n in enumerate(np.diff([0, *cuts, length]))])
                feats = prototypes[steps][None] + 0.3 * rng.normal(size=(views, length, dim))  # (V, T, D)
                video = f"{names[c]}/{names[c]}_{split}_{k}.mp4"
                folder.write(video, feats.astype(np.float32) if views > 1 else feats[0].astype(np.float32))
                entries.append(ListEntry(video, c))
                shuffled.append(ListEntry(video, int(rng.integers(num_classes))))
        write_list(root / "lists" / f"{split}.txt", entries)
        write_list(root / "shuffled" / f"{split}.txt", shuffled)
    for sub in ("lists", "shuffled"):
        write_classes(root / sub / "classes.txt", names)
    return {"features": root / "features", "lists": root / "lists", "shuffled": root / "shuffled"}


@pytest.fixture(scope="session")
def order_features(tmp_path_factory) -> dict[str, Path]:
    """`make_order_features` once per session: 4 classes x (24 train, 8 val, 8 test) videos, D = 8, one view."""
    return make_order_features(tmp_path_factory.mktemp("order_features"))


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> dict:
    """`eleatt demo --quick` run once per session, as a user runs it with its output sent to a file (stdout and
    stderr together, not a terminal): {"out", "data", "session", "run", "flow_run", "features", "flow_features",
    "stdout" (the log)}. The session folder holds the fused scores and the report; "run" and "flow_run" are the RGB
    and flow run folders in it (best.ckpt, scores_val.npz, scores_test.npz); "features" and "flow_features" their
    feature folders."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("quick_demo")
    log = out / "demo.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--quick", "--out", str(out / "demo")],
                              cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    out = out / "demo"
    sessions = sorted((out / "checkpoints").iterdir())
    assert len(sessions) == 1
    features = {p.name.split("-", 1)[0]: p for p in (out / "features").iterdir()}
    return {"out": out, "data": out / "data", "session": sessions[0], "run": sessions[0] / "rgb",
            "flow_run": sessions[0] / "flow", "features": features["rgb"], "flow_features": features["flow2"],
            "stdout": text}
