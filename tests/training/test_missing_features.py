"""Videos without features (their extraction failed): `--data.drop_missing true` leaves them out of the stream and
lists them; without it the run is refused with the reason of each and the fixes as commands that work as printed."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.features import FeatureFolder, FeatureSettings
from pipeline.data.lists import ListEntry, write_classes, write_list
from pipeline.training.feature_data import FeatureDataModule, MissingFeaturesError


def feature_folder(root, modality: str = "rgb", videos=("a/one.mp4", "a/two.mp4", "b/three.mp4")) -> FeatureFolder:
    folder = FeatureFolder(root / "features")
    extra = dict(stack=3, in_chans=6) if modality == "flow" else {}
    folder.check_settings(FeatureSettings(modality=modality, backbone="test_resnet", weights="none", dtype="float32",
                                          dim=2, **extra))
    for k, video in enumerate(videos):
        folder.write(video, np.full((4, 2), k, np.float32))
    return folder


def lists(root, entries: list[ListEntry]):
    write_list(root / "lists" / "train.txt", entries)
    write_list(root / "lists" / "test.txt", entries)
    write_classes(root / "lists" / "classes.txt", ["a", "b"])
    return root / "lists"


ENTRIES = [ListEntry("a/one.mp4", 0), ListEntry("a/gone.mp4", 0), ListEntry("a/two.mp4", 0),
           ListEntry("b/three.mp4", 1), ListEntry("b/never.mp4", 1)]


def test_missing_features_are_refused_with_their_reasons_and_fixes(tmp_path):
    folder = feature_folder(tmp_path)
    folder.record_failure("a/gone.mp4", "VideoReadError: a/gone.mp4: not a video FFmpeg can read")
    path = lists(tmp_path, ENTRIES)
    dm = FeatureDataModule(str(folder.root), test_list=str(path / "test.txt"))
    with pytest.raises(MissingFeaturesError) as err:
        dm.setup("test")
    message = str(err.value)
    assert f"2 of 5 videos of test_list '{path / 'test.txt'}' have no features in '{folder.root}'" in message
    assert f"{folder.root / 'a' / 'gone.npy'}  (extraction failed: VideoReadError: a/gone.mp4: not a video" in message
    assert f"{folder.root / 'b' / 'never.npy'}\n" in message  # never extracted: no reason recorded
    assert "add --data.drop_missing true to this command" in message and "eleatt prepare filter" in message
    assert (f"eleatt extract --list {path / 'test.txt'} --root VIDEOS --out {folder.root} --backbone test_resnet "
            "--weights none   (VIDEOS: the folder the list's paths start from)") in message


def test_drop_missing_leaves_them_out_and_lists_them(tmp_path, capsys):
    folder = feature_folder(tmp_path)
    folder.record_failure("a/gone.mp4", "VideoReadError: boom")
    path = lists(tmp_path, ENTRIES)
    dm = FeatureDataModule(str(folder.root), train_list=str(path / "train.txt"), test_list=str(path / "test.txt"),
                           normalize="standard", drop_missing=True)
    dm.setup("fit")
    dm.setup("test")
    kept = ["a/one.mp4", "a/two.mp4", "b/three.mp4"]
    assert [e.path for e in dm.datasets["train"].entries] == kept == [e.path for e in dm.datasets["test"].entries]
    assert dm.dropped == {"train_list": ["a/gone.mp4", "b/never.mp4"], "test_list": ["a/gone.mp4", "b/never.mp4"]}
    # the normaliser saw the kept videos only: values 0, 1, 2 (one per video, 4 steps each)
    mean = dm.normalizer.state_dict()["mean"]
    np.testing.assert_allclose(np.asarray(mean).ravel(), [1.0, 1.0], rtol=1e-5)
    dm.setup("test")  # a second evaluation (validate after fit): the list as left, said once
    assert [e.path for e in dm.entries("test_list")] == kept
    err = capsys.readouterr().err
    assert (f"note: train_list '{path / 'train.txt'}': left out 2 of 5 videos without features in '{folder.root}' "
            "(--data.drop_missing): a/gone.mp4 (VideoReadError: boom), b/never.mp4") in err
    assert err.count("note: test_list") == 1


def test_a_list_without_any_features_is_refused_even_with_drop_missing(tmp_path):
    folder = feature_folder(tmp_path, modality="flow")
    path = lists(tmp_path, [ListEntry("c/x.mp4", 0), ListEntry("c/y.mp4", 1)])
    dm = FeatureDataModule(str(folder.root), test_list=str(path / "test.txt"), drop_missing=True)
    with pytest.raises(MissingFeaturesError) as err:
        dm.setup("test")
    message = str(err.value)
    assert "2 of 2 videos" in message and "To go on, extract them first:" in message
    assert (f"eleatt extract --modality flow --stack 3 --list {path / 'test.txt'} --root FLOW_DIR --out {folder.root} "
            "--backbone test_resnet --weights none   (FLOW_DIR: the flow folder the features were made from)") in message
