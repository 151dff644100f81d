"""The generated dataset: pairs differ only in time order, files decode to exactly the rendered frames, seeds."""
from __future__ import annotations

import colorsys

import av
import numpy as np
import pytest

from pipeline.data.lists import read_classes, read_list
from preprocessing import prepare
from preprocessing.synthetic import (
    CLASSES,
    PAIRS,
    make_dataset,
    render_video,
    split_counts,
    video_seed,
    write_lossless_video,
)


def decode(path) -> np.ndarray:
    """All frames of a video with PyAV: uint8 (T, H, W, 3) RGB."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("forward,backward", PAIRS)
def test_pair_is_the_same_video_reversed(forward, backward):
    for seed in range(3):
        a = render_video(forward, video_seed(seed, "pair", 0), num_frames=12, size=32)
        b = render_video(backward, video_seed(seed, "pair", 0), num_frames=12, size=32)
        assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(b, a[::-1])
        # The order-only property: the same multiset of frames ...
        assert sorted(f.tobytes() for f in a) == sorted(f.tobytes() for f in b)
        # ... yet a real change over time, so the order is all that tells the classes apart.
        assert np.abs(a[0].astype(int) - a[-1].astype(int)).mean() > 2.0


def _object_mask(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: the bright saturated object against the dark background (max channel > 150)."""
    return frames.max(axis=-1) > 150


def test_forward_classes_move_the_way_their_names_say():
    t, s = 16, 64
    for seed in range(4):
        grow = _object_mask(render_video("grow", seed, t, s)).sum(axis=(1, 2))
        assert np.all(np.diff(grow) >= 0) and grow[-1] > 3 * grow[0]

        mask = _object_mask(render_video("move_right", seed, t, s))
        cx = np.array([np.nonzero(m)[1].mean() for m in mask])
        assert np.all(np.diff(cx) > 0)

        bright = render_video("brighten", seed, t, s).astype(float).mean(axis=(1, 2, 3))
        assert np.all(np.diff(bright) > 0)

        frames = render_video("hue_forward", seed, t, s)
        mask = _object_mask(frames)
        hues = np.array([colorsys.rgb_to_hsv(*(f[m].mean(0) / 255))[0] for f, m in zip(frames, mask)])
        steps = (np.diff(hues) + 0.5) % 1.0 - 0.5  # signed hue change in turns
        assert np.all(steps > 0), steps
        # The square stays put (only its edge pixels may cross the threshold as the colour changes): no flow.
        assert mask.all(axis=0).sum() >= 0.9 * mask.sum(axis=(1, 2)).max()

        # Clockwise on screen (rows grow downwards): the hand's angle, atan2(dy, dx) about the pivot, increases.
        frames = render_video("rotate_cw", seed, t, s)
        mask = _object_mask(frames)
        pivot = np.argwhere(mask.all(axis=0)).mean(axis=0)  # the hub is covered in every frame
        angles = []
        for m in mask:
            ys, xs = np.nonzero(m)
            far = (ys - pivot[0]) ** 2 + (xs - pivot[1]) ** 2 > (0.15 * s) ** 2  # the hand, not the hub
            angles.append(np.arctan2((ys[far] - pivot[0]).mean(), (xs[far] - pivot[1]).mean()))
        turn = (np.diff(angles) + np.pi) % (2 * np.pi) - np.pi
        assert np.all(turn > 0), turn


def test_render_is_deterministic_and_seeded():
    a = render_video("rotate_ccw", video_seed(3, "rotate_ccw", 1), 8, 32)
    np.testing.assert_array_equal(a, render_video("rotate_ccw", video_seed(3, "rotate_ccw", 1), 8, 32))
    assert not np.array_equal(a, render_video("rotate_ccw", video_seed(4, "rotate_ccw", 1), 8, 32))
    assert not np.array_equal(a, render_video("rotate_ccw", video_seed(3, "rotate_ccw", 2), 8, 32))


def test_lossless_h264_round_trip_is_exact(tmp_path):
    # Uniform noise is the hardest content: any colour conversion or quantisation would show.
    frames = np.random.default_rng(0).integers(0, 256, size=(10, 48, 64, 3), dtype=np.uint8)
    path = tmp_path / "noise.mp4"
    write_lossless_video(path, frames, fps=12)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (64, 48)
        assert float(stream.average_rate) == 12
    np.testing.assert_array_equal(decode(path), frames)
    decord = pytest.importorskip("decord")
    np.testing.assert_array_equal(decord.VideoReader(str(path)).get_batch(list(range(10))).asnumpy(), frames)


