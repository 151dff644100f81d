"""The derived skeleton streams (bone, joint motion, bone motion) and the dataset authors' noise-body filter."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.skeleton import (
    NUM_JOINTS, NoiseCounts, bones, denoise_bodies, derive_stream, load_skeleton, motion, read_skeleton,
    select_bodies, skeleton_features, write_skeleton,
)

# NTU RGB+D's 24 bones as (joint, parent), 1-based, as published with the dataset and used by 2s-AGCN, CTR-GCN and
# pyskl; joint 21 (the spine at the shoulders) is the root. Written here, not imported from the module.
NTU_PAIRS_1_BASED = [
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10), (12, 11),
    (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (22, 23), (23, 8), (24, 25),
    (25, 12),
]


def ladder(shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(25, 3): joint index j at (0.1 j, 0.01 j^2, 2 - 0.05 j) + shift."""
    j = np.arange(NUM_JOINTS, dtype=np.float64)
    return np.stack([0.1 * j, 0.01 * j * j, 2.0 - 0.05 * j], axis=1) + np.asarray(shift)


def test_bones_are_joint_differences_over_ntus_published_pairs():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 150)).astype(np.float32)
    feats[3:, 75:] = 0.0  # the second body leaves after frame 2
    out = bones(feats)
    assert out.shape == (7, 150) and out.dtype == np.float32
    x = feats.astype(np.float64).reshape(7, 2, 25, 3)
    expected = np.zeros_like(x)
    for joint, parent in NTU_PAIRS_1_BASED:
        expected[:, :, joint - 1] = x[:, :, joint - 1] - x[:, :, parent - 1]
    np.testing.assert_allclose(out.reshape(7, 2, 25, 3), expected, atol=1e-6)
    assert not out.reshape(7, 2, 25, 3)[:, :, 20].any()  # joint 21 has no parent: zero
    assert not out[3:, 75:].any()  # an absent body has no bones
    assert len({j for j, _ in NTU_PAIRS_1_BASED}) == 24 and 21 not in {j for j, _ in NTU_PAIRS_1_BASED}


def test_bone_values_by_hand():
    feats = np.zeros((1, 150), np.float32)
    feats[0, :75] = ladder().reshape(-1)
    b = bones(feats)[0, :75].reshape(25, 3)
    np.testing.assert_allclose(b[0], [-0.1, -0.01, 0.05], atol=1e-6)  # joint 1 - joint 2
    np.testing.assert_allclose(b[3], [0.1, 0.05, -0.05], atol=1e-6)  # joint 4 - joint 3: j=3 minus j=2
    np.testing.assert_allclose(b[21], [-0.1, -0.43, 0.05], atol=1e-6)  # joint 22 - joint 23
    np.testing.assert_allclose(b[22], [1.5, 4.35, -0.75], atol=1e-6)  # joint 23 - joint 8: j=22 minus j=7 (4.84 - 0.49)
    np.testing.assert_allclose(b[20], [0, 0, 0])


def test_motion_is_the_next_frame_minus_this_one_and_the_last_step_is_zero():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(6, 150)).astype(np.float32)
    out = motion(feats)
    assert out.shape == (6, 150) and out.dtype == np.float32
    np.testing.assert_allclose(out[:5], feats[1:].astype(np.float64) - feats[:5], atol=1e-6)
    assert not out[5].any()
    # by hand: a joint moving 0.02, 0.05, -0.01 between frames 0-1, 1-2, 2-3
    walk = np.zeros((4, 150), np.float32)
    walk[:, :75] = 1.0
    walk[:, 0] = [0.0, 0.02, 0.07, 0.06]
    np.testing.assert_allclose(motion(walk)[:, 0], [0.02, 0.05, -0.01, 0.0], atol=1e-7)


def test_motion_is_zero_where_a_body_enters_or_leaves():
    feats = np.zeros((5, 150), np.float32)
    feats[:, :75] = np.arange(5)[:, None] * 0.1 + 0.5  # body 0 throughout, 0.1 a frame
    feats[2:4, 75:] = 3.0  # body 1 in frames 2 and 3 only, standing still 3 m from the origin
    out = motion(feats).reshape(5, 2, 75)
    np.testing.assert_allclose(out[:4, 0], 0.1, atol=1e-6)
    # not the 3 m jump from the absent body's zeros (t=1) or back to them (t=3)
    np.testing.assert_array_equal(out[:, 1], 0.0)


