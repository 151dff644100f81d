"""The feature-folder format: atomic writes, manifests over shards, failures superseded, settings refused."""
import json

import numpy as np
import pytest

from pipeline.data.features import (
    FeatureFileError, FeatureFolder, FolderLockedError, SettingsMismatchError, as_views, read_settings,
)

SETTINGS = {"backbone": "test_resnet", "weights": "none", "input_size": (3, 32, 32), "views": "center"}


def test_write_load_and_manifest(tmp_path):
    folder = FeatureFolder(tmp_path / "f")
    folder.check_settings(SETTINGS)
    feats = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    record = folder.write("ClassA/v_1.avi", feats, fps=25.0)
    assert record == {"video": "ClassA/v_1.avi", "feature": "ClassA/v_1.npy", "frames": 7, "dim": 5, "views": 1,
                      "fps": 25.0}
    loaded = folder.load("ClassA/v_1.avi")
    assert loaded.dtype == np.float16 and loaded.shape == (7, 5)
    np.testing.assert_allclose(loaded, feats, atol=1e-2)
    three = np.ones((3, 4, 5), np.float32)
    assert folder.write("raw/folder_2", three)["views"] == 3
    assert as_views(folder.load("ClassA/v_1.avi")).shape == (1, 7, 5)
    assert set(folder.finished()) == {"ClassA/v_1.avi", "raw/folder_2"}
    assert folder.missing(["ClassA/v_1.avi", "B/none.avi"]) == ["B/none.avi"]
    assert not list((tmp_path / "f").rglob("*.tmp.npy"))


def test_settings_mismatch_names_the_key(tmp_path):
    FeatureFolder(tmp_path).check_settings(SETTINGS)
    FeatureFolder(tmp_path).check_settings(dict(SETTINGS))  # same settings (tuple vs list): accepted
    with pytest.raises(SettingsMismatchError, match="backbone: stored 'test_resnet', asked 'resnet50'"):
        FeatureFolder(tmp_path).check_settings({**SETTINGS, "backbone": "resnet50"})
    assert read_settings(tmp_path).backbone == "test_resnet"
    with pytest.raises(FileNotFoundError, match="not a feature folder"):
        read_settings(tmp_path / "empty")


def test_shards_failures_and_torn_lines(tmp_path):
    r0, r1 = FeatureFolder(tmp_path, rank=0), FeatureFolder(tmp_path, rank=1)
    r0.check_settings(SETTINGS)
    r1.check_settings(SETTINGS)
    r0.write("a.mp4", np.zeros((2, 3)))
    r1.record_failure("b.mp4", ValueError("truncated"))
    r1.record_failure("c.mp4", "bad header")
    assert FeatureFolder(tmp_path).failed() == {"b.mp4": "ValueError: truncated", "c.mp4": "bad header"}
    # A kill tore the last line of a shard: the torn record is ignored, the next append stays readable.
    with open(tmp_path / "manifest.rank0.jsonl", "a") as f:
        f.write('{"video": "torn.mp4", "feat')
    FeatureFolder(tmp_path, rank=0).write("b.mp4", np.zeros((2, 3)))  # a later success supersedes the failure
    folder = FeatureFolder(tmp_path)
    assert set(folder.finished()) == {"a.mp4", "b.mp4"}
    assert folder.failed() == {"c.mp4": "bad header"}
    # a record whose file is gone is not finished
    (tmp_path / "a.npy").unlink()
    assert set(folder.finished()) == {"b.mp4"}
    assert "a.mp4" in folder.finished(verify=False)
    # ... and when its redo fails, the failure is reported (not hidden behind the old record)
    FeatureFolder(tmp_path, rank=1).record_failure("a.mp4", "VideoReadError: now truncated")
    assert folder.failed() == {"a.mp4": "VideoReadError: now truncated", "c.mp4": "bad header"}


def test_missing_file_error_names_the_failure(tmp_path):
    folder = FeatureFolder(tmp_path)
    folder.record_failure("x/y.avi", "VideoReadError: moov atom not found")
    with pytest.raises(FileNotFoundError, match="moov atom not found"):
        folder.load("x/y.avi")


def test_bad_paths_and_overflow(tmp_path):
    folder = FeatureFolder(tmp_path)
    for bad in ("../escape.mp4", "/abs.mp4"):
        with pytest.raises(ValueError, match="relative"):
            folder.feature_path(bad)
    with pytest.raises(ValueError, match="not finite"):
        folder.write("big.mp4", np.full((2, 2), 1e6))
    assert not folder.manifest_path.exists()


