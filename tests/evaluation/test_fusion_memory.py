"""Fusion and accuracies in bounded memory (issue 32): chunked over videos, the same values as a whole-array float64
computation written here, ties ranked as a stable sort ranks them, chunk boundaries inside the data."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.evaluation.fusion import fuse_probs, fuse_scores, search_weights
from pipeline.evaluation.scores import accuracy_summary, label_ranks


def direct_fuse(probs, weights, mode):
    """The whole-array float64 fusion, written out (the computation the chunked one must reproduce exactly)."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    w = np.asarray(weights, dtype=np.float64)
    w = (w / w.sum())[:, None, None]
    if mode == "prob":
        return (w * stack).sum(0).astype(np.float32)
    logits = (w * np.log(np.clip(stack, 1e-12, None))).sum(0)
    logits -= logits.max(-1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(-1, keepdims=True)).astype(np.float32)


def direct_summary(scores, labels, k):
    """top-1, top-k and mca by a full stable sort (ties: the lower class first)."""
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    topk = (order[:, :k] == labels[:, None]).any(1)
    return top1.mean(), topk.mean(), np.mean([top1[labels == c].mean() for c in np.unique(labels)])


def random_probs(rng, n, c, k=2, ties=False):
    probs = [rng.dirichlet(np.ones(c), size=n).astype(np.float32) for _ in range(k)]
    if ties:  # values on a coarse grid: many exact ties, also in the fused scores
        probs = [(np.round(p * 4) / 4).astype(np.float32) for p in probs]
    return probs


@pytest.mark.parametrize("mode", ["prob", "logit"])
@pytest.mark.parametrize("streams", [2, 3, 4])
def test_chunked_fusion_equals_the_whole_array_computation_bit_for_bit(mode, streams):
    rng = np.random.default_rng(streams)
    probs = random_probs(rng, 103, 7, streams)
    weights = [1.0, 1.5, 0.25, 3.0][:streams]
    expected = direct_fuse(probs, weights, mode)
    for rows in (1, 10, 103, 1000):  # 10: the last chunk holds 3 videos; 1000: one chunk
        np.testing.assert_array_equal(fuse_probs(probs, weights, mode, rows=rows), expected)
    np.testing.assert_array_equal(fuse_probs([p[5] for p in probs], weights, mode), expected[5])  # (C,) vectors


