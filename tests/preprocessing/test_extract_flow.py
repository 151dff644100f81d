"""`eleatt extract --modality flow`: flow stacks from a flow folder -> flow-stream features (settings, views,
batching invariance, refusals, missing flow)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.features import FeatureFolder, FeatureSettings
from pipeline.data.flow_files import FlowFile, FlowFolder, FlowOptions, flow_data_config, flow_stack, flow_info
from pipeline.data.views import video_views
from pipeline.data.sampling import Sampling
from pipeline.data.transforms import hflip
from pipeline.nn.backbone import FrameEncoder
from preprocessing.extract import main
from preprocessing.flow import main as flow_main

STACK = 3


@pytest.fixture(scope="module")
def flows(synthetic_dataset, tmp_path_factory) -> tuple[Path, list[str], Path]:
    """A flow folder (`eleatt flow`, stored size) of four generated videos: (folder, videos, list)."""
    lines = (synthetic_dataset / "train.txt").read_text().splitlines()[:4]
    videos = [line.rsplit(maxsplit=1)[0] for line in lines]
    tmp = tmp_path_factory.mktemp("flow_stream")
    lst = tmp / "list.txt"
    lst.write_text("".join(f"{v} 0\n" for v in videos))
    out = tmp / "flows"
    assert flow_main(["--list", str(lst), "--root", str(synthetic_dataset), "--out", str(out), "--short-side", "0",
                      "--workers", "1", "--no-progress"]) == 0
    return out, videos, lst


def _args(lst: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return ["--modality", "flow", "--root", str(root), "--list", str(lst), "--out", str(out), "--backbone",
            "test_resnet", "--weights", "none", "--device", "cpu", "--no-progress", *extra]


def test_views_are_normalised_flow_stacks_and_flip_negates_x(flows):
    """With a data config that neither resizes nor crops, the network input is exactly flow_stack / bound."""
    folder, videos, _ = flows
    path = FlowFolder(folder).feature_path(videos[0])
    info = flow_info(path)
    h, w = info["height"], info["width"]
    config = flow_data_config({"input_size": (3, h, w), "mean": (0.4,) * 3, "std": (0.2,) * 3, "crop_pct": 1.0,
                               "interpolation": "bilinear", "crop_mode": "squash"}, STACK)
    assert config["input_size"] == (2 * STACK, h, w) and config["mean"] == (0.5,) * 6 and config["std"] == (0.5,) * 6
    settings = FeatureSettings(modality="flow", backbone="test_resnet", data_config=config, in_chans=2 * STACK,
                               stack=STACK, sampling=Sampling(num_segments=4), options=FlowOptions().to_options())
    views = torch.cat([c.views for c in video_views(path, settings)], dim=1)  # (1, 4, 2L, H, W)
    positions = Sampling(num_segments=4).indices(info["pairs"], 0.0)
    expected = flow_stack(path, positions, STACK)  # (4, 2L, H, W) interleaved x1, y1, ..., normalised by the bound
    torch.testing.assert_close(views[0], torch.from_numpy(expected), atol=1e-6, rtol=0)
    # the ten views: the five mirrored crops are the five crops flipped the flow way (x negated), exactly
    ten = settings.replace(views="ten", data_config={**config, "input_size": (2 * STACK, h - 8, w - 8)})
    views = next(video_views(FlowFile(path), ten)).views  # (10, t, 2L, h', w')
    torch.testing.assert_close(views[5:], hflip(views[:5], flow=True), atol=1e-6, rtol=0)


def test_extract_flow_features_settings_batching_and_refusals(flows, tmp_path, capsys):
    folder, videos, lst = flows
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(lst, folder, a, "--stack", str(STACK), "--batch-size", "1", "--workers", "0")) == 0
    assert main(_args(lst, folder, b, "--stack", str(STACK), "--batch-size", "7", "--workers", "1")) == 0
    fa, fb = FeatureFolder(a), FeatureFolder(b)
    settings = fa.settings
    assert (settings.modality, settings.stack, settings.in_chans, settings.backbone) == ("flow", STACK, 6,
                                                                                          "test_resnet")
    assert settings.input_size[0] == 6 and settings.data_config["mean"] == [0.5] * 6
    assert FlowOptions.of(settings) == FlowOptions.of(FlowFolder(folder).settings)  # classify recomputes with these
    enc = FrameEncoder("test_resnet", weights="none", in_chans=6)
    assert settings.dim == enc.num_features
    for video in videos:
        pairs = flow_info(FlowFolder(folder).feature_path(video))["pairs"]
        feats = fa.load(video)
        assert feats.shape == (pairs, enc.num_features)  # sampling "all": one step per flow field (T - 1)
        np.testing.assert_allclose(feats.astype(np.float32), fb.load(video).astype(np.float32), atol=2e-3, rtol=2e-3)
    # the features are the backbone's on the data side's views
    first = torch.cat([c.views for c in video_views(FlowFolder(folder).feature_path(videos[0]), settings)], dim=1)
    np.testing.assert_allclose(fa.load(videos[0]).astype(np.float32),
                               enc.encode_stored(first[0]).numpy(), atol=2e-3, rtol=2e-3)

    capsys.readouterr()
    assert main(_args(lst, folder, a, "--stack", str(STACK))) == 0  # resumed: nothing to do
    assert f"0 done, {len(videos)} skipped" in capsys.readouterr().out
    assert main(_args(lst, folder, a, "--stack", "2")) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "stack: stored 3, asked 2" in err
    # a list video without flow fails alone (listed), the others are kept
    lst2 = tmp_path / "more.txt"
    lst2.write_text(lst.read_text() + "no/such.mp4 1\n")
    assert main(_args(lst2, folder, a, "--stack", str(STACK))) == 3
    assert "failed: no/such.mp4" in capsys.readouterr().out
    # the root must be a flow folder; --stack is for flow only
    assert main(_args(lst, tmp_path, tmp_path / "c")) == 2
    assert "is not a flow folder" in capsys.readouterr().err
    assert main([*_args(lst, folder, tmp_path / "d")[2:], "--stack", "2"]) == 2  # --modality rgb (default)
    assert "--stack 2 is for --modality flow" in capsys.readouterr().err


def test_compute_flow_gives_the_stored_levels(flows, synthetic_dataset):
    """The pipeline-side computation (what classify uses) gives exactly the levels `eleatt flow` stored."""
    from pipeline.data.flow_files import load_quantized
    from tests.helpers import compute_flow
    from pipeline.data.video import load_frames, probe

    folder, videos, _ = flows
    path = synthetic_dataset / videos[1]
    frames = load_frames(path, np.arange(probe(path).num_frames), backend="pyav").numpy()  # (T, H, W, 3)
    options = FlowOptions.of(FlowFolder(folder).settings)
    q = compute_flow(frames, options.method, options.preset, options.short_side, options.bound)
    stored, bound = load_quantized(FlowFolder(folder).feature_path(videos[1]))
    assert q.dtype == np.uint8 and bound == options.bound and np.array_equal(q, stored)
