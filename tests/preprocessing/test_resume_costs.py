"""What a resume costs: `extract` checks each finished file once per run; `flow` skips an untouched finished file from
its manifest record (size and modification time) without opening it, and fully checks any other."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.data.features import FeatureFolder
from pipeline.data.flow_files import FlowFolder, FlowOptions, flow_folder_settings
from preprocessing import extract as extractmod
from preprocessing import flow as flowmod
from preprocessing.synthetic import write_lossless_video


def _count_whole(monkeypatch, cls) -> list[str]:
    """Patches `cls._whole` to record the video of each check it makes."""
    calls: list[str] = []
    real = cls._whole

    def counted(self, record):
        calls.append(record["video"])
        return real(self, record)

    monkeypatch.setattr(cls, "_whole", counted)
    return calls


# ------------------------------------------------------------------------------------------------ extract
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(path))
    return path


def test_an_extract_rerun_checks_each_finished_file_once(synthetic_dataset, weights, tmp_path, monkeypatch,
                                                         capsys):
    lines = (synthetic_dataset / "train.txt").read_text().splitlines()
    videos = [line.rsplit(maxsplit=1)[0] for line in lines if line.strip()][:4]
    out = tmp_path / "features"

    def run(names: list[str]) -> int:
        (tmp_path / "list.txt").write_text("".join(f"{v} 0\n" for v in names))
        return extractmod.main(["--list", str(tmp_path / "list.txt"), "--root", str(synthetic_dataset), "--out",
                                str(out), "--backbone", "test_resnet", "--weights", str(weights), "--device", "cpu",
                                "--workers", "0", "--no-progress"])

    assert run(videos[:3]) == 0
    FeatureFolder(out).record_failure("gone/elsewhere.mp4", "VideoReadError: earlier")  # failed.jsonl not empty
    capsys.readouterr()
    calls = _count_whole(monkeypatch, FeatureFolder)
    assert run(videos[:3]) == 0  # nothing left to do
    assert "0 done, 3 skipped, 0 failed of 3 videos" in capsys.readouterr().out
    assert sorted(calls) == sorted(videos[:3])  # once each (before: 3 passes, 9 checks)
    calls.clear()
    assert run(videos) == 0  # one new video: the 3 before the run, and the new one once after it
    assert "1 done, 3 skipped, 0 failed of 4 videos" in capsys.readouterr().out
    assert sorted(calls) == sorted(videos)


def test_finished_with_known_records_checks_only_the_others(tmp_path, monkeypatch):
    folder = FeatureFolder(tmp_path / "f")
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        folder.write(name, np.ones((2, 4), np.float32))
    calls = _count_whole(monkeypatch, FeatureFolder)
    before = folder.finished()
    assert sorted(calls) == ["a.mp4", "b.mp4", "c.mp4"]
    calls.clear()
    folder.write("d.mp4", np.ones((3, 4), np.float32))
    folder.write("a.mp4", np.ones((5, 4), np.float32))  # a new record for a: checked again
    after = folder.finished(known=before)
    assert sorted(calls) == ["a.mp4", "d.mp4"] and after["a.mp4"]["frames"] == 5 and len(after) == 4
    calls.clear()
    folder.record_failure("e.mp4", "broken")
    assert folder.failed(finished=after) == {"e.mp4": "broken"} and calls == []


# ------------------------------------------------------------------------------------------------ flow
def _levels(pairs: int = 4) -> np.ndarray:
    return np.random.default_rng(pairs).integers(0, 256, size=(pairs, 2, 12, 10), dtype=np.uint8)


def _count_zip_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = zipfile.ZipFile

    def counted(file, *args, **kwargs):
        opened.append(os.path.basename(str(getattr(file, "name", file))))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", counted)
    return opened


def test_a_flow_record_notes_the_files_size_and_time(tmp_path):
    folder = FlowFolder(tmp_path / "flow")
    record = folder.write_quantized("a.mp4", _levels(), 20.0, bytes=1, mtime_ns=2)  # extras cannot override them
    stat = (tmp_path / "flow" / "a.flow.zip").stat()
    assert (record["bytes"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    assert record["bytes"] > 4 * 2 * 12 * 10  # the four PNGs are in it
    assert json.loads(folder.manifest_path.read_text())["mtime_ns"] == stat.st_mtime_ns


def test_an_untouched_flow_file_is_not_opened_on_resume_and_a_touched_one_is_checked(tmp_path, monkeypatch):
    folder = FlowFolder(tmp_path / "flow")
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        folder.write_quantized(name, _levels(), 20.0)
    opened = _count_zip_opens(monkeypatch)
    assert set(folder.finished()) == {"a.mp4", "b.mp4", "c.mp4", "d.mp4"}
    assert opened == []  # a stat per file, no zip read

    b, c, d = (tmp_path / "flow" / f"{n}.flow.zip" for n in "bcd")
    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched, still whole: checked, kept
    c.write_bytes(c.read_bytes()[:-30])  # truncated: checked, redone
    data = d.read_bytes()
    d.write_bytes(bytes(len(data)))  # overwritten at the same size (a new time): checked, redone
    os.utime(d, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert set(folder.finished()) == {"a.mp4", "b.mp4"}
    assert sorted(opened) == ["b.flow.zip", "c.flow.zip", "d.flow.zip"]

    # Records written before the size and time were noted: each gets the full check.
    lines = [json.loads(line) for line in folder.manifest_path.read_text().splitlines()]
    folder.manifest_path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("bytes", "mtime_ns")})
                                            + "\n" for r in lines))
    opened.clear()
    assert set(folder.finished()) == {"a.mp4", "b.mp4"} and sorted(opened) == ["a.flow.zip", "b.flow.zip",
                                                                             "c.flow.zip", "d.flow.zip"]


@pytest.mark.parametrize("bad", [{"bytes": True}, {"mtime_ns": "1"}, {"pairs": 0}, {"pairs": "4"}])
def test_a_record_with_odd_size_or_time_fields_gets_the_full_check(tmp_path, monkeypatch, bad):
    folder = FlowFolder(tmp_path / "flow")
    record = folder.write_quantized("a.mp4", _levels(), 20.0)
    folder.manifest_path.write_text(json.dumps({**record, **bad}) + "\n")
    opened = _count_zip_opens(monkeypatch)
    finished = folder.finished()
    assert opened == ["a.flow.zip"]
    assert set(finished) == (set() if "pairs" in bad else {"a.mp4"})


def test_a_flow_rerun_with_nothing_to_do_opens_no_flow_file(tmp_path, monkeypatch, capsys):
    root = tmp_path / "videos"
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 40, 3), dtype=np.uint8)
    for name in ("a.mp4", "b.mp4"):
        write_lossless_video(root / name, frames)
    (root / "list.txt").write_text("a.mp4 0\nb.mp4 0\n")
    args = ["--list", str(root / "list.txt"), "--root", str(root), "--out", str(tmp_path / "flow"), "--short-side",
            "0", "--workers", "1", "--no-progress"]
    assert flowmod.main(args) == 0
    capsys.readouterr()
    opened = _count_zip_opens(monkeypatch)
    assert flowmod.main(args) == 0
    assert "flow: 0 done, 2 skipped, 0 failed of 2 videos" in capsys.readouterr().out
    assert opened == []


# ------------------------------------------------------------------------------------------------ manifest passes
def test_a_pass_over_the_manifest_resolves_each_folder_once_not_each_file(tmp_path, monkeypatch):
    folder = FeatureFolder(tmp_path / "f")
    names = [f"c{i % 3}/v{i}.mp4" for i in range(30)]
    for name in names:
        folder.write(name, np.ones((1, 2), np.float32))
    resolved: list[str] = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: resolved.append(str(p)) or real(p, *a, **k))
    assert set(folder.finished()) == set(names)
    assert len(resolved) == 4  # the root and the 3 folders
    resolved.clear()
    assert set(folder.finished(verify=False)) == set(names) and len(resolved) == 4


def test_a_folder_linked_out_of_the_feature_folder_is_not_finished(tmp_path):
    folder = FeatureFolder(tmp_path / "f")
    for name in ("in/a.mp4", "out/b.mp4", "alias/c.mp4"):
        folder.write(name, np.ones((1, 2), np.float32))
    outside = tmp_path / "outside"
    (tmp_path / "f" / "out").rename(outside)  # b's folder now lies outside, reached through a link
    (tmp_path / "f" / "out").symlink_to(outside, target_is_directory=True)
    (tmp_path / "f" / "alias").rename(tmp_path / "f" / "real")
    (tmp_path / "f" / "alias").symlink_to(tmp_path / "f" / "real", target_is_directory=True)  # inside: fine
    (tmp_path / "f" / "in" / "dangling.npy").symlink_to(tmp_path / "nowhere.npy")
    with open(folder.manifest_path, "a") as f:
        f.write(json.dumps({"video": "in/dangling.mp4", "feature": "in/dangling.npy"}) + "\n")
    assert set(folder.finished()) == {"in/a.mp4", "alias/c.mp4"}
    assert set(folder.finished(verify=False)) == {"in/a.mp4", "alias/c.mp4"}
    # nothing is cached from one pass to the next: a folder linked out since is seen
    (tmp_path / "f" / "in").rename(tmp_path / "elsewhere")
    (tmp_path / "f" / "in").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert set(folder.finished()) == {"alias/c.mp4"}


def test_the_resume_benchmark_puts_the_sizes_side_by_side(capsys):
    from pipeline.benchmarks import resume

    assert resume.main(["--sizes", "30", "90", "--reference-up-to", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-2:] == ["30", "90"]
    table = {line[:32].strip(): line[32:].split() for line in out[1:5]}
    assert list(table) == ["flow check", "flow full check (reference)", "extract check", "manifest pass"]
    assert table["flow full check (reference)"][1] == "-"  # measured up to 30 only
    assert float(table["flow full check (reference)"][0]) > 3 * float(table["flow check"][0])  # 250 pairs a zip
    assert out[5].startswith("flow resume: the full check takes") and out[6].startswith("at 90 videos:")


def test_the_resume_table_from_known_figures():
    from pipeline.benchmarks.resume import format_table

    rows = {10_000: {"flow check": 2e-5, "flow full check (reference)": 6e-4, "extract check": 3e-5,
                     "manifest pass": 1e-5},
            1000: {"flow check": 1e-5, "flow full check (reference)": 4e-4, "extract check": 4e-5, "manifest pass": 1e-5},
            100_000: {"flow check": 1.5e-5, "extract check": 2.5e-5, "manifest pass": 0.5e-5}}
    assert format_table(rows) == [
        "us per finished video                  1,000      10,000     100,000",
        "flow check                              10.0        20.0        15.0",
        "flow full check (reference)            400.0       600.0           -",
        "extract check                           40.0        30.0        25.0",
        "manifest pass                           10.0        10.0         5.0",
        "flow resume: the full check takes 30-40x the stat check (250 pairs a file)",
        "at 100,000 videos: flow resume 1.5 s, extract resume 2.5 s",
    ]