def test_fusion_keeps_float32_inputs_in_place_and_refuses_other_shapes():
    a, b = np.full((4, 3), 0.5, np.float32), np.full((4, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match="one shape"):
        fuse_probs([a, b], [1, 1])


def test_label_ranks_place_ties_and_nan_as_a_stable_sort_does():
    scores = np.array([[0.2, 0.5, 0.5, 0.1],     # label 2 ties class 1, which sorts first: rank 1
                       [0.2, 0.5, 0.5, 0.1],     # label 1: rank 0
                       [0.3, 0.3, 0.3, 0.3],     # label 3: rank 3
                       [np.nan, 0.1, np.nan, 0.9],  # label 2, NaN: after the 2 numbers and class 0's NaN: rank 3
                       [0.1, np.nan, 0.2, 0.0],  # label 0: only 0.2 above it (NaN sorts last): rank 1
                       [0.3, 0.1, np.nan, 0.9],  # label 2, NaN: after the 3 numbers: rank 3
                       [np.nan, 0.5, np.nan, np.nan]])  # label 3, NaN: after 0.5 and the NaNs of classes 0, 2: rank 3
    labels = np.array([2, 1, 3, 2, 0, 2, 3])
    np.testing.assert_array_equal(label_ranks(scores, labels), [1, 0, 3, 3, 1, 3, 3])
    order = np.argsort(-scores, axis=1, kind="stable")
    np.testing.assert_array_equal(label_ranks(scores, labels), np.argmax(order == labels[:, None], axis=1))


@pytest.mark.parametrize("ties", [False, True])
def test_accuracies_equal_a_full_stable_sort_across_chunk_boundaries(ties):
    rng = np.random.default_rng(7)
    scores = random_probs(rng, 250, 9, 1, ties)[0]
    labels = rng.integers(-1, 9, size=250)
    labels[:3] = -1
    top1, top5, mca = direct_summary(scores, labels, 5)
    for rows in (None, 1, 7, 64):
        summary = accuracy_summary(scores, labels, rows=rows)
        assert summary == {"top1": top1, "top5": top5, "mca": mca}  # exactly: the same counts
    if ties:  # the tie rule matters here: ranking ties the other way changes the numbers
        reverse = direct_summary(scores[:, ::-1], 8 - np.where(labels >= 0, labels, 8 - -1), 5)
        assert reverse[0] != top1


def test_search_weights_equal_a_direct_search_with_chunk_boundaries_inside(tmp_path):
    rng = np.random.default_rng(3)
    n, c = 157, 6
    labels = rng.integers(0, c, size=n)
    labels[::10] = -1  # unlabelled videos are left out of the counts
    probs = random_probs(rng, n, c, 2)
    for j, p in enumerate(probs):  # each stream surer of the true class on a different third of the videos
        rows = np.flatnonzero(np.arange(n) % 3 == j)
        p[rows, labels.clip(0)[rows]] += rng.uniform(0, 0.6, size=len(rows)).astype(np.float32)
    dicts = [{"videos": np.array([f"v{i}" for i in range(n)]), "scores": p, "labels": labels} for p in probs]
    grid = (0.0, 0.5, 1.0, 2.0)
    expected = None
    for w in grid:  # the direct search: whole-array fusion, full-sort accuracies, best top-1 then mca then -NLL
        fused = direct_fuse(probs, [1.0, w], "prob")
        top1, _, mca = direct_summary(fused, labels, 5)
        keep = labels >= 0
        nll = -np.log(np.clip(fused[keep, labels[keep]].astype(np.float64), 1e-12, None)).mean()
        rank = (top1, mca, -nll)
        if expected is None or rank > expected[1]:
            expected = ([1.0, w], rank)
    for rows in (None, 5, 50):
        picked = search_weights(dicts, grid=grid, rows=rows)
        assert picked["weights"] == expected[0]
        assert (picked["top1"], picked["mca"]) == expected[1][:2]
        assert picked["videos"] == int((labels >= 0).sum()) == 141


def test_search_refuses_non_finite_validation_scores():
    probs = [np.full((3, 2), 0.5, np.float32), np.array([[0.5, 0.5], [np.nan, 0.5], [0.5, 0.5]], np.float32)]
    dicts = [{"videos": np.array(["a", "b", "c"]), "scores": p, "labels": np.array([0, 1, 0])} for p in probs]
    with pytest.raises(ValueError, match="val2: its scores hold NaN"):
        search_weights(dicts, names=["val1", "val2"])


def test_same_ordered_files_are_fused_without_copying_their_scores():
    scores = [np.random.default_rng(i).dirichlet(np.ones(4), size=20).astype(np.float32) for i in range(2)]
    videos = np.array([f"v{i}" for i in range(20)])
    dicts = [{"videos": videos, "scores": s, "labels": np.arange(20) % 4} for s in scores]
    fused = fuse_scores(dicts)
    assert all(np.shares_memory(a, b) for a, b in zip(fused["streams"], scores))
    np.testing.assert_array_equal(fused["scores"], direct_fuse(scores, [1, 1.5], "prob"))
    shuffled = dict(dicts[1], videos=videos[::-1].copy(), scores=scores[1][::-1].copy(), labels=(np.arange(20) % 4)[::-1])
    again = fuse_scores([dicts[0], shuffled])  # another order: gathered by name, same result
    np.testing.assert_array_equal(again["scores"], fused["scores"])


@pytest.mark.parametrize("videos, row", [(1, 0), (5, 3), (5, 4)])  # 3: a chunk's last row; 4: the last chunk's
def test_a_nan_score_at_a_chunk_boundary_is_refused(tmp_path, monkeypatch, videos, row):
    from pipeline.evaluation import scores as scores_module
    from pipeline.evaluation.scores import ScoresFileError, read_scores, write_scores

    monkeypatch.setattr(scores_module, "CHUNK_VALUES", 6)  # 2 videos of 3 classes a chunk: 5 videos end mid-chunk
    probs = np.full((videos, 3), 1 / 3, np.float32)
    probs[row, 2] = np.nan
    write_scores(tmp_path / "s.npz", [f"v{i}" for i in range(videos)], probs, np.zeros(videos, np.int64), None)
    with pytest.raises(ScoresFileError, match=f"1 of its {videos}x3 scores are NaN"):
        read_scores(tmp_path / "s.npz")
