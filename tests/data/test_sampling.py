"""Frame-index samplers: ranges, counts, order, train randomness, test determinism, short videos, fps counts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data.sampling import (
    Sampling, clip_indices, fps_frames, fps_indices, segment_indices, sequence_indices,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_valid(idx: np.ndarray, n: int, count: int) -> None:
    assert idx.dtype == np.int64 and idx.shape == (count,)
    assert idx.min() >= 0 and idx.max() < n, (idx.min(), idx.max(), n)


# ---------------------------------------------------------------------------------------------------- segments

def test_segment_test_mode_takes_segment_centres():
    np.testing.assert_array_equal(segment_indices(30, 3, train=False), [5, 15, 25])
    # TSN's int(tick / 2 + tick * k) with tick = 10 / 4
    np.testing.assert_array_equal(segment_indices(10, 4, train=False), [int(1.25 + 2.5 * k) for k in range(4)])
    assert_valid(segment_indices(1, 1, train=False), 1, 1)


def test_segment_test_mode_is_deterministic_and_ignores_rng():
    a = segment_indices(97, 8, train=False)
    np.testing.assert_array_equal(a, segment_indices(97, 8, train=False, rng=rng(1)))
    np.testing.assert_array_equal(a, segment_indices(97, 8, train=False, rng=rng(2)))


@pytest.mark.parametrize("n,k", [(1, 1), (1, 5), (7, 3), (8, 8), (10, 25), (100, 7), (1000, 16)])
def test_segment_train_one_frame_per_segment(n, k):
    span = n / k
    for seed in range(20):
        idx = segment_indices(n, k, train=True, rng=rng(seed))
        assert_valid(idx, n, k)
        assert np.all(np.diff(idx) >= 0)
        lo = np.floor(np.arange(k) * span)
        hi = np.ceil((np.arange(k) + 1) * span)
        assert np.all(idx >= lo) and np.all(idx < hi), (idx, lo, hi)


def test_segment_train_is_random_but_seeded():
    a = segment_indices(300, 8, train=True, rng=rng(0))
    np.testing.assert_array_equal(a, segment_indices(300, 8, train=True, rng=rng(0)))
    assert not np.array_equal(a, segment_indices(300, 8, train=True, rng=rng(1)))
    # every frame of a segment is reachable: segment 0 of 40 frames / 4 segments covers frames 0..9
    seen = {int(segment_indices(40, 4, train=True, rng=rng(s))[0]) for s in range(300)}
    assert seen == set(range(10))


def test_segment_short_video_repeats_frames_in_order():
    idx = segment_indices(3, 8, train=False)
    assert_valid(idx, 3, 8)
    assert np.all(np.diff(idx) >= 0) and set(idx.tolist()) == {0, 1, 2}
    idx = segment_indices(3, 8, train=True, rng=rng(0))
    assert np.all(np.diff(idx) >= 0) and set(idx.tolist()) <= {0, 1, 2}


def test_segment_errors():
    with pytest.raises(ValueError, match="num_frames"):
        segment_indices(0, 4, train=False)
    with pytest.raises(ValueError, match="num_segments"):
        segment_indices(10, 0, train=False)
    with pytest.raises(ValueError, match="rng"):
        segment_indices(10, 4, train=True)


# ---------------------------------------------------------------------------------------------------- clips

def test_clip_test_mode_centre_clip_values():
    # span = 7 * 2 + 1 = 15 frames; 86 valid starts; centre start = floor(86 / 2) = 43
    np.testing.assert_array_equal(clip_indices(100, 8, frame_interval=2), 43 + 2 * np.arange(8))
    # a video exactly one clip long has one possible clip
    np.testing.assert_array_equal(clip_indices(15, 8, frame_interval=2), 2 * np.arange(8))


def test_clip_test_mode_evenly_spaced_clips():
    idx = clip_indices(100, 4, frame_interval=1, num_clips=5)
    assert_valid(idx, 100, 20)
    clips = idx.reshape(5, 4)
    np.testing.assert_array_equal(np.diff(clips, axis=1), 1)
    starts = clips[:, 0]
    # mmaction2 SampleFrames(test_mode): base + slot / 2 with slot = (100 - 4 + 1) / 5
    np.testing.assert_array_equal(starts, np.floor(np.arange(5) * 19.4 + 9.7).astype(int))
    assert np.all(np.diff(starts) > 0)
    np.testing.assert_array_equal(idx, clip_indices(100, 4, num_clips=5, rng=rng(3)))  # rng ignored in test mode


@pytest.mark.parametrize("n,clip_len,interval,num_clips",
                         [(64, 8, 1, 1), (64, 8, 4, 3), (300, 16, 2, 10), (12, 3, 4, 2)])
def test_clip_train_random_starts_within_slots(n, clip_len, interval, num_clips):
    span = (clip_len - 1) * interval + 1
    slot = (n - span + 1) / num_clips
    starts_seen = set()
    for seed in range(30):
        idx = clip_indices(n, clip_len, interval, num_clips, train=True, rng=rng(seed))
        assert_valid(idx, n, num_clips * clip_len)
        clips = idx.reshape(num_clips, clip_len)
        np.testing.assert_array_equal(np.diff(clips, axis=1), interval)
        starts = clips[:, 0]
        k = np.arange(num_clips)
        assert np.all(starts >= np.floor(k * slot)) and np.all(starts < np.ceil((k + 1) * slot))
        assert np.all(np.diff(starts) >= 0)
        starts_seen.add(tuple(starts))
    assert len(starts_seen) > 1  # training is random


@pytest.mark.parametrize("train", [False, True])
def test_clip_short_video_loop(train):
    idx = clip_indices(5, 8, frame_interval=1, num_clips=2, train=train, rng=rng(0), pad="loop")
    assert_valid(idx, 5, 16)
    for clip in idx.reshape(2, 8):
        # consecutive frames modulo the video length, starting anywhere (train) or at 0 (test)
        np.testing.assert_array_equal(clip, (clip[0] + np.arange(8)) % 5)
        if not train:
            assert clip[0] == 0


@pytest.mark.parametrize("train", [False, True])
def test_clip_short_video_repeat_last(train):
    idx = clip_indices(5, 8, frame_interval=2, num_clips=2, train=train, rng=rng(0), pad="repeat_last")
    np.testing.assert_array_equal(idx, np.tile([0, 2, 4, 4, 4, 4, 4, 4], 2))
    np.testing.assert_array_equal(clip_indices(1, 4, pad="repeat_last"), [0, 0, 0, 0])
    np.testing.assert_array_equal(clip_indices(1, 4, pad="loop"), [0, 0, 0, 0])


def test_clip_errors():
    with pytest.raises(ValueError, match="pad"):
        clip_indices(10, 4, pad="zeros")
    with pytest.raises(ValueError, match="num_frames"):
        clip_indices(0, 4)
    with pytest.raises(ValueError, match="frame_interval"):
        clip_indices(10, 4, frame_interval=0)
    with pytest.raises(ValueError, match="rng"):
        clip_indices(10, 4, train=True)


# ---------------------------------------------------------------------------------------------------- fps

def test_fps_all_frames():
    np.testing.assert_array_equal(fps_indices(7, 30.0), np.arange(7))
    np.testing.assert_array_equal(fps_indices(7, 30.0, 0), np.arange(7))
    np.testing.assert_array_equal(fps_indices(7, 30.0, 60.0), np.arange(7))  # never duplicates frames
    assert fps_indices(7, 30.0).dtype == np.int64


def test_fps_exact_ratios():
    np.testing.assert_array_equal(fps_indices(300, 30, 10), np.arange(0, 300, 3))
    np.testing.assert_array_equal(fps_indices(301, 30, 10), np.arange(0, 301, 3))  # 101 frames: 0..300
    np.testing.assert_array_equal(fps_indices(10, 25, 10), [0, 2, 5, 7])


@pytest.mark.parametrize("n,src,target",
                         [(1, 30, 5), (250, 29.97, 5), (1000, 23.976, 1), (123, 59.94, 24), (17, 12, 11.5)])
def test_fps_counts_and_order(n, src, target):
    idx = fps_indices(n, src, target)
    assert_valid(idx, n, math.ceil(n * target / src - 1e-9))
    assert np.all(np.diff(idx) > 0)
    # each index is the frame on screen at time k / target
    np.testing.assert_array_equal(idx, np.floor(np.arange(len(idx)) / target * src + 1e-9).astype(int))


def test_fps_errors():
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="src_fps"):
            fps_indices(10, bad, 5)
    with pytest.raises(ValueError, match="target_fps"):
        fps_indices(10, 30, -5)


# ---------------------------------------------------------------------------------------------------- sequences

def test_sequence_indices_segment_style():
    np.testing.assert_array_equal(sequence_indices(100, 10, train=False), segment_indices(100, 10, train=False))
    np.testing.assert_array_equal(sequence_indices(100, 10, train=True, rng=rng(4)),
                                  segment_indices(100, 10, train=True, rng=rng(4)))
    short = sequence_indices(4, 10, train=False)
    assert_valid(short, 4, 10)
    np.testing.assert_array_equal(short, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3])  # floor(0.4 k + 0.2)
    with pytest.raises(ValueError, match="length"):
        sequence_indices(0, 10, train=False)
    with pytest.raises(ValueError, match="rng"):
        sequence_indices(10, 4, train=True)


def test_fps_non_integer_ratios_by_hand():
    # the frame on screen at time k / target: floor(k * src / target), worked out by hand
    # 30 -> 8: k * 3.75; 25 -> 8: k * 3.125; 29.97 (30000/1001) -> 6: k * 4.995..., just under 5k: 5k - 1
    np.testing.assert_array_equal(fps_indices(48, 30, 8), [0, 3, 7, 11, 15, 18, 22, 26, 30, 33, 37, 41, 45])
    np.testing.assert_array_equal(fps_indices(40, 25, 8), [0, 3, 6, 9, 12, 15, 18, 21, 25, 28, 31, 34, 37])
    np.testing.assert_array_equal(fps_indices(60, 30000 / 1001, 6), [0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49, 54, 59])
    np.testing.assert_array_equal(Sampling(fps=8).indices(46, 30.0), [0, 3, 7, 11, 15, 18, 22, 26, 30, 33, 37, 41, 45])
    np.testing.assert_array_equal(fps_indices(45, 30, 8), [0, 3, 7, 11, 15, 18, 22, 26, 30, 33, 37, 41])  # 45 absent


@pytest.mark.parametrize("src,target", [(30, 10), (30, 8), (30000 / 1001, 6), (25, 25), (24, 60)])
def test_fps_frames_continues_the_rule_from_any_step(src, target):
    """A stream takes fps_frames in pieces (the frames seen so far, from the step after the last one taken): any
    split of the frames gives fps_indices of the whole."""
    whole = fps_indices(100, src, target)
    np.testing.assert_array_equal(fps_frames(100, src, target), whole)
    for cuts in ([1, 2, 3, 50, 100], [7, 33, 34, 100], [100]):
        taken, k = [], 0
        for end in cuts:
            new = fps_frames(end, src, target, first_step=k)
            assert np.all(new < end) and (not taken or np.all(new > taken[-1]))
            taken += new.tolist()
            k += len(new)
        np.testing.assert_array_equal(taken, whole)


def test_fps_times_picks_the_frame_shown_at_each_step_time():
    from pipeline.data.sampling import Sampling, fps_times

    # bursts at 25 frames/s with gaps: at 0, 0.1, ..., 0.8 s the frames shown are 0, 2, 2, 3, 6, 6, 6, 7, 9
    times = [0.0, 0.04, 0.08, 0.3, 0.32, 0.34, 0.36, 0.7, 0.74, 0.78]
    assert fps_times(times, 10).tolist() == [0, 2, 3, 6, 7, 9]
    assert fps_times(times, 5).tolist() == [0, 2, 6, 9]  # at 0, 0.2, 0.4, 0.6, 0.8 s: 0, 2, 6, 6, 9
    assert fps_times(np.array(times) + 5.0, 10).tolist() == [0, 2, 3, 6, 7, 9]  # from the first frame's time
    # the video ends when its last frame stops showing (0.78 + 0.04 s): no step at 0.9 s
    assert fps_times(times, 100).tolist() == list(range(10))  # above every local rate: each frame once
    assert fps_indices(10, 12.8, 10, times=np.array(times)).tolist() == [0, 2, 3, 6, 7, 9]
    assert Sampling(fps=10).indices(10, 12.8, np.array(times)).tolist() == [0, 2, 3, 6, 7, 9]
    assert Sampling().indices(10, 12.8, np.array(times)).tolist() == list(range(10))  # all frames: times unused
    with pytest.raises(ValueError, match="strictly increasing"):
        fps_times([0.0, 0.1, 0.1], 10)
    with pytest.raises(ValueError, match="3 frame times for 4 frames"):
        fps_indices(4, 10, 5, times=np.array([0.0, 0.1, 0.2]))


@pytest.mark.parametrize("src, target, n", [(30, 10, 100), (29.97, 7, 301), (25, 10, 97), (24, 9.5, 200), (30, 45, 20)])
def test_fps_times_on_even_times_is_the_rate_rule(src, target, n):
    from pipeline.data.sampling import fps_times

    np.testing.assert_array_equal(fps_times(np.arange(n) / src, target), fps_indices(n, src, target))
