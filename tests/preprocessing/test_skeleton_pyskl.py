"""`eleatt prepare pyskl` against `eleatt prepare ntu-skeleton` on the same generated samples, the derived stream
folders (--streams), the noise filter's report, and refused inputs (a pickle that would run code)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as eleatt
from pipeline.data.features import FeatureFolder
from pipeline.data.skeleton import (
    NUM_JOINTS, denoise_bodies, derive_stream, read_skeleton, select_bodies, write_skeleton,
)
from preprocessing.splits import NTU60_TRAIN_SUBJECTS

STREAMS = ["joint", "bone", "joint_motion", "bone_motion"]


def tall_pose(rng, at) -> np.ndarray:
    """(25, 3): a body 0.5 m wide and 1.6 m tall around `at` (a person, for the noise filter)."""
    return np.asarray(at) + rng.uniform(-0.5, 0.5, size=(NUM_JOINTS, 3)) * [0.5, 1.6, 0.3]


def make_skeletons(root: Path, seed: int = 0) -> list[str]:
    """NTU-named .skeleton files at the root of `root`: actions 1..3, performers 1, 2 (train) and 3, 6 (test),
    cameras 1 and 2; action 3 has a second person who enters late; every fourth file a short-lived third body
    (the noise filter's business)."""
    rng = np.random.default_rng(seed)
    names = []
    for action in (1, 2, 3):
        for performer in (1, 2, 3, 6):
            for camera in (1, 2):
                name = f"S001C{camera:03d}P{performer:03d}R001A{action:03d}"
                a = tall_pose(rng, (0, 0, 3))
                b = tall_pose(rng, (1, 0, 3))
                blip = tall_pose(rng, (-1, 0, 3))
                frames = []
                for t in range(16):
                    bodies = [("a", a + [0.02 * t * action, 0, 0] + rng.normal(scale=0.005, size=(NUM_JOINTS, 3)))]
                    if action == 3 and t >= 4:
                        bodies.append(("b", b + [0, 0.01 * t, 0]))
                    if len(names) % 4 == 0 and t < 5:
                        bodies.append(("blip", blip + [0.3 * t, 0, 0]))
                    frames.append(bodies)
                write_skeleton(root / f"{name}.skeleton", frames)
                names.append(name)
    return names


def pyskl_file(raw: Path, names: list[str], path: Path, protocol: int = 4, extra=None) -> Path:
    """The pyskl annotation file of the same samples: keypoint (M, T, 25, 3) = the two bodies `prepare
    ntu-skeleton` keeps (noise filter, then ranking), zeros where absent, as pyskl stores its NTU 3D data."""
    annotations = []
    for name in names:
        skeleton, _ = denoise_bodies(read_skeleton(raw / f"{name}.skeleton"))
        joints, present = select_bodies(skeleton)
        keypoint = np.where(present[..., None, None], joints, 0).transpose(1, 0, 2, 3).astype(np.float32)
        m = 1 if not present[:, 1].any() else 2
        annotations.append({"frame_dir": name, "label": int(name[-3:]) - 1, "keypoint": keypoint[:m],
                            "total_frames": keypoint.shape[1], "img_shape": (1080, 1920)})
    train = [n for n in names if int(n[9:12]) in NTU60_TRAIN_SUBJECTS]
    split = {"xsub_train": train, "xsub_val": [n for n in names if n not in train],
             "xview_train": [n for n in names if n[4:8] != "C001"], "xview_val": [n for n in names if n[4:8] == "C001"]}
    data = {"split": split, "annotations": annotations, **(extra or {})}
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


def prepare(*args) -> int:
    return eleatt(["prepare", *args, "--no-progress"])


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same samples prepared from the .skeleton files and from a pyskl file, with all four streams."""
    root = tmp_path_factory.mktemp("pyskl")
    names = make_skeletons(root / "raw")
    pkl = pyskl_file(root / "raw", names, root / "ntu60_3danno.pkl")
    codes = (prepare("ntu-skeleton", "--skeletons", str(root / "raw"), "--out", str(root / "from_skeleton"),
                     "--workers", "0", "--streams", *STREAMS),
             prepare("pyskl", "--annotations", str(pkl), "--out", str(root / "from_pyskl"), "--streams", *STREAMS))
    return root, names, codes


def test_a_pyskl_file_gives_the_feature_folders_and_lists_of_the_matching_skeleton_files(both):
    root, names, codes = both
    assert codes == (0, 0)
    a, b = root / "from_skeleton", root / "from_pyskl"
    for name in ("train.txt", "val.txt", "test.txt", "classes.txt"):
        assert (a / "lists" / "cs" / name).read_bytes() == (b / "lists" / "cs" / name).read_bytes(), name
    assert len((b / "lists" / "cs" / "test.txt").read_text().splitlines()) == 12  # performers 3 and 6
    for folder in ["features"] + [f"features_{s}" for s in STREAMS[1:]]:
        fa, fb = FeatureFolder(a / folder), FeatureFolder(b / folder)
        done_a, done_b = fa.finished(), fb.finished()
        assert sorted(done_a) == sorted(done_b) == sorted(f"{n}.skeleton" for n in names), folder
        for video in done_a:
            np.testing.assert_array_equal(fa.load(video), fb.load(video), err_msg=f"{folder} {video}")
            keep = ("video", "feature", "frames", "dim", "views")
            assert {k: done_a[video][k] for k in keep} == {k: done_b[video][k] for k in keep}
    two = FeatureFolder(a / "features").load("S001C001P001R001A003.skeleton")
    assert two.shape == (16, 150) and two[4:, 75:].any() and not two[:4, 75:].any()  # b enters at frame 4


def test_the_derived_folders_hold_the_streams_of_the_joint_folder(both):
    root, names, _ = both
    out = root / "from_skeleton"
    joint = FeatureFolder(out / "features")
    for stream in STREAMS[1:]:
        folder = FeatureFolder(out / f"features_{stream}")
        assert folder.settings.options["stream"] == stream and folder.settings.dim == 150
        for video in list(joint.finished())[:5]:
            np.testing.assert_array_equal(folder.load(video), derive_stream(joint.load(video), stream))
    video = f"{names[0]}.skeleton"
    feats = joint.load(video).astype(np.float64)
    np.testing.assert_allclose(FeatureFolder(out / "features_joint_motion").load(video)[:15], feats[1:] - feats[:15],
                               atol=1e-6)
    bone = FeatureFolder(out / "features_bone").load(video)
    np.testing.assert_allclose(bone[:, 0:3], feats[:, 0:3] - feats[:, 3:6], atol=1e-6)  # joint 1 - joint 2


def test_a_derived_file_is_redone_when_its_joint_file_changes(tmp_path):
    names = make_skeletons(tmp_path / "raw", seed=1)
    out = tmp_path / "out"
    args = ["ntu-skeleton", "--skeletons", str(tmp_path / "raw"), "--out", str(out), "--workers", "0"]
    assert prepare(*args, "--streams", "joint", "bone") == 0
    joint, bone = FeatureFolder(out / "features"), FeatureFolder(out / "features_bone")
    video = f"{names[1]}.skeleton"
    before = bone.feature_path(video).stat().st_mtime_ns
    assert prepare(*args, "--streams", "joint", "bone") == 0  # nothing changed: nothing redone
    assert bone.feature_path(video).stat().st_mtime_ns == before
    changed = joint.load(video) * 2
    joint.write(video, changed)  # e.g. redone after damage, from other data
    assert prepare(*args, "--streams", "joint", "bone") == 0
    np.testing.assert_array_equal(FeatureFolder(out / "features_bone").load(video), derive_stream(changed, "bone"))
    # a stream asked for later is derived from the folder as it stands
    assert prepare(*args, "--streams", "bone_motion") == 0
    np.testing.assert_array_equal(FeatureFolder(out / "features_bone_motion").load(video),
                                  derive_stream(changed, "bone_motion"))


def test_prepare_reports_what_the_noise_filter_did_and_no_denoise_keeps_the_old_folders(both, tmp_path, capsys):
    root, names, _ = both
    out = tmp_path / "out"
    assert prepare("ntu-skeleton", "--skeletons", str(root / "raw"), "--out", str(out), "--workers", "0") == 0
    text = capsys.readouterr().out
    # every fourth of the 24 files has a 5-frame third body
    assert "noise filter: 6 bodies seen in at most 11 frames dropped (6 files), 0 bodies wider than tall" in text
    settings = json.loads((out / "features" / "settings.json").read_text())
    assert "noise_filter" in settings["options"]
    code = prepare("ntu-skeleton", "--skeletons", str(root / "raw"), "--out", str(out), "--no-denoise")
    err = capsys.readouterr().err
    assert code == 2 and "was made with other settings" in err and "noise_filter" in err
    plain = tmp_path / "plain"
    assert prepare("ntu-skeleton", "--skeletons", str(root / "raw"), "--out", str(plain), "--workers", "0",
                   "--no-denoise") == 0
    assert "noise filter" not in capsys.readouterr().out
    assert "noise_filter" not in json.loads((plain / "features" / "settings.json").read_text())["options"]
    # the blip is more active than the person in the first file: without the filter it takes the first slot
    first = f"{names[0]}.skeleton"
    assert not np.array_equal(FeatureFolder(plain / "features").load(first), FeatureFolder(out / "features").load(first))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pyskl_file_holding_a_malicious_object_is_refused_and_nothing_runs(both, tmp_path, capsys):
    root, names, _ = both
    marker = tmp_path / "code-ran"
    evil = pyskl_file(root / "raw", names, tmp_path / "evil.pkl", extra={"meta": Payload(marker)})
    out = tmp_path / "out"
    assert prepare("pyskl", "--annotations", str(evil), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "evil.pkl': refused, the pickle asks for posix.system" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (out / "features").exists() and not (out / "lists").exists()


def test_samples_that_cannot_be_used_are_listed_and_the_rest_is_prepared(both, tmp_path, capsys):
    root, names, _ = both
    path = pyskl_file(root / "raw", names, tmp_path / "some.pkl", protocol=2)
    data = pickle.loads(path.read_bytes())
    data["annotations"][0]["label"] = 5  # its name says action 1
    data["annotations"][1]["keypoint"] = data["annotations"][1]["keypoint"] * np.nan
    data["split"]["xsub_val"].append("S001C001P003R001A009")  # no annotation
    path.write_bytes(pickle.dumps(data))
    out = tmp_path / "out"
    assert prepare("pyskl", "--annotations", str(path), "--out", str(out)) == 3
    problems = (out / "lists" / "cs" / "problems.txt").read_text()
    assert f"{names[0]} has label 5 but its name says action 1" in problems
    assert f"{names[1]}: keypoint holds" in problems and "non-finite" in problems
    assert "S001C001P003R001A009 is in split xsub_val but has no annotation" in problems
    assert len(FeatureFolder(out / "features").finished()) == len(names) - 2
    listed = sum(len((out / "lists" / "cs" / f"{n}.txt").read_text().splitlines()) for n in ("train", "val", "test"))
    assert listed == len(names) - 2


def test_other_splits_protocols_and_refusals(both, tmp_path, capsys):
    root, names, _ = both
    pkl = root / "ntu60_3danno.pkl"
    assert prepare("pyskl", "--annotations", str(pkl), "--out", str(tmp_path / "o"), "--protocol", "cset") == 2
    assert "has no split 'xset_train' (it has xsub_train, xsub_val, xview_train, xview_val)" in capsys.readouterr().err
    assert prepare("pyskl", "--annotations", str(pkl), "--out", str(tmp_path / "o"), "--protocol", "cv") == 0
    test = (tmp_path / "o" / "lists" / "cv" / "test.txt").read_text().splitlines()
    assert len(test) == 12 and all("C001" in line for line in test)
    assert prepare("pyskl", "--annotations", str(pkl), "--out", str(tmp_path / "o"), "--splits", "xview_val",
                   "xview_train", "--val-fraction", "0") == 0
    assert (tmp_path / "o" / "lists" / "xview_val_xview_train" / "train.txt").read_text() == "\n".join(test) + "\n"
    assert prepare("pyskl", "--annotations", str(tmp_path / "nowhere.pkl"), "--out", str(tmp_path / "o")) == 2
    assert "nowhere.pkl' not found" in capsys.readouterr().err
    assert prepare("pyskl", "--annotations", str(pkl), "--out", str(tmp_path / "o"), "--suffix", "npy") == 2
    assert "--suffix 'npy' must start with '.'" in capsys.readouterr().err
    assert eleatt(["prepare", "pyskl", "--help"]) == 0
    assert "builds only plain data" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def _pyskl_2d(path: Path, joints: int) -> list[dict]:
    rng = np.random.default_rng(3)
    annotations = []
    for i in range(8):
        keypoint = rng.uniform(0, 640, size=(1, 10, joints, 2)).astype(np.float32)
        annotations.append({"frame_dir": f"v_clip_{i:02d}", "label": i % 2, "keypoint": keypoint,
                            "keypoint_score": np.full((1, 10, joints), 0.8, np.float32), "img_shape": (480, 640)})
    split = {"train1": [f"v_clip_{i:02d}" for i in range(6)], "test1": ["v_clip_06", "v_clip_07"]}
    path.write_bytes(pickle.dumps({"split": split, "annotations": annotations}, protocol=5))
    return annotations


def test_2d_coco_keypoints_are_prepared_with_their_bones_and_other_layouts_refused_bones(tmp_path, capsys):
    """17 COCO keypoints: joint, bone (COCO's 16 bones: left ear 3 - left eye 1, right ankle 16 - right knee 14, the
    nose 0 the root) and motion streams; an 18-joint layout (OpenPose) has no known bone pairs: refused, one line."""
    annotations = _pyskl_2d(tmp_path / "hmdb_2d.pkl", 17)
    out = tmp_path / "out"
    assert prepare("pyskl", "--annotations", str(tmp_path / "hmdb_2d.pkl"), "--out", str(out), "--splits", "train1",
                   "test1", "--streams", "joint", "bone", "joint_motion") == 0
    folder = FeatureFolder(out / "features")
    assert folder.settings.dim == 2 * 17 * 3 and folder.settings.options["channels"] == "x, y, score"
    feats = folder.load("v_clip_00.skeleton")
    kp = annotations[0]["keypoint"][0, 0, 0]
    np.testing.assert_allclose(feats[0, :3], [(kp[0] - 320) / 320, (kp[1] - 240) / 240, 0.8], atol=1e-6)
    joint = feats[0, :51].reshape(17, 3)
    bone = FeatureFolder(out / "features_bone").load("v_clip_00.skeleton")[0, :51].reshape(17, 3)
    np.testing.assert_allclose(bone[0], [0, 0, 0])  # the nose: the root
    np.testing.assert_allclose(bone[3], [*(joint[3, :2] - joint[1, :2]), 0.8], atol=1e-6)  # left ear - left eye
    np.testing.assert_allclose(bone[16], [*(joint[16, :2] - joint[14, :2]), 0.8], atol=1e-6)  # right ankle - knee
    np.testing.assert_allclose(bone[11], [*(joint[11, :2] - joint[0, :2]), 0.8], atol=1e-6)  # left hip - nose
    motion = FeatureFolder(out / "features_joint_motion").load("v_clip_00.skeleton")
    np.testing.assert_allclose(motion[0, :2], feats[1, :2] - feats[0, :2], atol=1e-6)
    np.testing.assert_allclose(motion[0, 2], 0.8, atol=1e-6)
    assert (out / "lists" / "train1_test1" / "classes.txt").read_text().splitlines() == ["0", "1"]
    capsys.readouterr()
    _pyskl_2d(tmp_path / "openpose.pkl", 18)
    assert prepare("pyskl", "--annotations", str(tmp_path / "openpose.pkl"), "--out", str(tmp_path / "op"),
                   "--splits", "train1", "test1", "--streams", "joint", "bone") == 2
    err = capsys.readouterr().err
    assert "bone streams need the NTU 25-joint or the COCO 17-keypoint layout" in err and "has 18 joints" in err
    assert err.count("\n") == 1 and not (tmp_path / "op" / "features").exists()


def test_rotation_is_refused_on_2d_keypoints_and_kept_on_derived_3d_streams(both, tmp_path):
    from pipeline.training.feature_data import FeatureDataModule

    root, _, _ = both
    for made_by in ("from_skeleton", "from_pyskl"):  # settings without and with "channels"
        out = root / made_by
        for folder in ("features", "features_bone_motion"):  # rotations commute with the streams' differences
            dm = FeatureDataModule(str(out / folder), train_list=str(out / "lists" / "cs" / "train.txt"),
                                   augment="skeleton_rotation")
            assert dm.train_transform.max_degrees == 35
    rng = np.random.default_rng(4)
    anns = [{"frame_dir": f"v{i}", "label": i % 2, "keypoint": rng.uniform(0, 99, (1, 4, 25, 2)).astype(np.float32),
             "keypoint_score": np.ones((1, 4, 25), np.float32), "img_shape": (100, 100)} for i in range(6)]
    pkl = tmp_path / "2d.pkl"
    pkl.write_bytes(pickle.dumps({"split": {"a": ["v0", "v1", "v2", "v3"], "b": ["v4", "v5"]}, "annotations": anns}))
    assert prepare("pyskl", "--annotations", str(pkl), "--out", str(tmp_path / "o"), "--splits", "a", "b",
                   "--val-fraction", "0") == 0
    assert FeatureFolder(tmp_path / "o" / "features").settings.dim == 150  # 2 x 25 x 3, as 3D: the dim cannot tell
    with pytest.raises(ValueError, match=r"holds x, y, score per joint \(2D keypoints\).*--data.augment none"):
        FeatureDataModule(str(tmp_path / "o" / "features"), train_list=str(tmp_path / "o" / "lists" / "a_b" /
                                                                          "train.txt"), augment="skeleton_rotation")


def test_prefix_and_suffix_make_the_list_paths(both, tmp_path, capsys):
    root, names, _ = both
    pkl = root / "ntu60_3danno.pkl"
    out = tmp_path / "o"
    assert prepare("pyskl", "--annotations", str(pkl), "--out", str(out), "--prefix", "nturgb+d_skeletons/",
                   "--suffix", ".skel") == 0
    test = (out / "lists" / "cs" / "test.txt").read_text().splitlines()
    assert test[0].split()[0] == "nturgb+d_skeletons/S001C001P003R001A001.skel"
    assert (out / "features" / "nturgb+d_skeletons" / "S001C001P003R001A001.npy").is_file()
    assert prepare("pyskl", "--annotations", str(pkl), "--out", str(out), "--prefix", "../up") == 2
    assert "must be a relative folder" in capsys.readouterr().err
