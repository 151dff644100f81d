"""pyskl/mmaction2 annotation pickles: the restricted unpickler (plain data in, anything else refused before it
runs), the format checks, and one annotation -> the stored skeleton sequence."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from pipeline.data.pyskl import (
    PysklFormatError, UnsafePickleError, check_annotation, load_pickle, read_annotations, sample_features,
)
from pipeline.data.skeleton import NUM_JOINTS, load_skeleton, read_skeleton, select_bodies, write_skeleton
from pipeline.errors import InputNotFoundError


def plain_data() -> dict:
    return {
        "split": {"xsub_train": ["S001C001P001R001A002"], "xsub_val": []},
        "annotations": [{
            "frame_dir": "S001C001P001R001A002", "label": np.int64(1), "total_frames": 4,
            "keypoint": np.arange(2 * 4 * 25 * 3, dtype=np.float32).reshape(2, 4, 25, 3) / 100,
            "img_shape": (1080, 1920), "original_shape": (1080, 1920),
            "extras": {"set": {1, 2}, "frozen": frozenset({3}), "bytes": b"\x00\xff", "empty": b"",
                       "bytearray": bytearray(b"ab"), "complex": 1 + 2j, "f16": np.float16(0.5),
                       "f64": np.arange(3.0), "bool": np.bool_(True), "none": None, "nested": [(1, "a"), [2.5]]},
        }],
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_of_every_pickle_protocol_loads_unchanged(tmp_path, protocol):
    data = plain_data()
    path = tmp_path / "anno.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_pickle(path)
    got, want = loaded["annotations"][0], data["annotations"][0]
    np.testing.assert_array_equal(got["keypoint"], want["keypoint"])
    assert got["keypoint"].dtype == np.float32 and got["keypoint"].shape == (2, 4, 25, 3)
    assert got["label"] == 1 and got["img_shape"] == (1080, 1920) and loaded["split"] == data["split"]
    for key, value in want["extras"].items():
        assert np.array_equal(got["extras"][key], value) if isinstance(value, np.ndarray) else \
            got["extras"][key] == value, key


def test_a_pickle_written_by_numpy_1_loads(tmp_path):
    # numpy 1.x names its reconstructors numpy.core.multiarray.*; numpy 2 numpy._core.*
    data = pickle.dumps({"a": np.arange(6, dtype=np.int16).reshape(2, 3), "s": np.float32(2.5)}, protocol=2)
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data
    (tmp_path / "old.pkl").write_bytes(old)
    loaded = load_pickle(tmp_path / "old.pkl")
    np.testing.assert_array_equal(loaded["a"], [[0, 1, 2], [3, 4, 5]])
    assert loaded["s"] == np.float32(2.5)


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsPython:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return runstring, (self.code, {})


class MakesAFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious(marker) -> dict[str, bytes]:
    data = plain_data()
    eval_call = (b"\x80\x02cbuiltins\neval\nq\x00X\x1e\x00\x00\x00__import__('os').system('true')q\x01\x85q\x02Rq\x03.")
    return {
        "os.system": pickle.dumps({**data, "x": RunsAShellCommand(marker)}, protocol=4),
        "os.system (protocol 0)": pickle.dumps([RunsAShellCommand(marker)], protocol=0),
        "builtins.open": pickle.dumps({"annotations": [MakesAFile(marker)]}, protocol=2),
        "builtins.eval": eval_call,
        "getattr": pickle.dumps(getattr, protocol=3),
        "a class": pickle.dumps({"cls": RunsAShellCommand}, protocol=4),
        # numpy itself holds functions that run code: only numpy's array reconstructors are let through
        "numpy runstring": pickle.dumps(RunsPython(f"open({str(marker)!r}, 'w')"), protocol=2),
        "numpy.load": b"\x80\x02cnumpy\nload\nX\x08\x00\x00\x00/dev/nul\x85R.",
    }


@pytest.mark.parametrize("kind", ["os.system", "os.system (protocol 0)", "builtins.open", "builtins.eval",
                                  "getattr", "a class", "numpy runstring", "numpy.load"])
def test_a_pickle_asking_for_anything_else_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(malicious(marker)[kind])
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl': refused, the pickle asks for [\w.]+"):
        load_pickle(path)
    with pytest.raises(UnsafePickleError):
        read_annotations(path)
    assert not marker.exists()  # nothing of it was called


def test_the_refusal_names_the_global(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(malicious(tmp_path / "m")["os.system"])
    with pytest.raises(UnsafePickleError) as info:
        load_pickle(path)
    message = str(info.value)
    assert "posix.system" in message or "os.system" in message
    assert "\n" not in message and "can run code" in message


def test_numpys_own_reconstructors_cannot_be_bent_to_allocate_or_hold_objects(tmp_path):
    # ndarray((10**12,)) called directly would allocate a terabyte; bytes(10**12) too; an object array would hold
    # whatever the pickle builds next.
    ten_to_12 = b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00"  # LONG1 of 6 bytes (little-endian, signed): 10**12
    assert pickle.loads(b"\x80\x02" + ten_to_12 + b".") == 10**12
    huge_ndarray = b"\x80\x02cnumpy\nndarray\n" + ten_to_12 + b"\x85R."  # ndarray(10**12)
    huge_bytes = b"\x80\x02c__builtin__\nbytes\n" + ten_to_12 + b"\x85R."  # bytes(10**12)
    objects = pickle.dumps(np.array([1, "a"], dtype=object), protocol=2)
    for name, blob, global_ in (("ndarray", huge_ndarray, "numpy.ndarray called directly"),
                                ("bytes", huge_bytes, "bytes"), ("objects", objects, "numpy.dtype")):
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(blob)
        with pytest.raises(UnsafePickleError, match=f"asks for {global_}"):
            load_pickle(path)


def test_damaged_and_missing_files_are_one_line(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(plain_data(), protocol=4)[:200])
    with pytest.raises(PysklFormatError, match=r"cut\.pkl' is not a whole pickle .*re-download"):
        load_pickle(path)
    path.write_bytes(b"this is not a pickle at all")
    with pytest.raises(PysklFormatError, match="not a whole pickle"):
        load_pickle(path)
    with pytest.raises(InputNotFoundError, match="nowhere.pkl"):
        load_pickle(tmp_path / "nowhere.pkl")
    path.write_bytes(pickle.dumps([{"frame_dir": "a"}]))
    with pytest.raises(PysklFormatError, match="holds a list, not .*'annotations'"):
        read_annotations(path)
    path.write_bytes(pickle.dumps({"split": {"train": [1, 2]}, "annotations": []}))
    with pytest.raises(PysklFormatError, match="'split' is not a dict of split name -> list"):
        read_annotations(path)


def good(**changes) -> dict:
    ann = {"frame_dir": "S001C001P001R001A001", "label": 0,
           "keypoint": np.ones((1, 3, 25, 3), np.float32)}
    ann.update(changes)
    return ann


@pytest.mark.parametrize("changes, reason", [
    ({"frame_dir": "../../etc/passwd"}, "not a relative name"),
    ({"frame_dir": "/abs/name"}, "not a relative name"),
    ({"frame_dir": ""}, "not a non-empty string"),
    ({"frame_dir": 7}, "not a non-empty string"),
    ({"label": -1}, "label -1 is not an integer in 0..99999"),
    ({"label": 10**12}, "label 1000000000000 is not an integer in 0..99999"),  # classes.txt would list them all
    ({"frame_dir": "S" * 241}, "is 241 characters long (at most 240)"),
    ({"label": 1.0}, "label 1.0 is not an integer"),
    ({"label": True}, "label True is not an integer"),
    ({"keypoint": [[1.0]]}, "keypoint is not a numeric"),
    ({"keypoint": np.ones((1, 3, 25), np.float32)}, "keypoint is not a numeric"),
    ({"keypoint": np.ones((1, 3, 25, 4), np.float32)}, "shape (1, 3, 25, 4)"),
    ({"keypoint": np.ones((0, 3, 25, 3), np.float32)}, "shape (0, 3, 25, 3)"),
    ({"keypoint": np.full((1, 3, 25, 3), np.nan, np.float32)}, "225 non-finite values"),
    ({"keypoint": np.ones((1, 3, 17, 2))}, "2D keypoints need img_shape"),
    ({"keypoint": np.ones((1, 3, 17, 2)), "img_shape": (0, 5)}, "2D keypoints need img_shape"),
    ({"keypoint": np.ones((1, 3, 17, 2)), "img_shape": (5, 5), "keypoint_score": np.ones((1, 3, 16))},
     "keypoint_score"),
])
def test_annotations_that_cannot_be_used_are_named_with_the_reason(changes, reason):
    message = check_annotation(good(**changes), 4)
    assert message is not None and reason in message, message
    assert check_annotation(good(), 4) is None
    assert check_annotation(["not", "a", "dict"], 4) == "annotation 4 is a list, not a dict"


def test_read_annotations_keeps_the_good_samples_and_lists_the_others(tmp_path):
    anns = [good(), good(frame_dir="S001C001P001R001A002", label=1), good(frame_dir="S001C001P001R001A003", label=-2),
            good(label=5)]
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps({"split": {"xsub_train": [a["frame_dir"] for a in anns]}, "annotations": anns}))
    read = read_annotations(path)
    assert sorted(read.samples) == ["S001C001P001R001A001", "S001C001P001R001A002"]
    assert read.bad == {"S001C001P001R001A003"} and read.max_label == 1
    assert len(read.problems) == 2
    assert "S001C001P001R001A003: label -2" in read.problems[0]
    assert "a second annotation with this frame_dir" in read.problems[1]


# ----------------------------------------------------------------------------------------------- features
def test_a_3d_annotation_gives_the_array_of_the_matching_skeleton_file(tmp_path):
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(NUM_JOINTS, 3)) + [0.05 * t, 0, 3] for t in range(6)]
    b = [rng.normal(size=(NUM_JOINTS, 3)) + [1, 0.01 * t, 3] for t in range(6)]
    frames = [[], [("a", a[0])]] + [[("a", a[t]), ("b", b[t])] for t in range(1, 6)]  # b enters in frame 2
    path = write_skeleton(tmp_path / "S001C001P001R001A001.skeleton", frames)
    joints, present = select_bodies(read_skeleton(path))  # (7, 2, 25, 3): the bodies pyskl would store
    keypoint = np.where(present[..., None, None], joints, 0).transpose(1, 0, 2, 3).astype(np.float32)
    ann = {"frame_dir": "S001C001P001R001A001", "label": 0, "keypoint": keypoint}
    assert check_annotation(ann, 0) is None
    feats = sample_features(ann)
    np.testing.assert_array_equal(feats, load_skeleton(path))
    assert feats.shape == (6, 150) and feats.dtype == np.float32 and np.abs(feats[0, 3:6]).max() == 0


def test_only_the_first_two_bodies_are_kept_in_the_files_order():
    keypoint = np.zeros((3, 2, 25, 3), np.float32)
    keypoint[0] = 1.0
    keypoint[1] = 2.0
    keypoint[2] = 50.0  # a third body: left out, as pyskl's num_person=2 does
    keypoint[0, :, 1] = 0.5  # joint 2 of the first body: the origin
    feats = sample_features({"frame_dir": "x", "label": 0, "keypoint": keypoint})
    assert feats.shape == (2, 150)
    np.testing.assert_allclose(feats[0, :3], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(feats[0, 75:78], [1.5, 1.5, 1.5])
    assert feats.max() < 2


def test_2d_keypoints_are_scaled_by_the_image_and_carry_their_score():
    keypoint = np.zeros((1, 3, 17, 2), np.float32)
    score = np.zeros((1, 3, 17), np.float32)
    keypoint[0, 0, :] = [150.0, 25.0]  # image 200 wide, 100 high: x 150 -> 0.5, y 25 -> -0.5
    keypoint[0, 2, :] = [0.0, 100.0]  # -> -1, 1
    score[0, 0], score[0, 2] = 0.9, 0.4
    feats = sample_features({"frame_dir": "v_x", "label": 0, "keypoint": keypoint, "keypoint_score": score,
                             "img_shape": (100, 200)})
    assert feats.shape == (2, 2 * 17 * 3)  # the empty frame 1 is dropped; 2 bodies x 17 joints x (x, y, score)
    np.testing.assert_allclose(feats[0, :3], [0.5, -0.5, 0.9], atol=1e-6)
    np.testing.assert_allclose(feats[1, :3], [-1.0, 1.0, 0.4], atol=1e-6)
    assert not feats[:, 51:].any()  # no second body
    no_score = sample_features({"frame_dir": "v_x", "label": 0, "keypoint": keypoint, "img_shape": (100, 200)})
    assert no_score.shape == (2, 2 * 17 * 2)
    np.testing.assert_allclose(no_score[0, :2], [0.5, -0.5], atol=1e-6)


def test_an_annotation_without_any_body_is_refused_by_name():
    with pytest.raises(PysklFormatError, match="S001C001P001R001A001: no body in any frame"):
        sample_features(good(keypoint=np.zeros((2, 3, 25, 3), np.float32)))
