"""The feature-folder format: atomic writes, manifests over shards, failures superseded, settings refused."""
import json

import numpy as np
import pytest

from pipeline.data.features import FeatureFolder, SettingsMismatchError, as_views, read_settings

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
