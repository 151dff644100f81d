"""pipeline.training.clip_data: clips straight from generated videos (shapes, exact frames, views), unreadable videos
reported by path and skipped, the data module's lists and settings."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.lists import ListEntry, read_list
from pipeline.data.transforms import eval_views
from pipeline.data.video import load_frames
from pipeline.training.clip_data import VideoClipDataset, VideoDataModule, backbone_data_config, collate_clips


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """4 classes x 4 generated videos (16 frames, 48 px): train 8, val 4, test 4, with classes.txt."""
    from preprocessing.synthetic import make_dataset

    out = tmp_path_factory.mktemp("e2e_videos")
    make_dataset(out, videos_per_class=4, num_frames=16, size=48, seed=0,
                 classes=["grow", "shrink", "move_right", "move_left"])
    return out


def test_backbone_data_config_follows_timm_and_overrides():
    cfg = backbone_data_config("test_resnet")
    assert cfg["input_size"] == (3, 160, 160) and cfg["mean"] == (0.5, 0.5, 0.5)
    assert backbone_data_config("test_resnet", frame_size=32, in_chans=10)["input_size"] == (10, 32, 32)
    with pytest.raises(ValueError, match="unknown timm backbone 'no_such_net'"):
        backbone_data_config("no_such_net")


def test_eval_clips_are_the_segment_centres_through_the_eval_views(videos):
    entries = read_list(videos / "test.txt")
    cfg = backbone_data_config("test_resnet", frame_size=32)
    ds = VideoClipDataset(videos, entries, cfg, num_segments=4, train=False, views="three")
    sample = ds[1]
    assert sample["feats"].shape == (3, 4, 3, 32, 32) and sample["video"] == entries[1].path
    assert sample["label"] == entries[1].label and sample["index"] == 1 and sample["skipped"] == []
    # 16 frames, 4 segments: centres 2, 6, 10, 14, decoded exactly and through the shared evaluation views
    expected = eval_views(load_frames(videos / entries[1].path, [2, 6, 10, 14]), cfg, "three")
    torch.testing.assert_close(sample["feats"], expected)


def test_train_clips_are_random_per_segment_and_seeded(videos):
    entries = read_list(videos / "train.txt")
    ds = VideoClipDataset(videos, entries, backbone_data_config("test_resnet", frame_size=32), num_segments=4,
                          train=True)
    torch.manual_seed(0)
    a = ds[0]["feats"]
    torch.manual_seed(0)
    b = ds[0]["feats"]
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)  # randomness from torch's generator: seeded runs repeat
    batch = collate_clips([ds[i] for i in range(3)])
    assert batch["feats"].shape == (3, 4, 3, 32, 32) and batch["lengths"].tolist() == [4, 4, 4]
    assert batch["indices"].tolist() == [0, 1, 2] and batch["skipped"] == []


def test_unreadable_videos_are_logged_counted_and_skipped(videos, tmp_path, caplog):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    good = read_list(videos / "train.txt")[:2]
    entries = [ListEntry(str((videos / good[0].path).resolve()), good[0].label),
               ListEntry(str(tmp_path / "broken.mp4"), 1), ListEntry(str(tmp_path / "missing.mp4"), 2),
               ListEntry(str((videos / good[1].path).resolve()), good[1].label)]
    cfg = backbone_data_config("test_resnet", frame_size=32)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.clip_data"):
        evaluation = collate_clips([VideoClipDataset("/", entries, cfg, 2)[i] for i in range(4)])
    # evaluation: the two bad videos are left out of the batch, named with their reasons
    assert evaluation["videos"] == [entries[0].path, entries[3].path] and evaluation["feats"].shape[0] == 2
    assert [v for v, _ in evaluation["skipped"]] == [entries[1].path, entries[2].path]
    assert "not a video FFmpeg can read" in evaluation["skipped"][0][1] and "no such file" in evaluation["skipped"][1][1]
    assert sum("broken.mp4" in r.getMessage() for r in caplog.records) == 1
    # training: a bad video is replaced by another one of the list, and still reported
    train = VideoClipDataset("/", entries, cfg, 2, train=True)
    sample = train[1]
    assert sample["feats"] is not None and sample["video"] != entries[1].path
    assert sample["skipped"][0][0] == entries[1].path
    # a list of nothing but bad videos ends with an error naming them, not an endless loop
    with pytest.raises(ValueError, match="videos in a row .* cannot be read .*broken.mp4"):
        VideoClipDataset("/", entries[1:3], cfg, 2, train=True)[0]
    empty = collate_clips([VideoClipDataset("/", entries, cfg, 2)[1]])
    assert empty["videos"] == [] and empty["feats"].shape[0] == 0 and len(empty["skipped"]) == 1


def test_data_module_reads_lists_classes_and_records_settings(videos):
    dm = VideoDataModule(str(videos), train_list=str(videos / "train.txt"), val_list=str(videos / "val.txt"),
                         backbone="test_resnet", frame_size=32, num_segments=4, batch_size=4, num_workers=0)
    assert dm.num_classes == 4 and dm.class_names == ["grow", "shrink", "move_right", "move_left"]
    assert dm.in_chans == 3 and dm.data_config["input_size"] == (3, 32, 32)
    assert dm.extraction_settings["sampling"] == {"mode": "segments", "fps": None, "num_segments": 4}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["feats"].shape == (4, 4, 3, 32, 32)
    val = next(iter(dm.val_dataloader()))
    assert val["feats"].shape == (4, 1, 4, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="video_root '.*nowhere' not found"):
        VideoDataModule(str(videos / "nowhere"), train_list=str(videos / "train.txt"))
    with pytest.raises(ValueError, match="`test` needs --data.test_list"):
        dm.setup("test")


def test_data_module_workers_read_the_same_clips(videos):
    """Readers are opened per call inside each worker: a 2-worker loader yields what the main process reads."""
    kwargs = dict(test_list=str(videos / "test.txt"), backbone="test_resnet", frame_size=32, num_segments=4,
                  batch_size=2)
    batches = {}
    for workers in (0, 2):
        dm = VideoDataModule(str(videos), num_workers=workers, **kwargs)
        dm.setup("test")
        batches[workers] = list(dm.test_dataloader())
    for a, b in zip(batches[0], batches[2]):
        assert a["videos"] == b["videos"]
        np.testing.assert_array_equal(a["feats"].numpy(), b["feats"].numpy())


# A flow folder of one video written in a fresh process (once decord is loaded in a process, OpenCV's PNG encoder
# there can fail and the flow files come out damaged). 6 identical pairs of 24 x 24 px, bound 20; the levels are
# picked so that f / bound is a round number: q = 204 -> +0.6, 153 -> +0.2, 102 -> -0.2, 51 -> -0.6.
# x (horizontal motion, to the right): +0.6 on the left half (columns 0-11), +0.2 on the right half;
# y: -0.2 on the left half, -0.6 on the right half.
MIRROR_FLOW = """
import sys
import numpy as np
from pathlib import Path
from pipeline.data.flow_files import FlowFolder
from pipeline.data.lists import ListEntry, write_classes, write_list

