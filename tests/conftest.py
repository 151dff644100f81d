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
