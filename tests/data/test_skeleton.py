"""NTU .skeleton reading, body selection, centring and the rotation augmentation, on small files written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.training.feature_data import FeatureDataModule
from pipeline.data.features import FeatureFolder
from pipeline.data.lists import ListEntry, write_classes, write_list
from pipeline.data.skeleton import (
    NTU_BONES, NUM_JOINTS, SkeletonFormatError, SkeletonRotation, centre_and_flatten, load_skeleton,
    random_rotation, read_skeleton, rotate_skeleton, rotation_matrix, select_bodies, write_skeleton,
)
from pipeline.nn.eleatt import EleAttGRU

# NTU's own numbering: joint 2 (1-based), "middle of the spine", is the origin; written here, not read from the module.
SPINE = 1  # 0-based index of NTU joint 2


def pose(rng: np.random.Generator, at=(0.0, 0.0, 3.0)) -> np.ndarray:
    """A plausible body: (25, 3) joints within ~0.8 m of `at` (metres, camera coordinates)."""
    return (np.asarray(at) + rng.normal(scale=0.3, size=(NUM_JOINTS, 3))).astype(np.float64)


def moving(base: np.ndarray, frames: int, step=(0.02, 0.0, 0.0)) -> list[np.ndarray]:
    return [base + k * np.asarray(step) for k in range(frames)]


def bone_lengths(feats: np.ndarray) -> np.ndarray:
    """feats (T, 150) -> (T, 2, 24) bone lengths."""
    joints = np.asarray(feats, dtype=np.float64).reshape(len(feats), 2, NUM_JOINTS, 3)
    a, b = zip(*NTU_BONES)
    return np.linalg.norm(joints[:, :, list(a)] - joints[:, :, list(b)], axis=-1)


def test_one_body_is_centred_on_the_spine_of_the_first_frame_and_the_second_body_is_zero(tmp_path):
    rng = np.random.default_rng(0)
    seq = moving(pose(rng), 6)
    path = write_skeleton(tmp_path / "S001C001P001R001A001.skeleton", [[("72057594037931101", j)] for j in seq])
    feats = load_skeleton(path)
    assert feats.shape == (6, 150) and feats.dtype == np.float32
    body0 = feats.reshape(6, 2, NUM_JOINTS, 3)[:, 0]
    expected = np.stack(seq) - seq[0][SPINE]
    np.testing.assert_allclose(body0, expected, atol=1e-5)
    assert np.abs(body0[0, SPINE]).max() < 1e-6  # the origin
    assert not feats[:, 75:].any()  # the missing second body is exactly zero


def test_the_more_active_of_two_bodies_takes_the_first_slot(tmp_path):
    rng = np.random.default_rng(1)
    still, active = pose(rng, (-0.5, 0, 3)), pose(rng, (0.5, 0, 3))
    frames = [[("still", s), ("active", a)] for s, a in zip(moving(still, 8, (0, 0, 0)), moving(active, 8, (0.05, 0, 0)))]
    feats = load_skeleton(write_skeleton(tmp_path / "two.skeleton", frames)).reshape(8, 2, NUM_JOINTS, 3)
    origin = active[SPINE]
    np.testing.assert_allclose(feats[:, 0], np.stack(moving(active, 8, (0.05, 0, 0))) - origin, atol=1e-5)
    np.testing.assert_allclose(feats[:, 1], np.broadcast_to(still - origin, (8, NUM_JOINTS, 3)), atol=1e-5)


def test_frames_without_bodies_are_dropped(tmp_path):
    rng = np.random.default_rng(2)
    seq = moving(pose(rng), 4)
    frames = [[], [], [("a", seq[0])], [("a", seq[1])], [], [("a", seq[2])], [("a", seq[3])], []]
    path = write_skeleton(tmp_path / "gaps.skeleton", frames)
    raw = read_skeleton(path)
    assert raw.num_frames == 8 and len(raw.bodies) == 1 and raw.bodies[0].frames.tolist() == [2, 3, 5, 6]
    feats = load_skeleton(path)
    assert feats.shape == (4, 150)
    np.testing.assert_allclose(feats.reshape(4, 2, NUM_JOINTS, 3)[:, 0], np.stack(seq) - seq[0][SPINE],
                               atol=1e-5)


def ladder(shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(25, 3) joints with distinct, known coordinates: joint index j at (0.1 j, 0.01 j^2, 2 - 0.05 j) + shift."""
    j = np.arange(NUM_JOINTS, dtype=np.float64)
    return np.stack([0.1 * j, 0.01 * j * j, 2.0 - 0.05 * j], axis=1) + np.asarray(shift)