def test_float32_settings_store_float32(tmp_path):
    folder = FeatureFolder(tmp_path)
    folder.check_settings({"modality": "skeleton", "dtype": "float32"})
    folder.write("s.skeleton", np.full((2, 3, 4), 1e6, np.float32))
    assert folder.load("s.skeleton").dtype == np.float32
    assert json.loads(folder.manifest_path.read_text())["views"] == 2


# --- damaged files, temporaries, the lock ------------------------------------------------------------------------
def _folder_with(tmp_path, arrays: dict):
    folder = FeatureFolder(tmp_path / "f")
    folder.check_settings({"backbone": "x", "dim": 4})
    for video, array in arrays.items():
        folder.write(video, array)
    return folder


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "cannot be read"),
    (lambda p: p.write_bytes(b"\x00garbage" * 20), "cannot be read"),
    (lambda p: np.save(p, np.zeros((5, 3), np.float16)), "feature dimension 3 but the folder's settings say 4"),
    (lambda p: np.save(p, np.zeros((0, 4), np.float16)), "has zero frames"),
    (lambda p: np.save(p, np.full((5, 4), np.nan, np.float16)), "holds 20 non-finite values"),
])
def test_a_damaged_feature_file_is_named_and_redone(tmp_path, damage, message):
    folder = _folder_with(tmp_path, {"a/v1.mp4": np.ones((5, 4)), "a/v2.mp4": np.ones((5, 4))})
    assert set(folder.finished()) == {"a/v1.mp4", "a/v2.mp4"}
    path = folder.feature_path("a/v1.mp4")
    damage(path)
    with pytest.raises(FeatureFileError, match=message) as err:
        folder.load("a/v1.mp4", mmap=True)
    assert f"'{path}'" in str(err.value) and "re-extract" in str(err.value) and "\n" not in str(err.value)
    if message != "holds 20 non-finite values":  # the header is whole: only loading the data finds NaN
        assert set(folder.finished()) == {"a/v2.mp4"}  # a rerun of extract redoes it


def test_non_finite_features_stop_a_batch_naming_the_file(tmp_path):
    from pipeline.data.sequences import FeatureSequenceDataset
    from pipeline.data.lists import ListEntry

    folder = _folder_with(tmp_path, {"ok.mp4": np.ones((5, 4))})
    bad = folder.feature_path("bad.mp4")
    np.save(bad, np.array([[1, 2, np.inf, 4]] * 5, np.float16))
    dataset = FeatureSequenceDataset(folder, [ListEntry("ok.mp4", 0), ListEntry("bad.mp4", 1)], 3, train=True)
    assert dataset[0]["feats"].shape == (3, 4)
    with pytest.raises(FeatureFileError, match=r"bad\.npy' of 'bad\.mp4' holds 5 non-finite"):
        dataset[1]


def test_temporaries_live_in_their_own_folder(tmp_path):
    folder = _folder_with(tmp_path, {"clip.mp4": np.ones((2, 4))})
    lookalikes = [folder.root / ".clip.abc.tmp.npy", folder.root / "clip.tmp.npy", folder.root / ".eleatt-tmp.npy"]
    for path in lookalikes:
        path.write_bytes(b"the user's")
    (folder.root / ".eleatt-tmp" / "left.part").write_bytes(b"killed writer")
    assert folder.remove_stale_temporaries() == 1
    assert all(p.read_bytes() == b"the user's" for p in lookalikes)
    assert list((folder.root / ".eleatt-tmp").iterdir()) == []
    with pytest.raises(ValueError, match="temporary folder"):
        folder.feature_path(".eleatt-tmp/x.mp4")


def test_the_lock_refuses_a_second_writer_and_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    folder = FeatureFolder(tmp_path / "f")
    with folder.lock("extract"):
        with pytest.raises(FolderLockedError, match=r"is being written by `eleatt extract` \(pid \d+ on "):
            with FeatureFolder(tmp_path / "f").lock("flow"):
                pass
    with folder.lock("flow"):  # released on exit
        pass
    # A process that dies holding the lock (SIGKILL: no clean-up runs) leaves nothing stale behind.
    code = ("import os, signal, sys; from pipeline.data.features import FeatureFolder; "
            "FeatureFolder(sys.argv[1]).lock('extract').__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code, str(folder.root)]).returncode == -9
    assert "pid" in (folder.root / ".eleatt-lock").read_text()
    with folder.lock("extract"):
        pass
