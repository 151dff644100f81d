"""FeatureSequenceDataset / FeatureDataModule on small generated feature folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.feature_data import FeatureDataModule, MissingFeaturesError
from pipeline.data.sequences import FeatureNormalizer, FeatureSequenceDataset, collate_sequences
from pipeline.data.features import FeatureFolder
from pipeline.data.lists import ListEntry, write_classes, write_list
from pipeline.data.sampling import sequence_indices


@pytest.fixture(scope="module")
def multiview(tmp_path_factory):
    """Three videos with 3 views each; step t of view v is the vector (v, t, t, ...) so samples can be traced."""
    root = tmp_path_factory.mktemp("multiview")
    folder = FeatureFolder(root / "features")
    folder.check_settings({"backbone": "trace", "views": "three", "dtype": "float32", "dim": 4})
    entries = []
    for k, length in enumerate([5, 12, 30]):
        t = np.arange(length, dtype=np.float32)
        feats = np.stack([np.stack([np.full(length, v, np.float32), t, t, t], 1) for v in range(3)])  # (3, T, 4)
        folder.write(f"c{k % 2}/v{k}.avi", feats)
        entries.append(ListEntry(f"c{k % 2}/v{k}.avi", k % 2))
    write_list(root / "lists" / "train.txt", entries)
    write_list(root / "lists" / "test.txt", entries + [ListEntry("c0/v0.avi", -1)])
    write_classes(root / "lists" / "classes.txt", ["zero", "one"])
    return root


def test_eval_samples_take_all_views_at_segment_centres(multiview):
    folder = FeatureFolder(multiview / "features")
    ds = FeatureSequenceDataset(folder, [ListEntry("c0/v2.avi", 0)], num_steps=8, train=False)
    sample = ds[0]
    assert sample["feats"].shape == (3, 8, 4) and sample["feats"].dtype == torch.float32
    expected_steps = sequence_indices(30, 8, train=False)
    np.testing.assert_array_equal(sample["feats"][:, :, 1].numpy(), np.tile(expected_steps, (3, 1)))
    np.testing.assert_array_equal(sample["feats"][:, 0, 0].numpy(), [0, 1, 2])  # views in order
    assert (sample["length"], sample["label"], sample["video"]) == (8, 0, "c0/v2.avi")
    again = ds[0]["feats"]
    torch.testing.assert_close(again, sample["feats"])  # deterministic


def test_train_samples_one_random_view_with_steps_in_order(multiview):
    folder = FeatureFolder(multiview / "features")
    ds = FeatureSequenceDataset(folder, [ListEntry("c0/v2.avi", 0)], num_steps=8, train=True)
    views, step_sets = set(), set()
    for _ in range(40):
        feats = ds[0]["feats"]  # (8, 4)
        assert feats.shape == (8, 4)
        assert len(set(feats[:, 0].tolist())) == 1  # one view per sample
        steps = feats[:, 1].numpy()
        assert (np.diff(steps) >= 0).all()  # one step per segment, order kept
        views.add(int(feats[0, 0]))
        step_sets.add(tuple(steps))
    assert views == {0, 1, 2} and len(step_sets) > 5
    torch.manual_seed(3)
    a = ds[0]["feats"]
    torch.manual_seed(3)
    torch.testing.assert_close(ds[0]["feats"], a)  # torch's seed decides the draw


def test_all_steps_are_padded_by_collate(multiview):
    folder = FeatureFolder(multiview / "features")
    entries = [ListEntry("c0/v0.avi", 0), ListEntry("c1/v1.avi", 1)]
    batch = collate_sequences([FeatureSequenceDataset(folder, entries, num_steps=0)[i] for i in range(2)])
    assert batch["feats"].shape == (2, 3, 12, 4)
    assert batch["lengths"].tolist() == [5, 12] and batch["labels"].tolist() == [0, 1]
    assert batch["videos"] == ["c0/v0.avi", "c1/v1.avi"]
    np.testing.assert_array_equal(batch["feats"][0, 0, :5, 1].numpy(), np.arange(5))
    assert not batch["feats"][0, :, 5:].any()  # zeros after the length
    short = FeatureSequenceDataset(folder, entries, num_steps=8)[0]["feats"]  # 5 steps asked as 8: repeats
    assert short.shape == (3, 8, 4) and (np.diff(short[0, :, 1].numpy()) >= 0).all()


def test_datamodule_links_sizes_and_serves_batches(multiview):
    dm = FeatureDataModule(
        str(multiview / "features"), train_list=str(multiview / "lists/train.txt"),
        test_list=str(multiview / "lists/test.txt"), num_steps=4, batch_size=2,
    )
    assert (dm.feature_dim, dm.num_classes, dm.class_names) == (4, 2, ["zero", "one"])
    assert dm.settings == FeatureFolder(multiview / "features").settings
    assert dm.extraction_settings == dm.settings.to_json()  # the plain-dict form linked into the model
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train["feats"].shape == (2, 4, 4) and set(train["labels"].tolist()) <= {0, 1}
    assert dm.val_dataloader() == []  # no val_list: fit without validation
    dm.setup("test")
    test = list(dm.test_dataloader())
    assert [b["feats"].shape[:3] for b in test] == [(2, 3, 4), (2, 3, 4)]
    assert [v for b in test for v in b["videos"]] == ["c0/v0.avi", "c1/v1.avi", "c0/v2.avi", "c0/v0.avi"]
    assert test[-1]["labels"].tolist() == [0, -1]  # unlabelled videos are served (scores, no metrics)
    with pytest.raises(ValueError, match="predict_list"):
        dm.setup("predict")


def test_hooks_and_normalisation(multiview):
    calls = []

    def hook(x):
        calls.append(tuple(x.shape))
        return x * 2

    dm = FeatureDataModule(str(multiview / "features"), train_list=str(multiview / "lists/train.txt"),
                           test_list=str(multiview / "lists/test.txt"), num_steps=0, normalize="standard",
                           train_transform=hook)
    dm.setup("fit")
    stats = dm.normalizer.state_dict()
    stored = np.concatenate([FeatureFolder(multiview / "features").load(f"c{k % 2}/v{k}.avi").reshape(-1, 4)
                             for k in range(3)])
    np.testing.assert_allclose(stats["mean"].numpy(), stored.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"].numpy(), stored.std(0), rtol=1e-5)
    x = dm.datasets["train"][2]["feats"]  # (30, 4), normalised then doubled by the hook
    assert calls == [(30, 4)]
    np.testing.assert_allclose(x[:, 1].numpy() / 2, (np.arange(30) - stored[:, 1].mean()) / stored[:, 1].std(), rtol=1e-4)

    fresh = FeatureNormalizer("standard")  # what a checkpoint restores
    fresh.load_state_dict(stats)
    torch.testing.assert_close(fresh(torch.ones(2, 4)), dm.normalizer(torch.ones(2, 4)))
    with pytest.raises(ValueError, match="normalize='l2'"):
        FeatureNormalizer("l2").load_state_dict(stats)
    with pytest.raises(ValueError, match="no statistics"):
        FeatureNormalizer("standard")(torch.ones(2, 4))
    torch.testing.assert_close(FeatureNormalizer("l2")(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))


def test_missing_features_are_listed_with_their_paths(multiview, tmp_path):
    write_list(tmp_path / "test.txt", [ListEntry("c0/v0.avi", 0), ListEntry("c1/gone.avi", 1), ListEntry("c1/lost.avi", 1)])
    write_classes(tmp_path / "classes.txt", ["zero", "one"])
    dm = FeatureDataModule(str(multiview / "features"), test_list=str(tmp_path / "test.txt"))
    with pytest.raises(MissingFeaturesError) as err:
        dm.setup("test")
    message = str(err.value)
    assert "2 of 3 videos" in message and "eleatt extract" in message
    assert str(multiview / "features" / "c1" / "gone.npy") in message and "lost.npy" in message


def test_bad_inputs_are_refused_clearly(multiview, tmp_path):
    features = str(multiview / "features")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FeatureDataModule(str(tmp_path / "nowhere"), train_list=str(multiview / "lists/train.txt"))
    write_list(tmp_path / "train.txt", [ListEntry("c0/v0.avi", 5)])
    write_classes(tmp_path / "classes.txt", ["zero", "one"])
    dm = FeatureDataModule(features, train_list=str(tmp_path / "train.txt"))
    with pytest.raises(ValueError, match="label 5 but classes.txt names 2"):
        dm.setup("fit")
    write_list(tmp_path / "train.txt", [ListEntry("c0/v0.avi", -1)])
    with pytest.raises(ValueError, match="without a label"):
        FeatureDataModule(features, train_list=str(tmp_path / "train.txt")).setup("fit")