def test_session_dataset_layout_and_frames(synthetic_dataset):
    root = synthetic_dataset
    assert read_classes(root / "classes.txt") == list(CLASSES)
    lists = {name: read_list(root / f"{name}.txt") for name in ("train", "val", "test")}
    n_train, n_val, n_test = split_counts(4)
    assert (n_train, n_val, n_test) == (2, 1, 1)
    for name, n in zip(lists, (n_train, n_val, n_test)):
        assert np.bincount([e.label for e in lists[name]], minlength=len(CLASSES)).tolist() == [n] * len(CLASSES)
    paths = [e.path for entries in lists.values() for e in entries]
    assert len(set(paths)) == len(paths) == 4 * len(CLASSES)  # each video (its own source) in one split only
    for entries in lists.values():
        for e in entries:
            name = CLASSES[e.label]
            assert e.path.startswith(f"videos/{name}/{name}_") and e.path.endswith(".mp4")
            assert (root / e.path).is_file()
    # Every file decodes to exactly the frames rendered for it (one video per class, to stay fast).
    for e in lists["test"]:
        name = CLASSES[e.label]
        k = int(e.path.rsplit("_", 1)[1].removesuffix(".mp4"))
        np.testing.assert_array_equal(decode(root / e.path), render_video(name, video_seed(0, name, k), 16, 64))


def test_make_dataset_is_deterministic(tmp_path):
    kwargs = dict(videos_per_class=3, num_frames=6, size=32, classes=["darken", "brighten"])
    a = make_dataset(tmp_path / "a", seed=5, **kwargs)
    b = make_dataset(tmp_path / "b", seed=5, **kwargs)
    c = make_dataset(tmp_path / "c", seed=6, **kwargs)
    assert b["counts"] == a["counts"] == c["counts"] and b["classes"] == a["classes"]
    assert a["classes"] == ["darken", "brighten"] and a["pairs"] == [("brighten", "darken")]
    assert a["counts"] == {"train": 2, "val": 2, "test": 2} and a["num_videos"] == 6
    for name in ("train.txt", "val.txt", "test.txt", "classes.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert [e.label for e in read_list(a["lists"]["train"])] == [0, 1]
    rel = "videos/darken/darken_2.mp4"
    np.testing.assert_array_equal(decode(tmp_path / "a" / rel), decode(tmp_path / "b" / rel))
    assert not np.array_equal(decode(tmp_path / "a" / rel), decode(tmp_path / "c" / rel))
    # A video does not depend on which other classes are made.
    expected = render_video("darken", video_seed(5, "darken", 2), 6, 32)
    np.testing.assert_array_equal(decode(tmp_path / "a" / rel), expected)
    assert c["seed"] == 6


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic class.*grow"):
        make_dataset(tmp_path, classes=["grow", "jump"])
    with pytest.raises(ValueError, match="at least 3"):
        make_dataset(tmp_path, videos_per_class=2)
    with pytest.raises(ValueError, match="num_frames >= 4"):
        render_video("grow", 0, num_frames=2)
    with pytest.raises(ValueError, match="uint8"):
        write_lossless_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_prepare_synthetic_command(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["synthetic", "--out", str(out), "--videos-per-class", "3", "--frames", "5", "--size", "24",
            "--classes", "move_left", "move_right", "--seed", "2"]
    assert prepare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 classes, 6 videos of 5 frames at 24x24" in printed and "move_left" in printed
    assert read_classes(out / "classes.txt") == ["move_left", "move_right"]
    assert len(read_list(out / "train.txt")) == 2
    assert decode(out / "videos/move_right/move_right_0.mp4").shape == (5, 24, 24, 3)
    with pytest.raises(ValueError, match="unknown synthetic class"):  # the eleatt CLI turns this into exit 2
        prepare.main(["synthetic", "--out", str(out), "--classes", "fly"])
    assert prepare.main(["synthetic", "--out", str(out), "--frames", "many"]) == 2  # argparse usage error