def test_bone_motion_is_the_motion_of_the_bones_and_streams_keep_their_shape():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(5, 150)).astype(np.float32)
    b = bones(feats)
    np.testing.assert_allclose(derive_stream(feats, "bone_motion")[:4], b[1:].astype(np.float64) - b[:4], atol=1e-5)
    np.testing.assert_array_equal(derive_stream(feats, "joint"), feats)
    np.testing.assert_array_equal(derive_stream(feats, "bone"), b)
    np.testing.assert_array_equal(derive_stream(feats, "joint_motion"), motion(feats))
    with pytest.raises(ValueError, match="stream 'velocity'"):
        derive_stream(feats, "velocity")
    with pytest.raises(ValueError, match="needs the NTU 25-joint or the COCO 17-keypoint layout.*18 joints"):
        derive_stream(np.zeros((2, 2 * 18 * 3)), "bone", joints=18)


def test_coco_bones_by_hand():
    """17 COCO keypoints, 2 bodies, (x, y): joint v of body b at (v + 100 b, 2 v); each bone is the child minus its
    parent, written out: eyes - nose, ears - eyes, shoulders and hips - nose, elbows - shoulders, wrists - elbows,
    knees - hips, ankles - knees; the nose (root) is zero."""
    parent = {1: 0, 2: 0, 3: 1, 4: 2, 5: 0, 6: 0, 7: 5, 8: 6, 9: 7, 10: 8, 11: 0, 12: 0, 13: 11, 14: 12, 15: 13, 16: 14}
    v = np.arange(17, dtype=np.float32)
    feats = np.stack([np.stack([v + 100 * b, 2 * v], -1) for b in range(2)]).reshape(1, 2 * 17 * 2)
    got = derive_stream(feats, "bone", joints=17, channels=2).reshape(2, 17, 2)
    want = np.zeros((17, 2), np.float32)
    for child, p in parent.items():
        want[child] = [child - p, 2 * (child - p)]
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)  # the body offset cancels


def test_2d_streams_carry_the_mean_score_as_pyskl_does():
    # 2D keypoints with a confidence: (x, y, score) per joint; a bone's score is the mean of its two joints', a
    # motion step's the mean of its two frames'.
    feats = np.zeros((2, 2 * 25 * 3), np.float32)
    body = feats.reshape(2, 2, 25, 3)
    body[0, 0, :, 0] = np.arange(25) * 0.1
    body[1, 0, :, 0] = np.arange(25) * 0.1 + 0.2
    body[0, 0, :, 2] = 0.5
    body[1, 0, :, 2] = 1.0
    body[0, 0, 1, 2] = 0.9  # joint 2 is surer in frame 0
    b = bones(feats, channels=3, score=True).reshape(2, 2, 25, 3)
    np.testing.assert_allclose(b[0, 0, 0], [-0.1, 0.0, 0.7], atol=1e-6)  # joint 1 - joint 2; score (0.5 + 0.9) / 2
    m = motion(feats, channels=3, score=True).reshape(2, 2, 25, 3)
    np.testing.assert_allclose(m[0, 0, 5], [0.2, 0.0, 0.75], atol=1e-6)  # x moves 0.2; score (0.5 + 1.0) / 2
    np.testing.assert_array_equal(m[1], 0.0)


# ----------------------------------------------------------------------------------------------- noise filter
def person(at: float, frames: int, speed: float, rng, wide: bool = False) -> list[np.ndarray]:
    """A body standing at x=`at`: 0.4 m wide and 1.6 m tall (or 2 m wide and 0.3 m tall), walking `speed` a frame."""
    shape = rng.uniform(-0.5, 0.5, size=(NUM_JOINTS, 3)) * ([2.0, 0.3, 0.2] if wide else [0.4, 1.6, 0.2])
    if wide:  # two joints span the whole box in x and y
        shape[0, :2], shape[1, :2] = [-1.0, -0.15], [1.0, 0.15]
    else:
        shape[0, :2], shape[1, :2] = [-0.2, -0.8], [0.2, 0.8]
    return [shape + [at + speed * t, 0.0, 3.0] for t in range(frames)]


def frames_of(**bodies) -> list[list[tuple[str, np.ndarray]]]:
    length = max(len(seq) for seq in bodies.values())
    return [[(name, seq[t]) for name, seq in bodies.items() if t < len(seq)] for t in range(length)]


def slot_ids(path, denoise: bool) -> list[set]:
    """Which bodies' joints each slot holds (matched by the x position of their first frame)."""
    skeleton = read_skeleton(path)
    if denoise:
        skeleton, _ = denoise_bodies(skeleton)
    joints, present = select_bodies(skeleton)
    firsts = {b.body_id: b.joints[0] for b in read_skeleton(path).bodies}
    return [{name for name, first in firsts.items() if any(np.allclose(joints[t, slot], first, atol=1e-4)
                                                            for t in range(len(joints)))} for slot in range(2)]