root = Path(sys.argv[1])
q = np.zeros((6, 2, 24, 24), np.uint8)
q[:, 0, :, :12], q[:, 0, :, 12:] = 204, 153
q[:, 1, :, :12], q[:, 1, :, 12:] = 102, 51
FlowFolder(root / "flows").write_quantized("c0/v0.avi", q, 20.0)
write_list(root / "train.txt", [ListEntry("c0/v0.avi", 0), ListEntry("c0/v0.avi", 0)])
write_classes(root / "classes.txt", ["right"])
"""

# The channels x1, y1, x2, y2 at the left-most and right-most output columns (every row alike).
UNFLIPPED = {"left": [0.6, -0.2, 0.6, -0.2], "right": [0.2, -0.6, 0.2, -0.6]}
# Mirrored: the columns swap sides, and x (channels 0 and 2) changes sign; y keeps its sign.
FLIPPED = {"left": [-0.2, -0.6, -0.2, -0.6], "right": [-0.6, -0.2, -0.6, -0.2]}


@pytest.fixture(scope="module")
def mirror_flow(tmp_path_factory) -> Path:
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mirror_flow")
    subprocess.run([sys.executable, "-c", MIRROR_FLOW, str(root)], cwd=Path(__file__).resolve().parents[2],
                   check=True, timeout=120)
    return root


def _edges(clip: torch.Tensor) -> dict[str, list[float]]:
    """clip (T, 4, H, W) -> the channels at the left and right edge column; each must be the same on every frame
    and row (the hand-made flow varies only from left to right)."""
    left, right = clip[..., 0], clip[..., -1]  # (T, 4, H)
    for edge in (left, right):
        torch.testing.assert_close(edge, edge[:1, :, :1].expand_as(edge), atol=1e-5, rtol=0)
    return {"left": left[0, :, 0].tolist(), "right": right[0, :, 0].tolist()}


def test_training_flow_clips_mirror_the_image_and_negate_x(mirror_flow):
    cfg = backbone_data_config("test_resnet", frame_size=16, in_chans=4)
    cfg.update(mean=(0.0,), std=(1.0,))  # as VideoDataModule sets for flow: stacks come as f / bound
    ds = VideoClipDataset(mirror_flow / "flows", read_list(mirror_flow / "train.txt"), cfg, num_segments=3,
                          train=True, modality="flow", flow_length=2)
    torch.manual_seed(0)
    seen = {"flipped": 0, "unflipped": 0}
    for _ in range(16):
        clip = ds[0]["feats"]
        assert clip.shape == (3, 4, 16, 16)
        edges = _edges(clip)
        kind = "flipped" if edges["left"][0] < 0 else "unflipped"  # x > 0 everywhere unless mirrored
        expected = FLIPPED if kind == "flipped" else UNFLIPPED
        for side in ("left", "right"):
            np.testing.assert_allclose(edges[side], expected[side], atol=1e-5, err_msg=f"{kind} {side}")
        seen[kind] += 1
    assert seen["flipped"] >= 3 and seen["unflipped"] >= 3, seen  # the flip is drawn, about half the time

    # The data module's training batches are those clips (flow: mean 0, std 1; 4 channels for L = 2).
    dm = VideoDataModule(str(mirror_flow / "flows"), train_list=str(mirror_flow / "train.txt"), modality="flow",
                         flow_length=2, backbone="test_resnet", frame_size=16, num_segments=3, batch_size=2,
                         num_workers=0)
    dm.setup("fit")
    torch.manual_seed(1)
    kinds = set()
    for _ in range(4):
        for clip in next(iter(dm.train_dataloader()))["feats"]:
            edges = _edges(clip)
            kind = "flipped" if edges["left"][0] < 0 else "unflipped"
            np.testing.assert_allclose(edges["left"], (FLIPPED if kind == "flipped" else UNFLIPPED)["left"], atol=1e-5)
            np.testing.assert_allclose(edges["right"], (FLIPPED if kind == "flipped" else UNFLIPPED)["right"], atol=1e-5)
            kinds.add(kind)
    assert kinds == {"flipped", "unflipped"}


def test_evaluation_flow_clips_are_never_mirrored(mirror_flow):
    cfg = backbone_data_config("test_resnet", frame_size=16, in_chans=4)
    cfg.update(mean=(0.0,), std=(1.0,))
    entries = read_list(mirror_flow / "train.txt")
    views = VideoClipDataset(mirror_flow / "flows", entries, cfg, num_segments=3, views="three", modality="flow",
                             flow_length=2)[0]["feats"]
    assert views.shape == (3, 3, 4, 16, 16)
    # the three crops (left, centre, right of a square frame: all the same box here) keep the original orientation
    for view in views:
        edges = _edges(view)
        np.testing.assert_allclose(edges["left"], UNFLIPPED["left"], atol=1e-5)
        np.testing.assert_allclose(edges["right"], UNFLIPPED["right"], atol=1e-5)
    # ten views would mirror half of the crops; the dataset refuses them for flow rather than flip x wrongly
    with pytest.raises(ValueError, match="views='ten' mirrors crops"):
        VideoClipDataset(mirror_flow / "flows", entries, cfg, views="ten", modality="flow", flow_length=2)