def test_centring_is_on_ntu_joint_2_the_middle_of_the_spine_of_the_first_frame(tmp_path):
    # Frame 1 is frame 0 moved by (0.2, -0.3, 0.4): the origin stays frame 0's joint 2, it is not re-taken per frame.
    frames = [[("a", ladder())], [("a", ladder((0.2, -0.3, 0.4)))]]
    feats = load_skeleton(write_skeleton(tmp_path / "ladder.skeleton", frames))
    assert feats.shape == (2, 150)
    body = feats.reshape(2, 2, NUM_JOINTS, 3)[:, 0].astype(np.float64)
    # NTU joint 2 (index 1) of frame 0 sits at (0.1, 0.01, 1.95): every coordinate is relative to it.
    np.testing.assert_allclose(body[0], ladder() - [0.1, 0.01, 1.95], atol=1e-6)
    np.testing.assert_allclose(body[1], ladder() - [0.1, 0.01, 1.95] + [0.2, -0.3, 0.4], atol=1e-6)
    np.testing.assert_allclose(feats[0, 0:3], [-0.1, -0.01, 0.05], atol=1e-6)  # joint 1 (base of the spine)
    np.testing.assert_allclose(feats[0, 3:6], [0.0, 0.0, 0.0], atol=1e-6)  # joint 2: the origin
    np.testing.assert_allclose(feats[0, 6:9], [0.1, 0.03, -0.05], atol=1e-6)  # joint 3 (neck)
    np.testing.assert_allclose(feats[0, 72:75], [2.3, 5.75, -1.15], atol=1e-5)  # joint 25 (index 24)
    np.testing.assert_allclose(feats[1, 3:6], [0.2, -0.3, 0.4], atol=1e-6)  # frame 1's spine: the motion
    assert not feats[:, 75:].any()  # no second body: exactly zero


