"""FeatureSettings: the typed, versioned settings.json; folders and checkpoints written before it keep loading."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.features import (
    SETTINGS_FORMAT, FeatureFolder, FeatureSettings, SettingsFormatError, SettingsMismatchError, read_settings,
)
from pipeline.data.sampling import Sampling

CONFIG = {"input_size": (3, 160, 160), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
          "crop_pct": 0.95, "interpolation": "bilinear", "crop_mode": "center"}
# settings.json exactly as `eleatt extract` wrote it before the format version
OLD = {"backbone": "test_resnet", "weights": "/w/test_resnet.safetensors", "data_config": {**CONFIG,
       "input_size": [3, 160, 160], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
       "input_size": [3, 160, 160], "sampling": {"mode": "fps", "fps": 6.0, "num_segments": None}, "views": "three",
       "modality": "rgb", "dtype": "float16", "dim": 96, "precision": "32"}
NEW = FeatureSettings(modality="rgb", backbone="test_resnet", weights="/w/test_resnet.safetensors",
                      data_config=CONFIG, in_chans=3, sampling=Sampling(fps=6), views="three", dim=96)


def test_round_trip_with_format_version(tmp_path):
    folder = FeatureFolder(tmp_path)
    assert folder.check_settings(NEW) == NEW
    raw = json.loads((tmp_path / "settings.json").read_text())
    assert raw["format"] == SETTINGS_FORMAT and raw["input_size"] == [3, 160, 160] and raw["in_chans"] == 3
    assert raw["sampling"] == {"mode": "fps", "fps": 6, "num_segments": None}
    assert read_settings(tmp_path) == NEW and FeatureSettings.from_json(NEW.to_json()) == NEW
    assert NEW.num_views == 3 and NEW.input_size == (3, 160, 160)


def test_a_folder_written_the_old_way_keeps_loading_and_resuming(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps(OLD))
    folder = FeatureFolder(tmp_path)
    assert folder.settings == NEW
    assert folder.check_settings(NEW) == NEW  # the same extraction asked again today: accepted
    assert json.loads((tmp_path / "settings.json").read_text()) == OLD  # and the file is left as it was
    with pytest.raises(SettingsMismatchError) as info:
        folder.check_settings(NEW.replace(views="ten", sampling=Sampling(num_segments=8)))
    message = str(info.value)
    assert "views: stored 'three', asked 'ten'" in message and "sampling: stored" in message
    assert "dim" not in message and "backbone" not in message  # only the fields that differ
    folder.write("a.mp4", np.ones((3, 2, 96), np.float32))
    assert folder.load("a.mp4").dtype == np.float16


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.pop("views"), "missing keys ['views']"),
    (lambda d: d.update(colour="red"), "unknown keys ['colour']"),
    (lambda d: d.update(format=99), "format 99"),
    (lambda d: d.update(dtype="int8"), "dtype 'int8'"),
    (lambda d: d.update(sampling={"mode": "sometimes"}), "sampling mode 'sometimes'"),
])
def test_bad_settings_files_name_the_file_and_the_key(tmp_path, edit, words):
    raw = NEW.to_json()
    edit(raw)
    (tmp_path / "settings.json").write_text(json.dumps(raw))
    with pytest.raises(SettingsFormatError) as info:
        FeatureFolder(tmp_path).settings
    assert str(tmp_path / "settings.json") in str(info.value) and words in str(info.value)


def test_an_old_file_with_an_unknown_key_is_refused_too(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({**OLD, "typo_key": 1}))
    with pytest.raises(SettingsFormatError, match="unknown keys \\['typo_key'\\]"):
        read_settings(tmp_path)


def test_modality_specific_fields_and_no_backbone():
    flow = NEW.replace(modality="flow", in_chans=10, stack=5, options={"bound": 20.0},
                       data_config={**CONFIG, "input_size": (10, 160, 160)})
    assert FeatureSettings.from_json(flow.to_json()) == flow
    skeleton = FeatureSettings(modality="skeleton", backbone=None, weights="none", dtype="float32", dim=150)
    assert FeatureSettings.from_json(skeleton.to_json()) == skeleton and skeleton.input_size is None
    with pytest.raises(SettingsFormatError, match="modality 'audio'"):
        FeatureSettings(modality="audio")


@pytest.mark.parametrize("views, count", [("center", 1), ("three", 3), ("ten", 10)])
def test_views_per_frame_are_the_crops_eval_views_makes(views, count):
    """The views name -> crops per frame (checked without torch by the settings; the transforms make the crops)."""
    import dataclasses

    import torch

    from pipeline.data.transforms import eval_views

    assert dataclasses.replace(NEW, views=views).num_views == count
    frames = torch.randint(0, 256, (2, 180, 200, 3), dtype=torch.uint8)
    assert eval_views(frames, CONFIG, views).shape[:2] == (count, 2)
