"""`eleatt fuse` and `pipeline.evaluation.fusion` on hand-made scores files with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.cli import main as eleatt
from pipeline.evaluation.fusion import fuse_probs, fuse_scores, main, search_weights
from pipeline.evaluation.scores import read_scores, write_scores

CLASSES = ["jump", "run", "walk"]


def one_hot_ish(labels, right, confidence=0.8):
    """(N, 3) probabilities: `confidence` on the label where `right`, else on the next class; rest shared."""
    n = len(labels)
    probs = np.full((n, 3), (1 - confidence) / 2)
    hit = np.where(right, labels, (np.asarray(labels) + 1) % 3)
    probs[np.arange(n), hit] = confidence
    return probs


@pytest.fixture
def two_streams(tmp_path):
    """RGB right on videos 0-3, flow right on videos 2-5, six labelled videos; flow lists them in reverse order.
    RGB is sure (0.6) where right and unsure (0.45) where wrong; flow the same, so 1:1 fusion is right on all."""
    videos = [f"c{i % 3}/v{i}.mp4" for i in range(6)]
    labels = np.array([i % 3 for i in range(6)])
    rgb = one_hot_ish(labels, np.arange(6) < 4, 0.6)
    rgb[4:] = one_hot_ish(labels[4:], [False, False], 0.45)
    flow = one_hot_ish(labels, np.arange(6) >= 2, 0.6)
    flow[:2] = one_hot_ish(labels[:2], [False, False], 0.45)
    write_scores(tmp_path / "rgb.npz", videos, rgb, labels, CLASSES)
    write_scores(tmp_path / "flow.npz", videos[::-1], flow[::-1], labels[::-1], CLASSES)
    return {"videos": videos, "labels": labels, "rgb": rgb, "flow": flow, "dir": tmp_path}


def test_fuse_probs_known_values():
    a = np.array([[0.8, 0.2], [0.5, 0.5]])
    b = np.array([[0.2, 0.8], [0.9, 0.1]])
    np.testing.assert_allclose(fuse_probs([a, b], [1, 1.5]), (a + 1.5 * b) / 2.5, atol=1e-7)
    geo = np.sqrt(a * b)  # logit mode with equal weights: the normalised geometric mean
    np.testing.assert_allclose(fuse_probs([a, b], [1, 1], "logit"), geo / geo.sum(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(fuse_probs([a, b], [1, 0], "logit"), a, atol=1e-6)  # weight 0: stream ignored
    with pytest.raises(ValueError, match="one weight per"):
        fuse_probs([a, b], [1])
    with pytest.raises(ValueError, match=">= 0"):
        fuse_probs([a, b], [1, -1])


def test_different_video_orders_are_aligned(two_streams, capsys):
    d = two_streams["dir"]
    code = main(["--scores", str(d / "rgb.npz"), str(d / "flow.npz"), "--out", str(d / "fused.npz")])
    assert code == 0
    fused = read_scores(d / "fused.npz")
    assert list(fused["videos"]) == two_streams["videos"]  # the first file's order
    expected = (two_streams["rgb"] + 1.5 * two_streams["flow"]) / 2.5  # the default 1 : 1.5
    np.testing.assert_allclose(fused["scores"], expected, atol=1e-6)
    np.testing.assert_array_equal(fused["labels"], two_streams["labels"])
    assert list(fused["classes"]) == CLASSES
    np.testing.assert_array_equal(fused["weights"], np.array([1, 1.5], dtype=np.float32))
    assert fused["weights"].dtype == np.float32
    assert list(fused["inputs"]) == [str(d / "rgb.npz"), str(d / "flow.npz")]
    assert (d / "confusion_fused.png").stat().st_size > 1000
    out = capsys.readouterr().out
    # the table: RGB 4/6 right, flow 4/6 right, fusion 6/6; top-3 of 3 classes is always right
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows[str(d / "rgb.npz")][2:] == ["66.7%", "100.0%", "66.7%"]
    assert rows[str(d / "flow.npz")][1:] == ["1.5", "66.7%", "100.0%", "66.7%"]
    assert rows["fused"][1:] == ["100.0%", "100.0%", "100.0%"]


def test_fused_file_round_trips(two_streams):
    d = two_streams["dir"]
    fused = fuse_scores([read_scores(d / "rgb.npz"), read_scores(d / "flow.npz")], [2, 1], names=["a", "b"])
    write_scores(d / "f.npz", list(fused["videos"]), fused["scores"], fused["labels"], list(fused["classes"]),
                 extra={"weights": fused["weights"], "inputs": fused["inputs"]})
    back = read_scores(d / "f.npz")
    assert set(back) == {"videos", "scores", "labels", "classes", "weights", "inputs"}
    for key in back:
        np.testing.assert_array_equal(back[key], fused[key])
    # a fused file is itself a scores file: fusing it alone (weight 1) gives it back
    again = fuse_scores([back], names=["f"])
    np.testing.assert_allclose(again["scores"], back["scores"], atol=1e-7)


def test_logit_mode_through_the_cli(two_streams):
    d = two_streams["dir"]
    assert main(["--scores", str(d / "rgb.npz"), str(d / "flow.npz"), "--mode", "logit", "--weights", "1", "1",
                 "--out", str(d / "g.npz"), "--no-plot"]) == 0
    fused = read_scores(d / "g.npz")
    geo = np.sqrt(two_streams["rgb"] * two_streams["flow"])
    np.testing.assert_allclose(fused["scores"], geo / geo.sum(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(fused["scores"].sum(1), 1, atol=1e-6)  # stored as probabilities
    assert not (d / "confusion_g.png").exists()


def test_missing_videos_fuse_the_common_ones_with_exit_3(two_streams, tmp_path, capsys):
    d = two_streams["dir"]
    part = read_scores(d / "flow.npz")
    keep = [i for i, v in enumerate(part["videos"]) if v not in ("c0/v0.mp4", "c1/v4.mp4")]
    write_scores(tmp_path / "part.npz", list(part["videos"][keep]), part["scores"][keep], part["labels"][keep],
                 CLASSES)
    code = eleatt(["fuse", "--scores", str(d / "rgb.npz"), str(tmp_path / "part.npz"), "--out",
                   str(tmp_path / "fused.npz")])
    assert code == 3
    err = capsys.readouterr().err
    assert "2 of 6 videos are not in every file" in err and "the 4 common ones" in err
    assert f"{tmp_path / 'part.npz'} lacks 2: c0/v0.mp4, c1/v4.mp4" in err
    fused = read_scores(tmp_path / "fused.npz")
    assert list(fused["videos"]) == ["c1/v1.mp4", "c2/v2.mp4", "c0/v3.mp4", "c2/v5.mp4"]


def test_different_class_lists_are_refused(two_streams, tmp_path, capsys):
    d = two_streams["dir"]
    other = read_scores(d / "flow.npz")
    write_scores(tmp_path / "other.npz", list(other["videos"]), other["scores"], other["labels"],
                 ["jump", "walk", "run"])
    assert eleatt(["fuse", "--scores", str(d / "rgb.npz"), str(tmp_path / "other.npz"),
                   "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "class 1 is 'run'" in err and "but 'walk'" in err and "other.npz" in err
    assert not (tmp_path / "x.npz").exists()
    # a different number of classes is refused too
    write_scores(tmp_path / "more.npz", list(other["videos"]), np.hstack([other["scores"], other["scores"][:, :1]]),
                 other["labels"], [*CLASSES, "swim"])
    assert eleatt(["fuse", "--scores", str(d / "rgb.npz"), str(tmp_path / "more.npz")]) == 2
    assert "class 3 is (end of list)" in capsys.readouterr().err


def test_weight_search_picks_the_best_on_validation(tmp_path, capsys):
    """On validation, stream B is right on 3 of 4 videos and A on 2: only weights of B in (1/3, 1.9) get all 4
    right, and among them the likelihood prefers one (found by brute force below, independently of the search's
    loop). The test files play no part in that choice."""
    videos = ["a", "b", "c", "d"]
    labels = np.array([0, 1, 0, 1])
    a = np.array([[0.88, 0.12], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    b = np.array([[0.3, 0.7], [0.3, 0.7], [0.8, 0.2], [0.2, 0.8]])
    write_scores(tmp_path / "val_a.npz", videos, a, labels, ["x", "y"])
    write_scores(tmp_path / "val_b.npz", videos[::-1], b[::-1], labels[::-1], ["x", "y"])
    picked = search_weights([read_scores(tmp_path / "val_a.npz"), read_scores(tmp_path / "val_b.npz")])
    fused = lambda w: (a + w * b) / (1 + w)
    top1 = {w: (fused(w).argmax(1) == labels).mean() for w in np.arange(0, 3.01, 0.25)}
    assert {w for w, t in top1.items() if t == 1} == {0.5, 0.75, 1.0, 1.25, 1.5, 1.75}
    nll = {w: -np.log(fused(w)[np.arange(4), labels]).mean() for w in top1 if top1[w] == 1}
    assert picked["weights"] == [1.0, min(nll, key=nll.get)] and picked["top1"] == 1.0 and picked["tried"] == 13

    # the CLI applies the picked weights to the test files (here: other videos) and says so
    write_scores(tmp_path / "test_a.npz", ["e", "f"], np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 0]), ["x", "y"])
    write_scores(tmp_path / "test_b.npz", ["e", "f"], np.array([[0.1, 0.9], [0.9, 0.1]]), np.array([0, 0]), ["x", "y"])
    assert main(["--scores", str(tmp_path / "test_a.npz"), str(tmp_path / "test_b.npz"), "--search-weights",
                 str(tmp_path / "val_a.npz"), str(tmp_path / "val_b.npz"), "--out", str(tmp_path / "t.npz"),
                 "--no-plot"]) == 0
    w = picked["weights"][1]
    assert f"picked weights 1 : {w:g} on validation (4 labelled videos, 13 weightings tried)" in capsys.readouterr().out
    np.testing.assert_array_equal(read_scores(tmp_path / "t.npz")["weights"], np.array([1, w], dtype=np.float32))


def test_weight_search_refusals(two_streams, capsys):
    d = two_streams["dir"]
    rgb, flow = str(d / "rgb.npz"), str(d / "flow.npz")
    assert eleatt(["fuse", "--scores", rgb, flow, "--search-weights", rgb]) == 2
    assert "1 validation files for 2 --scores files" in capsys.readouterr().err
    assert eleatt(["fuse", "--scores", rgb, flow, "--search-weights", rgb, flow, "--weights", "1", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert eleatt(["fuse", "--scores", rgb, flow, "--weights", "1"]) == 2
    assert "1 weights given for 2 streams" in capsys.readouterr().err
    assert eleatt(["fuse", "--scores", rgb, str(d / "nope.npz")]) == 2
    assert "nope.npz' not found" in capsys.readouterr().err
    assert eleatt(["fuse", "--scores", rgb, flow, "--out", rgb]) == 2
    assert "is one of the input files" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as stop:
        eleatt(["fuse", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--scores", "--weights", "--mode", "--search-weights", "--out"):
        assert flag in out
    eleatt(["--help"])
    assert "fuse" in capsys.readouterr().out


def test_unnamed_classes_conflicting_labels_and_repeated_videos(tmp_path, capsys):
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    write_scores(tmp_path / "a.npz", ["x", "y", "x"], probs, np.array([0, 1, 0]), None)
    write_scores(tmp_path / "b.npz", ["x", "x", "y"], probs[[2, 0, 1]] * 0 + 0.5, np.array([0, 0, 1]), None)
    # no class names: the number of classes must agree
    write_scores(tmp_path / "c.npz", ["x"], np.ones((1, 3)) / 3, np.array([0]), None)
    assert eleatt(["fuse", "--scores", str(tmp_path / "a.npz"), str(tmp_path / "c.npz")]) == 2
    assert "c.npz scores 3 classes but" in capsys.readouterr().err
    # a video listed twice: the k-th occurrences are matched
    fused = fuse_scores([read_scores(tmp_path / "a.npz"), read_scores(tmp_path / "b.npz")], [1, 1])
    assert list(fused["videos"]) == ["x", "y", "x"] and "classes" not in fused and not fused["missing"]
    np.testing.assert_allclose(fused["scores"], (probs + 0.5) / 2, atol=1e-7)
    # a video labelled differently by two files is refused, naming it
    write_scores(tmp_path / "d.npz", ["x", "y", "x"], probs, np.array([0, 0, 0]), None)
    assert eleatt(["fuse", "--scores", str(tmp_path / "a.npz"), str(tmp_path / "d.npz")]) == 2
    assert "video 'y' has different labels" in capsys.readouterr().err


def test_a_file_that_is_not_a_scores_file_is_one_line(tmp_path, capsys):
    from pipeline.cli import main as eleatt

    empty, other = tmp_path / "empty.npz", tmp_path / "other.npz"
    empty.write_bytes(b"")
    np.savez(other, x=np.zeros(3))
    for bad in (empty, other, tmp_path / "absent.npz"):
        assert eleatt(["fuse", "--scores", str(bad), str(bad), "--out", str(tmp_path / "f.npz")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(bad) in err, err
