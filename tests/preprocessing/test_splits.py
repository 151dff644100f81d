"""`eleatt prepare`: each parser on small files in the official formats, grouped validation, exit codes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.data.lists import ListEntry, read_classes, read_list
from preprocessing import splits
from preprocessing.prepare import main
from preprocessing.splits import (
    NTU60_TRAIN_SUBJECTS,
    grouped_holdout,
    hmdb_source,
    parse_hmdb,
    parse_kinetics,
    parse_ucf101,
    scan_folder,
    scan_ntu,
    ucf101_group,
)


def write_crlf(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{line}\r\n" for line in lines).encode())


def read_out(out):
    return {name: read_list(out / f"{name}.txt") for name in ("train", "val", "test")}, read_classes(out / "classes.txt")


# --------------------------------------------------------------------------------------------------- UCF101
# classInd order is not sorted order: sorted() would put HammerThrow before Hammering and JumpRope before JumpingJack.
UCF_CLASSES = ["ApplyEyeMakeup", "Hammering", "HammerThrow", "HandstandPushups", "JumpingJack", "JumpRope"]


def _ucf_file_class(name):
    return "HandStandPushups" if name == "HandstandPushups" else name  # the official case mismatch


@pytest.fixture
def ucf_dir(tmp_path):
    d = tmp_path / "ucfTrainTestlist"
    write_crlf(d / "classInd.txt", [f"{i} {name}" for i, name in enumerate(UCF_CLASSES, 1)])
    train = [f"{c}/v_{_ucf_file_class(c)}_g{g:02d}_c{k:02d}.avi {i}"
             for i, c in enumerate(UCF_CLASSES, 1) for g in range(8, 26) for k in (1, 2)]
    test = [f"{c}/v_{_ucf_file_class(c)}_g{g:02d}_c{k:02d}.avi" for c in UCF_CLASSES for g in range(1, 8) for k in (1, 2)]
    write_crlf(d / "trainlist01.txt", train)
    write_crlf(d / "testlist01.txt", test)
    return d


def test_ucf101_labels_follow_classInd_and_paths_stay_as_written(ucf_dir, tmp_path, capsys):
    out = tmp_path / "lists"
    assert main(["ucf101", "--splits-dir", str(ucf_dir), "--split", "1", "--out", str(out)]) == 0
    lists, classes = read_out(out)
    assert classes == UCF_CLASSES != sorted(UCF_CLASSES)
    train_val = lists["train"] + lists["val"]
    assert len(train_val) == 6 * 18 * 2 and len(lists["test"]) == 6 * 7 * 2
    for e in train_val + lists["test"]:
        folder = e.path.split("/")[0]
        assert classes[e.label] == folder and "\r" not in e.path
    assert ListEntry("HandstandPushups/v_HandStandPushups_g01_c01.avi", 3) in lists["test"]
    assert ListEntry("HammerThrow/v_HammerThrow_g08_c01.avi", 2) in train_val
    # Validation: about 10% in whole gNN groups, none of which is left in train; test groups untouched.
    val_groups = {ucf101_group(e) for e in lists["val"]}
    assert val_groups and val_groups.isdisjoint(ucf101_group(e) for e in lists["train"])
    assert {ucf101_group(e) for e in lists["test"]} == {f"g{g:02d}" for g in range(1, 8)}
    assert len(lists["val"]) == 2 * 6 * 2  # closest whole-group count to 10% of 18 groups
    printed = capsys.readouterr().out
    assert "ucf101 split 1: 6 classes" in printed and "gNN groups" in printed


def test_ucf101_validation_draw_is_seeded(ucf_dir, tmp_path):
    vals = []
    for seed in (0, 0, 1, 2):
        out = tmp_path / f"s{seed}-{len(vals)}"
        assert main(["ucf101", "--splits-dir", str(ucf_dir), "--out", str(out), "--seed", str(seed)]) == 0
        vals.append({ucf101_group(e) for e in read_list(out / "val.txt")})
    assert vals[0] == vals[1] and len({frozenset(v) for v in vals}) > 1
    out = tmp_path / "noval"
    assert main(["ucf101", "--splits-dir", str(ucf_dir), "--out", str(out), "--val-fraction", "0"]) == 0
    assert read_list(out / "val.txt") == [] and len(read_list(out / "train.txt")) == 6 * 18 * 2


def test_ucf101_bad_lines_name_the_file_and_line(ucf_dir):
    lines = (ucf_dir / "trainlist01.txt").read_text().splitlines()
    write_crlf(ucf_dir / "trainlist01.txt", lines[:3] + ["Hammering/v_Hammering_g08_c01.avi 3"])
    with pytest.raises(ValueError, match=r"trainlist01.txt:4: id 3 is 'HammerThrow'.*'Hammering'"):
        parse_ucf101(ucf_dir, 1)
    write_crlf(ucf_dir / "trainlist01.txt", lines[:3])
    write_crlf(ucf_dir / "testlist01.txt", ["Juggling/v_Juggling_g01_c01.avi"])
    with pytest.raises(ValueError, match=r"testlist01.txt:1: .*'Juggling'"):
        parse_ucf101(ucf_dir, 1)
    with pytest.raises(FileNotFoundError, match="trainlist02.txt.*ucfTrainTestlist"):
        parse_ucf101(ucf_dir, 2)


def test_ucf101_check_root_lists_missing_videos(ucf_dir, tmp_path, capsys):
    root = tmp_path / "UCF-101"
    prepared = parse_ucf101(ucf_dir, 1)
    everything = prepared.train + prepared.test
    absent = {everything[0].path, everything[-1].path}
    for e in everything:
        if e.path not in absent:
            (root / e.path).parent.mkdir(parents=True, exist_ok=True)
            (root / e.path).touch()
    out = tmp_path / "lists"
    argv = ["ucf101", "--splits-dir", str(ucf_dir), "--out", str(out), "--check-root", str(root)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert all(path in err for path in absent) and "2 input(s)" in err
    assert {line.split(":")[0] for line in (out / "problems.txt").read_text().splitlines()} == absent
    assert sum(len(v) for v in read_out(out)[0].values()) == len(everything)  # kept by default
    assert main(argv + ["--drop-missing"]) == 3
    written = [e.path for v in read_out(out)[0].values() for e in v]
    assert len(written) == len(everything) - 2 and absent.isdisjoint(written)
    assert main(["ucf101", "--splits-dir", str(ucf_dir), "--out", str(out), "--drop-missing"]) == 2
    assert main(["ucf101", "--splits-dir", str(ucf_dir), "--out", str(out)]) == 0
    assert not (out / "problems.txt").exists()  # a clean rerun removes the stale report


def test_ucf101_ext_points_lists_at_frame_folders(ucf_dir, tmp_path):
    out = tmp_path / "lists"
    assert main(["ucf101", "--splits-dir", str(ucf_dir), "--out", str(out), "--ext", ""]) == 0
    assert read_list(out / "test.txt")[0].path == "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01"
    with pytest.raises(ValueError, match="--ext 'mp4'"):
        main(["ucf101", "--splits-dir", str(ucf_dir), "--out", str(out), "--ext", "mp4"])


# --------------------------------------------------------------------------------------------------- HMDB51 / JHMDB
HMDB_SOURCES = ["April_09", "Blue_Like_Jazz", "Pirates_of_the_Caribbean_1", "likebeckam", "prelinger_LetsPlay",
                "Veoh_Alpha_Dog", "Finding_Forrester", "TheBoondockSaints", "Faith_Rewarded", "Hitch_Part_2"]


def _hmdb_lines(cls, split):
    lines = []
    for i, source in enumerate(HMDB_SOURCES):
        for clip in range(3):  # three clips of each source video
            status = (1, 1, 1, 2, 2, 0, 1, 1, 1, 2)[(i + split) % 10]
            lines.append(f"{source}_{cls}_u_nm_np1_fr_med_{clip}.avi {status} ")  # official lines end in a space
    return lines


def test_hmdb_source_names():
    assert hmdb_source(ListEntry("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 0)) == "april_09"
    assert hmdb_source(ListEntry("sword_exercise/Blade_Of_Fury_sword_exercise_f_cm_np1_ri_med_3.avi", 0)) == (
        "blade_of_fury"
    )
    # The same movie in two classes is one source; names without HMDB tags lose only the clip number.
    assert hmdb_source(ListEntry("kiss/Hitch_Part_2_kiss_h_nm_np2_fr_goo_1.avi", 0)) == hmdb_source(
        ListEntry("hug/Hitch_Part_2_hug_u_cm_np2_le_med_0.avi", 0))
    assert hmdb_source(ListEntry("wave/my_clip_12.avi", 0)) == "my_clip"


@pytest.mark.parametrize("dataset", ["hmdb51", "jhmdb"])
def test_hmdb_style_splits(tmp_path, dataset, capsys):
    d = tmp_path / "splits"
    names = ["wave", "brush_hair", "kick_ball"]  # written unsorted: labels follow the sorted names
    for cls, split in itertools.product(names, (1, 2, 3)):
        write_crlf(d / f"{cls}_test_split{split}.txt", _hmdb_lines(cls, split))
    out = tmp_path / "lists"
    assert main([dataset, "--splits-dir", str(d), "--split", "2", "--out", str(out), "--val-fraction", "0.2"]) == 0
    lists, classes = read_out(out)
    assert classes == ["brush_hair", "kick_ball", "wave"]
    expected = {s: [] for s in ("1", "2", "0")}
    for label, cls in enumerate(classes):
        for line in _hmdb_lines(cls, 2):
            video, status = line.split()
            expected[status].append(ListEntry(f"{cls}/{video}", label))
    assert lists["test"] == expected["2"]
    assert sorted(lists["train"] + lists["val"], key=str) == sorted(expected["1"], key=str)
    used = {e.path for v in lists.values() for e in v}
    assert used.isdisjoint(e.path for e in expected["0"])  # 0 = unused in this split
    val_sources = {hmdb_source(e) for e in lists["val"]}
    assert val_sources and val_sources.isdisjoint(hmdb_source(e) for e in lists["train"])
    assert f"{len(expected['0'])} videos marked 0" in capsys.readouterr().out


def test_hmdb_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="_test_split1.txt"):
        parse_hmdb(tmp_path, 1)
    write_crlf(tmp_path / "run_test_split1.txt", ["a_run_u_nm_np1_fr_med_0.avi 3"])
    with pytest.raises(ValueError, match=r"run_test_split1.txt:1: expected '<video> <0\|1\|2>'"):
        parse_hmdb(tmp_path, 1)


# --------------------------------------------------------------------------------------------------- NTU
@pytest.fixture
def ntu_dir(tmp_path):
    d = tmp_path / "nturgb+d_rgb"
    for s, c, p, r, a in itertools.product((1, 2, 3, 18), (1, 2, 3), (1, 3, 8, 45), (1, 2), (1, 60, 61)):
        sub = d / ("part2" if s == 18 else "part1")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"S{s:03d}C{c:03d}P{p:03d}R{r:03d}A{a:03d}_rgb.avi").touch()
    (d / "part1" / "S001C001P001R001A001.skeleton").touch()  # other modality: not ours, ignored
    return d


def _ntu_fields(path):
    name = path.rsplit("/", 1)[-1]
    return {k: int(name[i + 1:i + 4]) for k, i in zip("SCPRA", range(0, 20, 4))}


@pytest.mark.parametrize("benchmark,protocol", [("ntu60", "cs"), ("ntu60", "cv"), ("ntu120", "cs"), ("ntu120", "cset")])
def test_ntu_protocols(ntu_dir, tmp_path, benchmark, protocol):
    out = tmp_path / "lists"
    assert main(["ntu", "--videos", str(ntu_dir), "--benchmark", benchmark, "--protocol", protocol,
                 "--out", str(out)]) == 0
    lists, classes = read_out(out)
    assert len(classes) == (60 if benchmark == "ntu60" else 120) and classes[0] == "drink water"
    all_entries = [e for v in lists.values() for e in v]
    if benchmark == "ntu60":
        assert all(_ntu_fields(e.path)["S"] <= 17 and _ntu_fields(e.path)["A"] <= 60 for e in all_entries)
        assert len(all_entries) == 3 * 3 * 4 * 2 * 2
    else:
        assert len(all_entries) == 4 * 3 * 4 * 2 * 3
    train_subjects = NTU60_TRAIN_SUBJECTS | ({45} if benchmark == "ntu120" else set())
    rule = {
        "cs": lambda f: f["P"] in train_subjects,
        "cv": lambda f: f["C"] in (2, 3),
        "cset": lambda f: f["S"] % 2 == 0,
    }[protocol]
    for name, entries in lists.items():
        for e in entries:
            f = _ntu_fields(e.path)
            assert e.label == f["A"] - 1
            assert rule(f) == (name != "test"), (name, e.path)
    performers = {name: {_ntu_fields(e.path)["P"] for e in v} for name, v in lists.items()}
    assert performers["val"] and performers["val"].isdisjoint(performers["train"])


def test_ntu_bad_names_and_protocols(ntu_dir, tmp_path, capsys):
    (ntu_dir / "S001C001P001_rgb.avi").touch()
    out = tmp_path / "lists"
    assert main(["ntu", "--videos", str(ntu_dir), "--out", str(out)]) == 3
    assert "S001C001P001_rgb.avi: name does not follow" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cv.*ntu60"):
        scan_ntu(ntu_dir, "ntu120", "cv")
    with pytest.raises(ValueError, match="cset.*ntu120"):
        scan_ntu(ntu_dir, "ntu60", "cset")
    with pytest.raises(FileNotFoundError, match="no NTU files"):
        scan_ntu(ntu_dir, "ntu60", "cs", suffix="_depth.avi")


# --------------------------------------------------------------------------------------------------- Kinetics
def test_kinetics_csvs(tmp_path, capsys):
    d = tmp_path / "k400"
    d.mkdir()
    (d / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\r\n"
        '"passing American football (in game)",abc-_1234567,10,20,train,0\r\n'
        "abseiling,zz_zzzzzzzz,0,10,train,1\r\n"
        "abseiling,yy_yyyyyyyy,125,135,train,0\r\n"
    )
    (d / "validate.csv").write_text(  # columns in another order: parsed by name
        "youtube_id,label,time_end,time_start,split\nvvvvvvvvvvv,abseiling,40,30,val\n"
    )
    (d / "test.csv").write_text("youtube_id,time_start,time_end,split\ntttttttttt1,5,15,test\n")
    out = tmp_path / "lists"
    assert main(["kinetics", "--csv-dir", str(d), "--out", str(out)]) == 0
    lists, classes = read_out(out)
    assert classes == ["abseiling", "passing American football (in game)"]
    assert lists["train"] == [
        ListEntry("train/abc-_1234567_000010_000020.mp4", 1),
        ListEntry("train/zz_zzzzzzzz_000000_000010.mp4", 0),
        ListEntry("train/yy_yyyyyyyy_000125_000135.mp4", 0),
    ]
    assert lists["val"] == [ListEntry("val/vvvvvvvvvvv_000030_000040.mp4", 0)]
    assert lists["test"] == [ListEntry("test/tttttttttt1_000005_000015.mp4", -1)]
    assert "1 unlabeled" in capsys.readouterr().out
    by_label = parse_kinetics(d, by_label=True)
    assert by_label.train[0].path == "train/passing American football (in game)/abc-_1234567_000010_000020.mp4"
    assert by_label.test[0].path == "test/tttttttttt1_000005_000015.mp4"
    (d / "validate.csv").write_text("label,youtube_id,start\nabseiling,x,1\n")
    with pytest.raises(ValueError, match=r"validate.csv: header .* lacks \['time_start', 'time_end'\]"):
        parse_kinetics(d)


# --------------------------------------------------------------------------------------------------- folder
def test_folder_tree(tmp_path, capsys):
    root = tmp_path / "videos"
    for cls in ("zebra", "Apple", "mango"):
        for k in range(10):
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / f"{cls}_s{k % 5}_{k}.mp4").touch()
        (root / cls / "notes.txt").touch()
    frames = root / "mango" / "mango_s9_frames"
    frames.mkdir()
    (frames / "img_00001.jpg").touch()
    out = tmp_path / "lists"
    assert main(["folder", "--root", str(root), "--out", str(out), "--test-fraction", "0.2",
                 "--val-fraction", "0.2"]) == 0
    lists, classes = read_out(out)
    assert classes == ["Apple", "mango", "zebra"]
    paths = [e.path for v in lists.values() for e in v]
    assert len(paths) == len(set(paths)) == 31 and "mango/mango_s9_frames" in paths
    for name, n in (("test", 2), ("val", 2)):  # stratified: each class gives its share
        assert np.bincount([e.label for e in lists[name]], minlength=3).tolist() == [n, n, n]
    assert "3 other files/folders" in capsys.readouterr().out
    # Named groups stay on one side and are shared across classes (s0..s4 here).
    grouped = scan_folder(root, test_fraction=0.2, seed=1, group_regex=r"_(s\d)_")
    key = lambda e: e.path.split("_")[1]  # noqa: E731
    assert {key(e) for e in grouped.test}.isdisjoint(key(e) for e in grouped.train)
    with pytest.raises(FileNotFoundError, match="class folder"):
        scan_folder(root / "zebra")
    # A bad regex is a usage error naming the option (a ValueError, so `eleatt prepare` prints one line).
    with pytest.raises(ValueError, match=r"--group-regex '_\(s' is not a valid regular expression"):
        scan_folder(root, group_regex=r"_(s")


# --------------------------------------------------------------------------------------------------- grouped holdout
def test_grouped_holdout_never_splits_a_group():
    rng = np.random.default_rng(0)
    entries = [ListEntry(f"v{i}_grp{rng.integers(40)}", int(rng.integers(5))) for i in range(400)]
    group_of = lambda e: e.path.split("_")[1]  # noqa: E731  (groups span classes)
    kept, held, info = grouped_holdout(entries, 0.25, seed=3, group_of=group_of)
    assert not info["stratified"] and 0 < info["held_groups"] < info["groups"] == 40
    assert {group_of(e) for e in kept}.isdisjoint(group_of(e) for e in held)
    assert sorted(kept + held, key=lambda e: e.path) == sorted(entries, key=lambda e: e.path)
    assert abs(len(held) - 100) <= 20  # whole groups of ~10: within about one group of the target
    assert [e for e in entries if e in held] == held  # list order kept
    assert grouped_holdout(entries, 0.25, seed=3, group_of=group_of)[1] == held
    assert grouped_holdout(entries, 0.0, seed=3, group_of=group_of)[1] == []
    with pytest.raises(ValueError, match="form 1 group"):
        grouped_holdout(entries, 0.1, seed=0, group_of=lambda e: "all")


def test_prepare_help_and_usage_errors(capsys):
    assert main(["--help"]) == 0
    for dataset in ("ucf101", "hmdb51", "jhmdb", "ntu", "kinetics", "folder", "synthetic"):
        assert main([dataset, "--help"]) == 0
        assert f"eleatt prepare {dataset}" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["ucf101", "--out", "x"]) == 2  # --splits-dir missing
    assert main(["ucf101", "--splits-dir", "x", "--out", "x", "--val-fraction", "1.5"]) == 2
    assert "--splits-dir" in capsys.readouterr().err
    assert splits.EXIT_INCOMPLETE == 3


def test_duplicates_and_train_test_overlap_are_reported(ucf_dir, tmp_path, capsys):
    train = (ucf_dir / "trainlist01.txt").read_text().splitlines()
    test = (ucf_dir / "testlist01.txt").read_text().splitlines()
    leaked = test[0].strip()
    write_crlf(ucf_dir / "trainlist01.txt", [*train, train[0].strip(), f"{leaked} 1"])
    out = tmp_path / "lists"
    assert main(["ucf101", "--splits-dir", str(ucf_dir), "--out", str(out), "--val-fraction", "0"]) == 3
    err = capsys.readouterr().err
    first = train[0].split()[0]
    assert f"{first}: listed twice in train (the same label); kept once" in err
    assert f"{leaked}: in both train and test; left out of train" in err
    lists, _ = read_out(out)
    paths = [e.path for e in lists["train"]]
    assert paths.count(first) == 1 and leaked not in paths and leaked in [e.path for e in lists["test"]]


def test_empty_or_mis_encoded_split_files_name_the_file(ucf_dir, tmp_path):
    (ucf_dir / "testlist01.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"split file '.*testlist01.txt' is empty; expected the official split"):
        parse_ucf101(ucf_dir, 1)
    (ucf_dir / "testlist01.txt").write_bytes("ApplyEyeMakeup/v_x.avi\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"testlist01.txt' is UTF-16 or UTF-32 text; expected UTF-8"):
        parse_ucf101(ucf_dir, 1)
