"""`eleatt prepare` costs per video (issue 32): a folder of classes is scanned without a stat per video, output
names are computed without path objects, and colliding names are found in one pass."""
from __future__ import annotations

import os

from pipeline.data.lists import ListEntry
from preprocessing.splits import find_collisions, grouped_holdout, output_stem, scan_folder


def test_output_stem_normalises_as_a_posix_path_would():
    cases = {"c/x.avi": "c/x", "c\\x.mp4": "c/x", "c//x.mp4": "c/x", "./c/x.mp4": "c/x", "c/./x.mp4": "c/x",
             "c/x/": "c/x", "c/x.tar.gz": "c/x.tar", ".hidden": ".hidden", "c/.x": "c/.x", "a/b.c/d": "a/b.c/d",
             "c/x.": "c/x", "x": "x"}
    assert {video: output_stem(video) for video in cases} == cases


def test_collisions_are_grouped_in_list_order_each_video_once():
    entries = [ListEntry(p, 0) for p in ["a/x.avi", "b/y.mp4", "a/x.mp4", "a/x.avi", "a/x", "b/z.mp4", "b/y.avi"]]
    assert find_collisions(entries) == [["a/x.avi", "a/x.mp4", "a/x"], ["b/y.mp4", "b/y.avi"]]


def test_a_folder_of_classes_is_scanned_without_a_stat_per_video(tmp_path, monkeypatch):
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(10):
            (tmp_path / f"class{c}" / f"v{9 - i}.MP4").touch()
        (tmp_path / f"class{c}" / "notes.txt").touch()
        (tmp_path / f"class{c}" / ".v0.mp4").touch()
    frames = tmp_path / "class1" / "frames_video"
    frames.mkdir()
    (frames / "img_00001.jpg").touch()
    (tmp_path / "class2" / "empty_folder").mkdir()
    calls = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    prepared = scan_folder(tmp_path, test_fraction=0.2, seed=0)
    assert len(calls) <= 4  # the root and the 3 class folders: none per video
    everything = sorted(e.path for e in prepared.train + prepared.test)
    assert len(everything) == 31 and "class1/frames_video" in everything and "class0/v0.MP4" in everything
    assert not any("notes" in p or "/." in p or "empty" in p for p in everything)
    assert len(prepared.test) == 6 and prepared.notes[-1].startswith("4 other files/folders")


def test_grouped_holdout_calls_the_group_function_once_per_video():
    entries = [ListEntry(f"c{i % 2}/v{i}.mp4", i % 2) for i in range(40)]
    calls = []
    kept, held, info = grouped_holdout(entries, 0.25, 0, lambda e: calls.append(e) or e.path)
    assert len(calls) == 40 and len(held) == 10 and len(kept) == 30 and info["stratified"]


def test_grouped_holdout_weighs_groups_by_their_videos():
    # g0 holds 6 videos of two classes, g1..g4 one each: 10 videos, half to hold out. Seed 13's draw puts g0
    # first (np.random.default_rng(13).permutation(5)[0] == 0): 6 videos is the closest prefix to 5, so g0 alone.
    entries = [ListEntry(f"c{i % 2}/g0_{i}.mp4", i % 2) for i in range(6)]
    entries += [ListEntry(f"c0/g{k}_x.mp4", 0) for k in range(1, 5)]
    kept, held, info = grouped_holdout(entries, 0.5, 13, lambda e: e.path.split("/")[1].split("_")[0])
    assert [e.path for e in held] == [f"c{i % 2}/g0_{i}.mp4" for i in range(6)]
    assert info == {"groups": 5, "held_groups": 1, "stratified": False}
