"""`eleatt prepare ntu-skeleton` on a small generated NTU skeleton folder, and a short `fit` on what it writes."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as eleatt
from pipeline.data.features import FeatureFolder
from pipeline.data.lists import read_classes, read_list
from pipeline.data.skeleton import NUM_JOINTS, write_skeleton
from pipeline.evaluation.scores import read_scores
from preprocessing.splits import NTU60_TRAIN_SUBJECTS

REPO = Path(__file__).resolve().parents[2]
DIRECTIONS = {1: (1, 0), 2: (-1, 0), 3: (0, 1), 4: (0, -1)}  # action -> direction of the walk in x, y


def make_ntu_folder(root: Path, seed: int = 0, offset=(0.0, 0.0, 0.0)) -> dict:
    """An easy generated NTU-like folder: action A (1..4) is a body walking in DIRECTIONS[A] (3 cm a frame, 20
    frames, noisy), performers 1, 2, 4, 5 (cross-subject train) and 3 (test), cameras 1..3; plus one malformed
    file and one file without bodies. `offset` shifts every coordinate."""
    rng = np.random.default_rng(seed)
    names = []
    for action, (dx, dy) in DIRECTIONS.items():
        for performer in (1, 2, 3, 4, 5):
            for camera in (1, 2, 3):
                base = np.array([0, 0, 3.0]) + np.asarray(offset) + rng.normal(scale=0.3, size=(NUM_JOINTS, 3))
                frames = []
                for t in range(20):
                    joints = base + np.array([dx, dy, 0]) * 0.03 * t + rng.normal(scale=0.01, size=(NUM_JOINTS, 3))
                    frames.append([("72057594037927936", joints)])
                name = f"S001C{camera:03d}P{performer:03d}R001A{action:03d}"
                write_skeleton(root / "nturgb+d_skeletons" / f"{name}.skeleton", frames)
                names.append(name)
    bad = write_skeleton(root / "nturgb+d_skeletons" / "S001C001P001R002A001.skeleton",
                         [[("1", base)], [("1", base)]])
    lines = bad.read_text().splitlines()
    lines[7] = "0.1 0.2"  # a joint line cut short
    bad.write_text("\n".join(lines) + "\n")
    write_skeleton(root / "nturgb+d_skeletons" / "S001C002P001R002A001.skeleton", [[], []])  # no body
    return {"names": names, "bad": "nturgb+d_skeletons/S001C001P001R002A001.skeleton",
            "empty": "nturgb+d_skeletons/S001C002P001R002A001.skeleton"}


@pytest.fixture(scope="module")
def ntu(tmp_path_factory):
    root = tmp_path_factory.mktemp("ntu")
    info = make_ntu_folder(root / "raw")
    (root / "missing.txt").write_text("S001C002P001R002A001\n# comments are fine\n")
    return root, info


def prepare(*args: str) -> int:
    return eleatt(["prepare", "ntu-skeleton", "--no-progress", "--workers", "0", *args])


def test_prepare_writes_the_feature_folder_and_the_cross_subject_lists(ntu, tmp_path, capsys):
    root, info = ntu
    out = tmp_path / "out"
    code = prepare("--skeletons", str(root / "raw"), "--protocol", "cs", "--out", str(out),
                   "--missing-list", str(root / "missing.txt"))
    captured = capsys.readouterr()
    assert code == 3  # the malformed file is reported and the rest is done
    assert f"{info['bad']}:8: expected a joint line of 12 numbers" in captured.err
    assert "1 samples of --missing-list missing.txt left out" in captured.out
    assert "60 files converted now, 0 already done, 1 failed" in captured.out

    folder = FeatureFolder(out / "features")
    settings = folder.settings
    assert (settings.modality, settings.dtype, settings.dim, settings.backbone) == ("skeleton", "float32", 150, None)
    done = folder.finished()
    assert len(done) == 60 and all((r["frames"], r["dim"], r["views"]) == (20, 150, 1) for r in done.values())
    feats = folder.load(f"nturgb+d_skeletons/{info['names'][0]}.skeleton")
    assert feats.shape == (20, 150) and feats.dtype == np.float32 and not feats[:, 75:].any()
    assert np.abs(feats[0, 3:6]).max() < 1e-6  # centred on NTU joint 2 (index 1: columns 3..5), the mid-spine
    assert np.abs(feats[0, 0:3]).max() > 1e-3  # ... not on joint 1
    assert info["bad"] in folder.failed() and info["empty"] not in done  # the missing sample is not converted

    lists = out / "lists" / "cs"
    train, val, test = (read_list(lists / f"{n}.txt") for n in ("train", "val", "test"))
    assert len(read_classes(lists / "classes.txt")) == 60
    performer = lambda e: int(Path(e.path).name[9:12])  # noqa: E731
    assert {performer(e) for e in test} == {3} and len(test) == 12
    assert {performer(e) for e in train + val} == {1, 2, 4, 5}
    assert {1, 2, 4, 5} <= NTU60_TRAIN_SUBJECTS and 3 not in NTU60_TRAIN_SUBJECTS
    assert val and not {performer(e) for e in val} & {performer(e) for e in train}  # whole performers
    assert len(train) + len(val) == 48
    assert all(e.path not in (info["bad"], info["empty"]) for e in train + val + test)
    assert info["bad"] in (lists / "problems.txt").read_text()
    assert {e.label for e in test} == {0, 1, 2, 3}

    # A rerun converts nothing new and retries only the failed file; the cross-view lists reuse the features.
    assert prepare("--skeletons", str(root / "raw"), "--protocol", "cv", "--out", str(out),
                   "--missing-list", str(root / "missing.txt")) == 3
    assert "0 files converted now, 60 already done, 1 failed" in capsys.readouterr().out
    test_cv = read_list(out / "lists" / "cv" / "test.txt")
    assert {Path(e.path).name[4:8] for e in test_cv} == {"C001"} and len(test_cv) == 20


def test_stored_arrays_do_not_depend_on_where_the_body_stands(tmp_path):
    make_ntu_folder(tmp_path / "a", seed=1)
    make_ntu_folder(tmp_path / "b", seed=1, offset=(2.0, -1.0, 1.5))
    for name in "ab":
        prepare("--skeletons", str(tmp_path / name), "--out", str(tmp_path / f"out_{name}"))
    a, b = FeatureFolder(tmp_path / "out_a" / "features"), FeatureFolder(tmp_path / "out_b" / "features")
    videos = sorted(a.finished())
    assert videos == sorted(b.finished()) and len(videos) == 60
    for video in videos[::7]:
        np.testing.assert_allclose(a.load(video), b.load(video), atol=5e-5)


def test_usage_errors_are_one_line_and_exit_2(ntu, tmp_path, capsys):
    root, _ = ntu
    assert prepare("--help") == 0
    assert "--missing-list" in capsys.readouterr().out
    bad = tmp_path / "missing.txt"
    bad.write_text("S001C001P001R001A001\nnot a name\n")
    assert prepare("--skeletons", str(root / "raw"), "--out", str(tmp_path / "o"), "--missing-list", str(bad)) == 2
    assert "missing.txt:2: expected an NTU sample name" in capsys.readouterr().err
    assert prepare("--skeletons", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2
    assert prepare("--skeletons", str(root / "raw"), "--benchmark", "ntu60", "--protocol", "cset",
                   "--out", str(tmp_path / "o")) == 2
    assert "cset" in capsys.readouterr().err


def test_a_second_writer_is_refused_and_leaves_the_first_ones_temporaries(ntu, tmp_path, capsys):
    # A run clears stale temporaries before converting: with another writer at work in the same folder that
    # would delete its half-written files, so the folder is held (as extract holds it) and a second run refused.
    root, _ = ntu
    out = tmp_path / "out"
    folder = FeatureFolder(out / "features")
    with folder.lock("prepare ntu-skeleton"):
        in_flight = out / "features" / ".eleatt-tmp" / "a-writer.part"
        in_flight.parent.mkdir(parents=True)
        in_flight.write_bytes(b"half")
        code = prepare("--skeletons", str(root / "raw"), "--out", str(out))
        assert code == 2 and "is being written by" in capsys.readouterr().err
        assert in_flight.read_bytes() == b"half"
        assert not folder.finished()


@pytest.fixture
def one_thread():
    """Tiny networks run faster on one thread, and far faster on a loaded machine (no waiting for descheduled
    threads at every small op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_short_fit_on_generated_skeletons_learns_the_direction_of_the_walk(ntu, tmp_path, one_thread):
    root, _ = ntu
    out = tmp_path / "out"
    prepare("--skeletons", str(root / "raw"), "--out", str(out), "--missing-list", str(root / "missing.txt"))
    lists = out / "lists" / "cs"
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--data.features_dir", str(out / "features"),
            "--data.train_list", str(lists / "train.txt"), "--data.val_list", str(lists / "val.txt"),
            "--data.test_list", str(lists / "test.txt"), "--model.cell", "gru", "--data.num_steps", "10",
            "--data.augment", "skeleton_rotation", "--data.rotation_degrees", "35",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "skel"]
    assert eleatt(["fit", *argv, "--trainer.max_epochs", "12"]) == 0
    run = tmp_path / "runs" / "skel"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    assert eleatt(["test", *argv, "--ckpt_path", str(run / "best.ckpt")]) == 0
    scores = read_scores(run / "scores_test.npz")
    top1 = float((scores["scores"].argmax(1) == scores["labels"]).mean())
    assert scores["scores"].shape == (12, 60) and top1 >= 0.75  # chance: 1 in 4 directions


def test_when_every_file_is_malformed_each_is_named_and_no_list_is_written(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "S001C001P001R001A001.skeleton").write_text("garbage\n")
    (raw / "S001C002P002R001A002.skeleton").write_bytes(b"\x00\xff" * 40)
    assert prepare("--skeletons", str(raw), "--out", str(tmp_path / "o"), "--no-progress") == 3
    err = capsys.readouterr().err
    assert "none of the inputs could be used" in err
    assert "S001C001P001R001A001.skeleton:1" in err and "S001C002P002R001A002.skeleton" in err
    assert not (tmp_path / "o" / "lists").exists()
    assert prepare("--skeletons", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2
    assert "--skeletons" in capsys.readouterr().err
