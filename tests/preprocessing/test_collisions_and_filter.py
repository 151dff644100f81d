"""`eleatt prepare`'s outputs that would collide (x.avi and x.mp4 share their flow and feature files) and
`eleatt prepare filter` (preprocessing/splits.py): the lists of the videos every stage finished, the same for every
stream, and problems.jsonl naming each video left out with its stage and reason."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.features import FeatureFolder
from pipeline.data.lists import ListEntry, read_list, write_classes, write_list
from preprocessing.prepare import main
from preprocessing.splits import filter_lists, find_collisions, output_stem


def test_output_stems_and_collisions():
    assert output_stem("a/x.avi") == output_stem("a/x.mp4") == output_stem("a/x") == "a/x"
    assert output_stem("a/x.y.mp4") == "a/x.y" and output_stem("a\\b.mp4") == "a/b"
    entries = [ListEntry(p, 0) for p in ("a/x.avi", "a/y.mp4", "a/x.mp4", "b/x.mp4", "a/x", "a/x.avi", "c/z.mkv",
                                         "c/z.webm")]
    assert find_collisions(entries) == [["a/x.avi", "a/x.mp4", "a/x"], ["c/z.mkv", "c/z.webm"]]


@pytest.fixture
def folder_tree(tmp_path):
    root = tmp_path / "videos"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{cls}{i}.mp4").write_bytes(b"")
    (root / "a" / "a0.avi").write_bytes(b"")  # beside a/a0.mp4
    return root


def test_prepare_refuses_colliding_outputs_naming_both(folder_tree, tmp_path, capsys):
    from pipeline.cli import main as eleatt

    with pytest.raises(ValueError, match="would share their flow and feature files"):
        main(["folder", "--root", str(folder_tree), "--out", str(tmp_path / "lists")])
    # through the dispatcher: one line, exit 2, nothing written
    assert eleatt(["prepare", "folder", "--root", str(folder_tree), "--out", str(tmp_path / "l2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "videos 'a/a0.avi' and 'a/a0.mp4' would share their flow and feature files" in err
    assert "--drop-collisions" in err and not (tmp_path / "l2" / "train.txt").exists()


def test_drop_collisions_leaves_both_out_and_lists_them(folder_tree, tmp_path, capsys):
    out = tmp_path / "lists"
    assert main(["folder", "--root", str(folder_tree), "--out", str(out), "--drop-collisions",
                 "--test-fraction", "0.25", "--val-fraction", "0.25"]) == 3
    lists = {s: [e.path for e in read_list(out / f"{s}.txt")] for s in ("train", "val", "test", "all")}
    assert lists["all"] == lists["train"] + lists["val"] + lists["test"]
    assert sorted(lists["all"]) == sorted(f"{c}/{c}{i}.mp4" for c in "ab" for i in range(5) if f"{c}{i}" != "a0")
    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [(r["video"], r["stage"]) for r in records] == [("a/a0.avi", "prepare"), ("a/a0.mp4", "prepare")]
    assert "'a/a0.mp4'" in records[0]["reason"] and "rename one" in records[0]["reason"]
    printed = capsys.readouterr()
    assert "all.txt            9 videos" in printed.out and "a/a0.avi: left out" in printed.err
    # a clean rerun (the twin renamed) removes the stale problems file
    (folder_tree / "a" / "a0.avi").rename(folder_tree / "a" / "a5.avi")
    assert main(["folder", "--root", str(folder_tree), "--out", str(out), "--drop-collisions"]) == 0
    assert not (out / "problems.jsonl").exists() and len(read_list(out / "all.txt")) == 11


def _folder(path, modality, done, failed=()):
    folder = FeatureFolder(path)
    folder.check_settings({"backbone": "test_resnet", "weights": "none", "modality": modality, "dtype": "float32",
                           "dim": 2})
    for video in done:
        folder.write(video, np.zeros((3, 2), np.float32))
    for video, reason in failed:
        folder.record_failure(video, reason)
    return path


def test_filter_keeps_what_every_folder_finished(tmp_path, capsys):
    lists = tmp_path / "lists"
    entries = {"train": [ListEntry("a/1.mp4", 0), ListEntry("a/2.mp4", 0), ListEntry("b/3.mp4", 1)],
               "val": [ListEntry("b/4.mp4", 1)], "test": [ListEntry("a/5.mp4", 0), ListEntry("b/6.mp4", 1)]}
    for name, items in entries.items():
        write_list(lists / f"{name}.txt", items)
    write_classes(lists / "classes.txt", ["a", "b"])
    (lists / "problems.jsonl").write_text(json.dumps({"video": "b/7.mp4", "stage": "prepare", "reason": "twin"}) + "\n")
    every = [e.path for items in entries.values() for e in items]
    rgb = _folder(tmp_path / "rgb", "rgb", [v for v in every if v != "a/2.mp4"], [("a/2.mp4", "VideoReadError: bad")])
    flow = _folder(tmp_path / "flowfeat", "flow", [v for v in every if v not in ("a/2.mp4", "b/6.mp4")],
                   [("a/2.mp4", "flow file missing")])
    out = tmp_path / "ok"
    problems = filter_lists(lists, [rgb, flow], out)
    assert problems == [
        {"video": "b/7.mp4", "stage": "prepare", "reason": "twin"},
        {"video": "a/2.mp4", "stage": "extract rgb", "folder": str(rgb), "reason": "VideoReadError: bad"},
        {"video": "b/6.mp4", "stage": "extract flow", "folder": str(flow),
         "reason": f"no output in '{flow}' (never processed: rerun that stage)"}]
    assert [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()] == problems
    assert {s: [e.path for e in read_list(out / f"{s}.txt")] for s in ("train", "val", "test", "all")} == {
        "train": ["a/1.mp4", "b/3.mp4"], "val": ["b/4.mp4"], "test": ["a/5.mp4"],
        "all": ["a/1.mp4", "b/3.mp4", "b/4.mp4", "a/5.mp4"]}
    assert (out / "classes.txt").read_text() == "a\nb\n"
    # the command: exit 3 with each listed; refuses to write over its own input lists
    from pipeline.cli import main as eleatt

    assert eleatt(["prepare", "filter", "--lists", str(lists), "--folders", str(rgb), str(flow), "--out",
                   str(tmp_path / "ok2")]) == 3
    printed = capsys.readouterr()
    assert "4 videos kept, 3 left out" in printed.out and "a/2.mp4: extract rgb: VideoReadError: bad" in printed.err
    assert eleatt(["prepare", "filter", "--lists", str(lists), "--folders", str(rgb), "--out", str(lists)]) == 2
    assert "is the folder of the lists it reads" in capsys.readouterr().err
    assert eleatt(["prepare", "filter", "--lists", str(lists), "--folders", str(tmp_path / "none"), "--out",
                   str(tmp_path / "ok3")]) == 2
    assert "not found" in capsys.readouterr().err