def test_a_short_lived_body_is_dropped_before_the_ranking(tmp_path):
    rng = np.random.default_rng(3)
    # "blip" (11 frames) moves most: by motion alone it takes slot 0 and pushes "b" out; NTU drops it first.
    path = write_skeleton(tmp_path / "blip.skeleton", frames_of(
        blip=person(-1.0, 11, 0.2, rng), a=person(0.0, 30, 0.03, rng), b=person(1.0, 30, 0.01, rng)))
    assert slot_ids(path, denoise=False) == [{"blip"}, {"a"}]
    assert slot_ids(path, denoise=True) == [{"a"}, {"b"}]
    _, counts = denoise_bodies(read_skeleton(path))
    assert counts == NoiseCounts(by_length=1, files_by_length=1)
    feats, counts = skeleton_features(path)
    assert counts.by_length == 1 and feats.shape == (30, 150)
    np.testing.assert_array_equal(skeleton_features(path, denoise=False)[0], load_skeleton(path))


def test_the_length_rule_drops_at_most_eleven_frames_not_twelve(tmp_path):
    rng = np.random.default_rng(4)
    for frames, dropped in ((11, 1), (12, 0)):
        path = write_skeleton(tmp_path / f"len{frames}.skeleton", frames_of(
            short=person(-1.0, frames, 0.2, rng), a=person(0.0, 30, 0.03, rng)))
        _, counts = denoise_bodies(read_skeleton(path))
        assert counts.by_length == dropped, frames


def test_a_body_wider_than_tall_is_dropped(tmp_path):
    rng = np.random.default_rng(5)
    path = write_skeleton(tmp_path / "wide.skeleton", frames_of(
        table=person(-1.0, 30, 0.1, rng, wide=True), a=person(0.0, 30, 0.03, rng), b=person(1.0, 30, 0.01, rng)))
    assert slot_ids(path, denoise=False) == [{"table"}, {"a"}]
    assert slot_ids(path, denoise=True) == [{"a"}, {"b"}]
    _, counts = denoise_bodies(read_skeleton(path))
    assert counts == NoiseCounts(by_spread=1, files_by_spread=1)


@pytest.mark.parametrize("noisy, dropped", [(28, 1), (27, 0)])  # of 40 frames: 70% >= 69.754% is noise; 67.5% not
def test_the_spread_rule_counts_the_fraction_of_noisy_frames(tmp_path, noisy, dropped):
    rng = np.random.default_rng(6)
    tall, wide = person(-1.0, 40, 0.0, rng), person(-1.0, 40, 0.0, rng, wide=True)
    mixed = wide[:noisy] + tall[noisy:]
    path = write_skeleton(tmp_path / "mixed.skeleton", frames_of(mixed=mixed, a=person(0.0, 40, 0.03, rng)))
    _, counts = denoise_bodies(read_skeleton(path))
    assert counts.by_spread == dropped


def test_a_kept_body_is_ranked_by_its_motion_over_its_clean_frames(tmp_path):
    rng = np.random.default_rng(7)
    # "flicker" stands still but 10 of its 40 frames are wide and far off: over all frames it moves most, over its
    # clean frames not at all, so it ranks last and "a" and "b" are kept.
    flicker = person(-1.0, 40, 0.0, rng)
    for t in range(0, 40, 4):
        flicker[t] = person(-3.0 + 0.2 * t, 1, 0.0, rng, wide=True)[0]
    path = write_skeleton(tmp_path / "flicker.skeleton", frames_of(
        flicker=flicker, a=person(0.0, 40, 0.02, rng), b=person(1.0, 40, 0.01, rng)))
    assert slot_ids(path, denoise=False) == [{"flicker"}, {"a"}]
    assert slot_ids(path, denoise=True) == [{"a"}, {"b"}]
    _, counts = denoise_bodies(read_skeleton(path))
    assert counts == NoiseCounts()  # dropped by the ranking, not by a rule


