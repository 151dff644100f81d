"""Training start-up reads no feature file in full (issue 32): setup reads no values, the first batch reads the
sampled steps of memory-mapped files, and the non-finite check covers exactly the steps a sample returns."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.features import FeatureFileError, FeatureFolder
from pipeline.data.lists import ListEntry, write_classes, write_list
from pipeline.data.sampling import sequence_indices
from pipeline.data.sequences import FeatureSequenceDataset
from pipeline.training.feature_data import FeatureDataModule

T, D, VIDEOS = 200, 16, 12


@pytest.fixture
def folder(tmp_path):
    folder = FeatureFolder(tmp_path / "features")
    folder.check_settings({"backbone": "trace", "dtype": "float16", "dim": D})
    entries = []
    for i in range(VIDEOS):
        folder.write(f"c{i % 2}/v{i}.mp4", np.full((T, D), i, np.float32))
        entries.append(ListEntry(f"c{i % 2}/v{i}.mp4", i % 2))
    write_list(tmp_path / "train.txt", entries)
    write_classes(tmp_path / "classes.txt", ["a", "b"])
    return folder


def test_setup_and_the_first_batch_read_no_file_in_full(folder, tmp_path, monkeypatch):
    loads, checked = [], []
    real_load, real_check = np.load, FeatureFolder.check_finite
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(k.get("mmap_mode")) or real_load(*a, **k))
    monkeypatch.setattr(FeatureFolder, "check_finite",
                        lambda self, video, values: checked.append(tuple(values.shape)) or real_check(self, video, values))
    data = FeatureDataModule(str(folder.root), train_list=str(tmp_path / "train.txt"), num_steps=4, batch_size=4)
    data.setup("fit")
    assert (loads, checked) == ([], [])  # setup: names and sizes only, no values
    batch = next(iter(data.train_dataloader()))
    assert batch["feats"].shape == (4, 4, D)
    assert loads == ["r"] * 4  # one memory map per sample: no full read (mmap_mode None) at all
    assert checked == [(4, D)] * 4  # the non-finite check saw the 4 steps of each sample, not the 200 of a file


def test_a_nan_step_is_refused_when_a_sample_reads_it_naming_the_file(folder):
    bad = folder.feature_path("c0/v0.mp4")
    array = np.load(bad)
    centres = sequence_indices(T, 4, train=False)  # the steps an evaluation sample takes
    array[centres[2], 5] = np.nan
    array[centres[2] + 1, :2] = np.inf  # not read by the sample, but counted in the message
    np.save(bad, array)
    dataset = FeatureSequenceDataset(folder, [ListEntry("c0/v0.mp4", 0), ListEntry("c1/v1.mp4", 1)], 4)
    assert dataset[1]["feats"].shape == (1, 4, D)
    with pytest.raises(FeatureFileError, match=r"v0\.npy' of 'c0/v0\.mp4' holds 3 non-finite values") as err:
        dataset[0]
    assert "re-extract" in str(err.value) and "\n" not in str(err.value)
    # steps the sample does not read never reach the model: a sample of 2 steps misses them and goes through
    array[:] = 1
    array[1, 0] = np.nan
    np.save(bad, array)
    short = FeatureSequenceDataset(folder, [ListEntry("c0/v0.mp4", 0)], 2)
    assert 1 not in sequence_indices(T, 2, train=False)
    assert short[0]["feats"].isfinite().all()


def test_the_feature_dimension_of_a_folder_without_settings_comes_from_a_header(tmp_path, monkeypatch):
    folder = FeatureFolder(tmp_path / "features")
    for i in range(3):
        folder.write(f"c/v{i}.mp4", np.full((T, 7), i, np.float32))
    write_list(tmp_path / "train.txt", [ListEntry(f"c/v{i}.mp4", i % 2) for i in range(3)])
    write_classes(tmp_path / "classes.txt", ["a", "b"])
    loads, checked = [], []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(k.get("mmap_mode")) or real_load(*a, **k))
    monkeypatch.setattr(FeatureFolder, "check_finite", lambda self, video, values: checked.append(video))
    data = FeatureDataModule(str(folder.root), train_list=str(tmp_path / "train.txt"))
    assert data.feature_dim == 7 and loads == ["r"] and checked == []  # a memory map of one file, values unread


@pytest.mark.parametrize("mmap", [True, False])
def test_a_header_claiming_more_than_the_file_holds_is_refused_before_reading(folder, mmap):
    path = folder.feature_path("c0/v0.mp4")
    header = np.lib.format.header_data_from_array_1_0(np.zeros((2**20, D), np.float16))
    with open(path, "wb") as f:  # a (1M, 16) float16 header over 64 bytes of data
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    with pytest.raises(FeatureFileError, match=r"header describes a float16 array of shape \(1048576, 16\)"):
        folder.load("c0/v0.mp4", mmap=mmap, finite=False)