def test_a_body_that_appears_only_in_a_later_frame_is_centred_on_its_own_spine(tmp_path):
    # Two frames without any body, then the body: the origin is its joint 2 where it first appears, not zeros.
    frames = [[], [], [("a", ladder((1.0, 2.0, 3.0)))], [("a", ladder((1.5, 2.0, 3.0)))]]
    feats = load_skeleton(write_skeleton(tmp_path / "late.skeleton", frames))
    assert feats.shape == (2, 150)
    np.testing.assert_allclose(feats[0, 3:6], [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(feats[1, 3:6], [0.5, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(feats[0, 0:3], [-0.1, -0.01, 0.05], atol=1e-6)
    # The shift (1, 2, 3) is gone entirely: centred on zeros it would remain in every joint.
    np.testing.assert_allclose(feats[0, :75].reshape(NUM_JOINTS, 3), ladder() - [0.1, 0.01, 1.95], atol=1e-6)


def test_when_the_first_frame_has_only_the_second_body_the_origin_is_that_body(tmp_path):
    # "mover" (the more active body, slot 0) enters at frame 1; "idle" (slot 1) is there from frame 0. The rule:
    # the origin is joint 2 of the first frame that has a body, of its first present slot -- here idle's at frame 0.
    idle = ladder((-1.0, 0.5, 1.0))  # joint 2 at (-0.9, 0.51, 2.95)
    mover = {t: ladder((1.0 + 0.3 * (t - 1), 0.0, 0.0)) for t in (1, 2, 3)}  # 0.3 m a frame along x
    frames = [[("idle", idle)]] + [[("mover", mover[t]), ("idle", idle)] for t in range(1, 4)]
    feats = load_skeleton(write_skeleton(tmp_path / "second.skeleton", frames))
    assert feats.shape == (4, 150)
    bodies = feats.reshape(4, 2, NUM_JOINTS, 3).astype(np.float64)
    origin = np.array([-0.9, 0.51, 2.95])
    assert not bodies[0, 0].any()  # slot 0 is empty in frame 0 and stays exactly zero
    np.testing.assert_allclose(bodies[:, 1], np.broadcast_to(idle - origin, (4, NUM_JOINTS, 3)), atol=1e-6)
    np.testing.assert_allclose(feats[0, 78:81], [0.0, 0.0, 0.0], atol=1e-6)  # idle's joint 2: the origin
    np.testing.assert_allclose(feats[1, 3:6], [2.0, -0.5, -1.0], atol=1e-6)  # mover's joint 2: (1.1, .01, 1.95)
    np.testing.assert_allclose(feats[3, 3:6], [2.6, -0.5, -1.0], atol=1e-6)


def test_centre_and_flatten_never_takes_its_origin_from_an_empty_slot():
    # The array form: frame 0 empty, frame 1 slot 1 only (slot 0 holds junk that must be ignored), frame 2 both.
    joints = np.zeros((3, 2, NUM_JOINTS, 3), np.float32)
    present = np.array([[False, False], [False, True], [True, True]])
    joints[1, 0] = 7.0  # not present: neither the origin nor kept
    joints[1, 1] = ladder((0.0, 0.0, 1.0))  # joint 2 at (0.1, 0.01, 2.95)
    joints[2, 0] = ladder((0.5, 0.0, 0.0))
    joints[2, 1] = ladder((0.0, 0.0, 1.0))
    feats = centre_and_flatten(joints, present)
    assert feats.shape == (2, 150) and feats.dtype == np.float32
    assert not feats[0, :75].any()  # the absent slot is exactly zero
    np.testing.assert_allclose(feats[0, 78:81], [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(feats[1, 3:6], [0.5, 0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(feats[1, 75:78], [-0.1, -0.01, 0.05], atol=1e-6)


def test_a_third_body_is_dropped_and_a_changed_tracking_id_keeps_its_slot(tmp_path):
    rng = np.random.default_rng(3)
    main = moving(pose(rng, (0, 0, 3)), 10, (0.05, 0, 0))  # tracked as "a", then as "b" (a new id mid-sequence)
    other = moving(pose(rng, (1, 0, 3)), 10, (0, 0.02, 0))
    idle = moving(pose(rng, (-1, 0, 3)), 10, (0, 0, 0))  # a third, motionless body, present throughout
    frames = [[("a" if t < 5 else "b", main[t]), ("o", other[t]), ("idle", idle[t])] for t in range(10)]
    skeleton = read_skeleton(write_skeleton(tmp_path / "three.skeleton", frames))
    assert [b.body_id for b in skeleton.bodies] == ["a", "o", "idle", "b"]
    joints, present = select_bodies(skeleton)
    assert present.all()
    np.testing.assert_allclose(joints[:, 0], np.stack(main), atol=1e-5)  # a and b in one slot
    np.testing.assert_allclose(joints[:, 1], np.stack(other), atol=1e-5)  # idle left out


def test_four_bodies_in_one_frame_keep_the_two_most_active(tmp_path):
    rng = np.random.default_rng(4)
    bodies = {name: moving(pose(rng, (x, 0, 3)), 5, (speed, 0, 0))
              for name, x, speed in (("b1", 0, 0.01), ("b2", 1, 0.08), ("b3", -1, 0.0), ("b4", 2, 0.04))}
    frames = [[(n, seq[t]) for n, seq in bodies.items()] for t in range(5)]
    joints, _ = select_bodies(read_skeleton(write_skeleton(tmp_path / "four.skeleton", frames)))
    np.testing.assert_allclose(joints[:, 0], np.stack(bodies["b2"]), atol=1e-5)
    np.testing.assert_allclose(joints[:, 1], np.stack(bodies["b4"]), atol=1e-5)


def test_a_truncated_file_raises_naming_file_and_line_or_keeps_its_whole_frames(tmp_path):
    rng = np.random.default_rng(5)
    seq = moving(pose(rng), 5)
    full = write_skeleton(tmp_path / "full.skeleton", [[("a", j)] for j in seq])
    lines = full.read_text().splitlines()
    cut = tmp_path / "cut.skeleton"
    cut.write_text("\n".join(lines[: 1 + 3 * 28 + 10]) + "\n")  # header, 3 whole frames, 10 lines of the 4th
    with pytest.raises(SkeletonFormatError, match=r"cut\.skeleton:95: .*inside frame 4 of the 5.*truncated"):
        read_skeleton(cut)
    kept = read_skeleton(cut, allow_truncated=True)
    assert kept.truncated and kept.num_frames == 3 and kept.bodies[0].frames.tolist() == [0, 1, 2]
    assert load_skeleton(cut, allow_truncated=True).shape == (3, 150)


@pytest.mark.parametrize("edit, line, message", [
    (lambda ls: ls.__setitem__(0, "five"), 1, "frame count"),
    (lambda ls: ls.__setitem__(2, "a 0 1 1"), 3, "body line of 10 values"),
    (lambda ls: ls.__setitem__(3, "20"), 4, "joint count 20"),
    (lambda ls: ls.__setitem__(9, "0.1 0.2 zero 0 0 0 0 0 0 0 0 2"), 10, "joint line of 12 numbers"),
    (lambda ls: ls.__setitem__(12, "0.1 0.2 0.3"), 13, "joint line of 12 numbers"),
    (lambda ls: ls.append("1"), 58, "unexpected data after the 2 frames"),
])
def test_malformed_files_raise_naming_file_and_line(tmp_path, edit, line, message):
    rng = np.random.default_rng(6)
    path = write_skeleton(tmp_path / "bad.skeleton", [[("a", j)] for j in moving(pose(rng), 2)])
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SkeletonFormatError, match=rf"bad\.skeleton:{line}: .*{message}"):
        read_skeleton(path)
    assert issubclass(SkeletonFormatError, ValueError)


def test_a_file_without_any_body_raises_with_the_fix(tmp_path):
    path = write_skeleton(tmp_path / "empty.skeleton", [[], [], []])
    assert read_skeleton(path).bodies == []
    with pytest.raises(SkeletonFormatError, match=r"empty\.skeleton: no body in any frame.*--missing-list"):
        load_skeleton(path)
    (tmp_path / "zero.skeleton").write_text("")
    with pytest.raises(SkeletonFormatError, match="empty"):
        read_skeleton(tmp_path / "zero.skeleton")


def test_stored_arrays_are_translation_invariant(tmp_path):
    rng = np.random.default_rng(7)
    a, b = moving(pose(rng), 7, (0.03, 0.01, 0)), moving(pose(rng, (1, 0, 3)), 7, (0, 0.02, 0.01))
    shift = np.array([1.7, -0.4, 2.2])
    here = write_skeleton(tmp_path / "here.skeleton", [[("a", x), ("b", y)] for x, y in zip(a, b)])
    there = write_skeleton(tmp_path / "there.skeleton", [[("a", x + shift), ("b", y + shift)] for x, y in zip(a, b)])
    np.testing.assert_allclose(load_skeleton(here), load_skeleton(there), atol=2e-5)


def test_rotation_preserves_bone_lengths_and_missing_bodies():
    rng = np.random.default_rng(8)
    feats = np.zeros((5, 150), np.float32)
    feats[:, :75] = np.stack(moving(pose(rng), 5, (0.02, 0, 0))).reshape(5, 75) - 0.1
    torch.manual_seed(0)
    for _ in range(5):
        rotated = random_rotation(torch.from_numpy(feats), 35.0)
        assert rotated.dtype == torch.float32 and rotated.shape == (5, 150)
        assert not torch.equal(rotated, torch.from_numpy(feats))
        np.testing.assert_allclose(bone_lengths(rotated.numpy()), bone_lengths(feats), atol=1e-5)
        assert not rotated[:, 75:].any()  # the zero body stays zero
    out = rotate_skeleton(feats, [0.3, -0.2, 0.5])  # numpy in, numpy out
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(bone_lengths(out), bone_lengths(feats), atol=1e-5)


def test_rotation_angles_and_their_range():
    # 90 degrees about z maps x onto y; the matrix is a proper rotation.
    point = torch.tensor([[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(rotate_skeleton(point, [0, 0, math.pi / 2]).numpy(), [[0, 1, 0]], atol=1e-6)
    np.testing.assert_allclose(rotate_skeleton(point, [0, math.pi / 2, 0]).numpy(), [[0, 0, -1]], atol=1e-6)
    r = rotation_matrix(torch.tensor([0.3, -0.5, 0.2]))
    np.testing.assert_allclose((r @ r.T).numpy(), np.eye(3), atol=1e-12)
    assert abs(float(torch.linalg.det(r)) - 1) < 1e-12
    # Angles stay within +-35 degrees: a rotation about one axis by at most 35 degrees moves a unit vector on that
    # plane by at most 35 degrees; about three axes, the total angle is bounded by the sum of the three.
    torch.manual_seed(1)
    units = torch.eye(3).reshape(1, 9)
    for _ in range(50):
        moved = random_rotation(units, 35.0).reshape(3, 3)
        angles = torch.rad2deg(torch.acos((moved * torch.eye(3)).sum(1).clamp(-1, 1)))
        assert float(angles.max()) <= 3 * 35 + 1e-4
    assert torch.equal(random_rotation(units, 0.0), units)
    with pytest.raises(ValueError, match="rotation_degrees=400"):
        SkeletonRotation(400)
    with pytest.raises(ValueError, match="multiple of 3"):
        rotate_skeleton(torch.zeros(2, 10), [0, 0, 0])


def test_rotations_follow_the_right_hand_rule_about_each_axis_and_compose_x_then_y_then_z():
    q = math.pi / 2

    def turn(point, angles):
        return rotate_skeleton(torch.tensor([point], dtype=torch.float64), angles).numpy()[0]

    np.testing.assert_allclose(turn([0, 1, 0], [q, 0, 0]), [0, 0, 1], atol=1e-12)  # about x: y -> z
    np.testing.assert_allclose(turn([0, 0, 1], [q, 0, 0]), [0, -1, 0], atol=1e-12)  # ... and z -> -y
    np.testing.assert_allclose(turn([0, 0, 1], [0, q, 0]), [1, 0, 0], atol=1e-12)  # about y: z -> x
    np.testing.assert_allclose(turn([1, 0, 0], [0, 0, q]), [0, 1, 0], atol=1e-12)  # about z: x -> y
    # R = Rz Ry Rx: x first. y -(x)-> z -(y)-> x; in the other order y would stay y, then go to z.
    np.testing.assert_allclose(turn([0, 1, 0], [q, q, 0]), [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(turn([0, 0, 1], [0, q, q]), [0, 1, 0], atol=1e-12)  # z -(y)-> x -(z)-> y
    # a general angle, by hand: about x by 30 degrees, (0, 1, 0) -> (0, cos 30, sin 30)
    np.testing.assert_allclose(turn([0, 1, 0], [math.radians(30), 0, 0]), [0, 0.8660254037844386, 0.5], atol=1e-12)


def test_the_papers_gate_parameter_count_for_3_x_100_on_150_d():
    # The gate of layer k: W_xa (D_k x D_k), W_ha (D_k x H), b_a (D_k): D_k (D_k + H + 1); 150 in, then 100.
    def gate_params(net):
        return sum(p.numel() for n, p in net.named_parameters() if n.split("_l")[0] in ("weight_xa", "weight_ha", "bias_a"))

    eleatt = EleAttGRU(150, 100, num_layers=3)
    assert gate_params(eleatt) == 150 * (150 + 100 + 1) + 2 * 100 * (100 + 100 + 1) == 77_850
    plain = EleAttGRU(150, 100, num_layers=3, attention_layers=0)
    assert gate_params(plain) == 0
    gru = torch.nn.GRU(150, 100, num_layers=3)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in gru.parameters())
    assert sum(p.numel() for p in eleatt.parameters()) - sum(p.numel() for p in gru.parameters()) == 77_850


def _skeleton_folder(root):
    rng = np.random.default_rng(9)
    folder = FeatureFolder(root / "features")
    folder.check_settings({"modality": "skeleton", "dtype": "float32", "dim": 150})
    entries = []
    for i in range(4):
        feats = np.zeros((6, 150), np.float32)
        feats[:, :75] = rng.normal(size=(6, 75))
        folder.write(f"s{i}.skeleton", feats)
        entries.append(ListEntry(f"s{i}.skeleton", i % 2))
    write_list(root / "train.txt", entries)
    write_classes(root / "classes.txt", ["a", "b"])
    return folder


def test_the_data_module_rotates_training_samples_only_when_asked(tmp_path):
    folder = _skeleton_folder(tmp_path)
    dm = FeatureDataModule(str(folder.root), train_list=str(tmp_path / "train.txt"), val_list=str(tmp_path / "train.txt"),
                           num_steps=0, augment="skeleton_rotation", rotation_degrees=35)
    assert isinstance(dm.train_transform, SkeletonRotation) and dm.train_transform.max_degrees == 35
    dm.setup("fit")
    stored = folder.load("s0.skeleton")
    sample = dm.datasets["train"][0]["feats"].numpy()
    assert not np.allclose(sample, stored)
    np.testing.assert_allclose(bone_lengths(sample), bone_lengths(stored), atol=1e-5)
    np.testing.assert_array_equal(dm.datasets["val"][0]["feats"][0].numpy(), stored)  # evaluation: as stored
    plain = FeatureDataModule(str(folder.root), train_list=str(tmp_path / "train.txt"), num_steps=0)
    assert plain.train_transform is None


def test_the_rotation_is_refused_on_other_features(tmp_path, order_features):
    lists = order_features["lists"]
    with pytest.raises(ValueError, match="skeleton_rotation rotates x, y, z .* rgb features of dimension 8"):
        FeatureDataModule(str(order_features["features"]), train_list=str(lists / "train.txt"),
                          augment="skeleton_rotation")
    folder = _skeleton_folder(tmp_path)
    with pytest.raises(ValueError, match="normalize='standard'"):
        FeatureDataModule(str(folder.root), train_list=str(tmp_path / "train.txt"), augment="skeleton_rotation",
                          normalize="standard")


def test_the_epoch_benchmark_counts_the_gate_and_labels_extrapolated_epochs(capsys):
    from pipeline.benchmarks.skeleton import main

    assert main(["--sequences", "64", "--steps", "5", "--batch-size", "16", "--hidden", "8", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "extrapolated from 1 timed batch(es) of 4" in out
    gate = 150 * (150 + 8 + 1) + 2 * 8 * (8 + 8 + 1)
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ")}
    assert int(rows["EleAtt-GRU 3x8"][1].replace(",", "")) == gate
    assert int(rows["GRU (no gate, same kernel) 3x8"][1].replace(",", "")) == 0
    assert float(rows["nn.GRU 3x8"][4]) == 1.0 and "(extrapolated)" in rows["EleAtt-GRU 3x8"][3]
    assert "rotation augmentation:" in out