def test_a_single_body_and_a_file_whose_bodies_would_all_go_are_kept(tmp_path):
    rng = np.random.default_rng(8)
    alone = write_skeleton(tmp_path / "alone.skeleton", frames_of(table=person(0.0, 5, 0.1, rng, wide=True)))
    skeleton, counts = denoise_bodies(read_skeleton(alone))
    assert len(skeleton.bodies) == 1 and counts == NoiseCounts()
    both = write_skeleton(tmp_path / "both.skeleton", frames_of(a=person(0.0, 8, 0.1, rng),
                                                              b=person(1.0, 8, 0.0, rng)))
    skeleton, counts = denoise_bodies(read_skeleton(both))
    assert len(skeleton.bodies) == 2 and counts == NoiseCounts(kept_all=1)
    total = NoiseCounts(1, 1, 2, 1) + NoiseCounts(by_spread=1, files_by_spread=1, kept_all=1)
    assert total == NoiseCounts(1, 1, 3, 2, 1)
    assert "1 bodies seen in at most 11 frames dropped (1 files), 3 bodies wider than tall" in total.summary()


# ----------------------------------------------------------------------------------------------- benchmarks
def test_the_generated_set_puts_the_class_in_the_informative_joints_only():
    from pipeline.benchmarks.skeleton import generated_skeletons

    feats, labels = generated_skeletons(60, classes=6, steps=12, informative=(7, 11), pattern="drift",
                                        amplitude=0.12, jitter=0.0, pose=0.0, seed=0)
    assert feats.shape == (60, 12, 150) and feats.dtype == np.float32 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [10] * 6 and not feats[:, :, 75:].any()  # balanced; body 1 absent
    walk = (feats[:, -1, :75] - feats[:, 0, :75]).reshape(60, 25, 3)  # 11/12 of 0.12 m: 0.11 m
    for i, c in enumerate(labels):
        angle = 2 * np.pi * c / 6
        np.testing.assert_allclose(walk[i, [7, 11]], [[0.11 * np.cos(angle), 0.11 * np.sin(angle), 0]] * 2,
                                   atol=1e-6)
    # the other joints walk the same distance in the directions of random classes: no joint alone tells
    np.testing.assert_allclose(np.linalg.norm(walk, axis=-1), 0.11, atol=1e-6)
    others = np.delete(walk, [7, 11], axis=1).reshape(-1, 3)
    angles = np.round(np.degrees(np.arctan2(others[:, 1], others[:, 0])) % 360).astype(int)
    assert set(angles.tolist()) == {0, 60, 120, 180, 240, 300}
    # wave: the informative joints oscillate along the class's axis (angle 180 c / 6 degrees)
    feats, labels = generated_skeletons(12, classes=6, steps=20, pattern="wave", amplitude=0.1, jitter=0.0,
                                        pose=0.0, seed=1)
    hand = feats[:, :, 21:24] - feats[:, :1, 21:24]  # joint index 7: columns 21..23
    for i, c in enumerate(labels):
        angle = np.pi * c / 6
        cross = hand[i, :, 0] * np.sin(angle) - hand[i, :, 1] * np.cos(angle)
        np.testing.assert_allclose(cross, 0.0, atol=1e-6)  # every step on the class's axis
        assert np.abs(hand[i]).max() > 0.05


def test_the_gate_benchmark_prints_a_row_per_seed_and_the_mean(capsys):
    from pipeline.benchmarks.skeleton import main

    assert main(["--gate", "--seeds", "2", "--train", "12", "--test", "6", "--epochs", "1", "--hidden", "4",
                 "--layers", "1", "--steps", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 classes in 2 of 25 joints (0-based 7, 11), pattern wave, 12 training and 6 test sequences" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1", "mean (sd)"]
    assert "chance: 16.7%" in out


def test_the_streams_benchmark_reports_time_and_disk(capsys):
    from pipeline.benchmarks.skeleton import main

    assert main(["--streams", "--samples", "4", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"bone", "joint_motion", "bone_motion", "read a stored sample (reference)"}
    assert rows["read a stored sample (reference)"][1].strip() == "1.00"
    assert rows["bone"][2].strip() == "11.8 KiB"  # a .npy of 20 x 150 float32: 128-byte header + 12000 bytes


def test_the_gate_benchmark_compares_the_same_stack_with_and_without_gates():
    from pipeline.benchmarks.skeleton import gate_networks

    nets = gate_networks(6, 8, 2)

    def gate_params(net):
        return sum(p.numel() for n, p in net.named_parameters() if n.rsplit(".", 1)[-1].split("_l")[0]
                   in ("weight_xa", "weight_ha", "bias_a"))

    assert gate_params(nets["eleatt"]) == 150 * (150 + 8 + 1) + 8 * (8 + 8 + 1)  # D_k (D_k + H + 1) per layer
    assert gate_params(nets["plain"]) == 0
    total = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}
    assert total["eleatt"] - total["plain"] == 150 * 159 + 8 * 17
    assert all(n.config["cell"] == "gru" and n.config["dropout"] == 0.5 for n in nets.values())
