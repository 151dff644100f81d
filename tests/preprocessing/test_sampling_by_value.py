"""Which source frames a stream takes, checked by value: a video whose frames encode their own index.

fps-mode sampling off by one frame still gives the right number of steps and plausible features; only the
values tell. The same video goes through the shared data path (`video_views`), `eleatt extract` and `classify`'s
feature path.
"""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from pipeline.data.features import FeatureFolder, FeatureSettings
from pipeline.data.views import video_views
from pipeline.data.sampling import Sampling
from pipeline.data.transforms import eval_views
from pipeline.nn.backbone import FrameEncoder
from preprocessing.extract import main

NUM_FRAMES, SRC_FPS, LEVEL = 30, 25, 8  # frame k is filled with grey level 8 k (lossless, so exact)
# 25 -> 10 fps: the frame shown at each time k / 10 s is floor(k * 2.5), worked out by hand.
AT_10_FPS = [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]


@pytest.fixture(scope="module")
def indexed_video(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("indexed")
    path = root / "count.mkv"
    with av.open(str(path), "w") as c:
        stream = c.add_stream("ffv1", rate=SRC_FPS)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "bgr0"
        for k in range(NUM_FRAMES):
            frame = np.full((24, 32, 3), LEVEL * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    (root / "list.txt").write_text("count.mkv 0\n")
    return path


def _taken(views: torch.Tensor, config: dict) -> list[int]:
    """The frame index each step shows, read back from the normalised grey level of its view 0."""
    mean, std = config["mean"][0], config["std"][0]
    level = views[0, :, 0].mean(dim=(-1, -2)) * std + mean  # (t,) in [0, 1]
    return [int(round(float(v) * 255 / LEVEL)) for v in level]


def test_fps_sampling_takes_the_frames_shown_at_each_time(indexed_video):
    config = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0,
              "interpolation": "bilinear", "crop_mode": "center"}
    for sampling, want in ((Sampling(fps=10), AT_10_FPS), (Sampling(), list(range(NUM_FRAMES))),
                           (Sampling(fps=SRC_FPS), list(range(NUM_FRAMES))),
                           (Sampling(num_segments=3), [5, 15, 25])):
        settings = FeatureSettings(backbone="test_resnet", data_config=config, sampling=sampling)
        chunks = list(video_views(indexed_video, settings, chunk=4))  # several chunks: order kept across them
        assert [c.start for c in chunks] == list(range(0, len(want), 4))
        taken = [i for c in chunks for i in _taken(c.views, config)]
        assert taken == want, (sampling, taken)


def test_extract_stores_the_features_of_exactly_those_frames(indexed_video, tmp_path):
    root = indexed_video.parent
    out = tmp_path / "feats"
    assert main(["--list", str(root / "list.txt"), "--root", str(root), "--out", str(out), "--backbone",
                 "test_resnet", "--weights", "none", "--fps", "10", "--workers", "0", "--device", "cpu",
                 "--no-progress"]) == 0
    stored = FeatureFolder(out).load("count.mkv").astype(np.float32)  # (T, D)
    assert stored.shape[0] == len(AT_10_FPS)
    assert json.loads((out / "settings.json").read_text())["sampling"] == {"mode": "fps", "fps": 10.0,
                                                                          "num_segments": None}
    encoder = FrameEncoder("test_resnet", weights="none")
    grey = np.stack([np.full((24, 32, 3), LEVEL * k, np.uint8) for k in range(NUM_FRAMES)])  # the source, by hand
    feats = encoder.encode(eval_views(grey, encoder.data_config)[0]).numpy()  # (30, D): every frame
    np.testing.assert_allclose(stored, feats[AT_10_FPS], rtol=2e-3, atol=2e-3)
    shifted = [min(k + 1, NUM_FRAMES - 1) for k in AT_10_FPS]  # one frame late: other features
    assert np.abs(stored - feats[shifted]).max() > 1e-2
