"""The EleAttClassifier module and the `eleatt fit|validate|test|predict` command line on a generated feature set
whose classes differ only in temporal order."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.lists import ListEntry, read_list, write_list
from pipeline.training.module import EleAttClassifier, load_classifier
from pipeline.evaluation.scores import accuracy_summary, read_scores, write_scores
from pipeline.training.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def data_args(features: Path, lists: Path) -> list[str]:
    return ["--data.features_dir", str(features), "--data.train_list", str(lists / "train.txt"),
            "--data.val_list", str(lists / "val.txt"), "--data.test_list", str(lists / "test.txt")]


def fit(root: Path, name: str, features: Path, lists: Path, *extra: str) -> Path:
    argv = ["fit", "--config", TINY, *data_args(features, lists), "--trainer.default_root_dir", str(root),
            "--run_name", name, *extra]
    assert main(argv) == 0
    return root / name


def printed(stage: str, out: str) -> dict[str, float]:
    line = re.search(rf"^{stage}: top1 .*$", out, re.M).group(0)
    return {k: float(v) for k, v in re.findall(r"(top\d|mca) ([\d.]+)", line)}


@pytest.fixture(scope="module")
def trained(order_features, tmp_path_factory):
    """One run fitted for 12 epochs on the learnable labels."""
    root = tmp_path_factory.mktemp("runs")
    run = fit(root, "order", order_features["features"], order_features["lists"], "--trainer.max_epochs", "12")
    return run


def test_order_blind_features_cannot_separate_the_classes(order_features):
    # The premise of the learnability test: the mean feature of a video says nothing about its class.
    from pipeline.data.features import FeatureFolder

    folder = FeatureFolder(order_features["features"])

    def means(split):
        entries = read_list(order_features["lists"] / f"{split}.txt")
        return np.stack([folder.load(e.path).astype(np.float32).mean(0) for e in entries]), np.array([e.label for e in entries])

    (xtr, ytr), (xte, yte) = means("train"), means("test")
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(4)])
    nearest = np.argmin(((xte[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (nearest == yte).mean() < 0.5


def test_fit_then_test_learns_temporal_order(trained, order_features, capfd):
    files = {p.name for p in trained.iterdir()}
    assert {"best.ckpt", "last.ckpt", "config.yaml", "metrics.csv"} <= files
    capfd.readouterr()
    # The one run through the real entry point: `python -m pipeline test`.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "test", "--config", TINY,
         *data_args(order_features["features"], order_features["lists"]), "--ckpt_path", str(trained / "best.ckpt")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    shown = printed("test", result.stdout)
    assert shown["top1"] >= 0.9 and shown["mca"] >= 0.9 and shown["top4"] == 1.0
    assert f"scores: {trained / 'scores_test.npz'}" in result.stdout
    assert f"confusion matrix: {trained / 'confusion_test.png'}" in result.stdout
    assert (trained / "confusion_test.png").stat().st_size > 1000

    # The scores file agrees with the printed metrics and follows DESIGN's format.
    scores = read_scores(trained / "scores_test.npz")
    entries = read_list(order_features["lists"] / "test.txt")
    assert scores["videos"].dtype.kind == "U" and list(scores["videos"]) == [e.path for e in entries]
    assert scores["scores"].dtype == np.float32 and scores["scores"].shape == (32, 4)
    np.testing.assert_allclose(scores["scores"].sum(1), 1.0, atol=1e-5)
    assert scores["labels"].dtype == np.int64 and list(scores["labels"]) == [e.label for e in entries]
    assert list(scores["classes"]) == ["order_012", "order_021", "order_102", "order_120"]
    recomputed = accuracy_summary(scores["scores"], scores["labels"])
    assert abs(recomputed["top1"] - shown["top1"]) < 1e-4 and abs(recomputed["mca"] - shown["mca"]) < 1e-4
    assert (scores["scores"].argmax(1) == scores["labels"]).mean() == pytest.approx(shown["top1"], abs=1e-4)


def test_shuffled_labels_stay_near_chance(order_features, tmp_path, capsys):
    run = fit(tmp_path, "shuffled", order_features["features"], order_features["shuffled"], "--trainer.max_epochs", "12")
    capsys.readouterr()
    argv = ["test", "--config", TINY, *data_args(order_features["features"], order_features["shuffled"]),
            "--ckpt_path", str(run / "best.ckpt")]
    assert main(argv) == 0
    top1 = printed("test", capsys.readouterr().out)["top1"]
    assert top1 <= 0.5  # chance is 0.25 on 32 videos


def test_checkpoint_is_weights_only_and_records_what_classify_needs(trained, order_features):
    checkpoint = torch.load(trained / "best.ckpt", map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["class_names"] == ["order_012", "order_021", "order_102", "order_120"]
    from pipeline.data.features import FeatureFolder, FeatureSettings

    recorded = FeatureSettings.from_json(hparams["extraction_settings"])  # a plain dict in the checkpoint
    assert recorded == FeatureFolder(order_features["features"]).settings
    assert (hparams["input_size"], hparams["num_classes"], hparams["hidden_size"]) == (8, 4, 32)
    model = load_classifier(trained / "best.ckpt")
    assert not model.training and model.hparams.class_names == hparams["class_names"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, checkpoint["state_dict"][key])


def test_validate_and_predict_write_into_the_checkpoint_folder(trained, order_features, tmp_path, capsys):
    config_before = (trained / "config.yaml").read_text()
    common = ["--config", TINY, *data_args(order_features["features"], order_features["lists"]),
              "--ckpt_path", str(trained / "best.ckpt")]
    assert main(["validate", *common]) == 0
    out = capsys.readouterr().out
    val = read_scores(trained / "scores_val.npz")
    assert abs(accuracy_summary(val["scores"], val["labels"])["top1"] - printed("val", out)["top1"]) < 1e-4
    assert (trained / "confusion_val.png").is_file()
    assert (trained / "config.yaml").read_text() == config_before  # evaluations never rewrite the run's config

    # Unlabelled videos get scores but count in no metric.
    entries = read_list(order_features["lists"] / "test.txt")
    mixed = [ListEntry(e.path, -1 if i % 2 else e.label) for i, e in enumerate(entries)]
    write_list(tmp_path / "predict.txt", mixed)
    assert main(["predict", *common, "--data.predict_list", str(tmp_path / "predict.txt")]) == 0
    out = capsys.readouterr().out
    pred = read_scores(trained / "scores_predict.npz")
    assert list(pred["videos"]) == [e.path for e in mixed] and list(pred["labels"]) == [e.label for e in mixed]
    test = read_scores(trained / "scores_test.npz")
    np.testing.assert_allclose(pred["scores"], test["scores"], atol=1e-6)  # same videos, same model, same scores
    assert "(16 labelled)" in out
    labelled = pred["labels"] >= 0
    expected = (pred["scores"][labelled].argmax(1) == pred["labels"][labelled]).mean()
    assert printed("predict", out)["top1"] == pytest.approx(expected, abs=1e-4)


def test_resume_from_last_checkpoint_matches_an_uninterrupted_run(order_features, tmp_path):
    args = (order_features["features"], order_features["lists"])
    full = fit(tmp_path, "full", *args, "--trainer.max_epochs", "4")
    half = fit(tmp_path, "half", *args, "--trainer.max_epochs", "2")
    assert torch.load(half / "last.ckpt", weights_only=True)["epoch"] == 1
    argv = ["fit", "--config", TINY, *data_args(*args), "--trainer.max_epochs", "4",
            "--ckpt_path", str(half / "last.ckpt")]
    assert main(argv) == 0  # resumes into the checkpoint's own folder
    resumed = torch.load(half / "last.ckpt", weights_only=True)
    expected = torch.load(full / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 3
    assert resumed["global_step"] == expected["global_step"]
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, atol=1e-5, rtol=1e-4)
    # A fresh fit into a folder that already holds a run is refused (resume it, or pick another name).
    assert main(["fit", "--config", TINY, *data_args(*args), "--trainer.default_root_dir", str(tmp_path),
                 "--run_name", "half"]) == 2


def test_bad_inputs_give_one_line_and_exit_2(trained, order_features, tmp_path, capsys):
    assert main(["test", "--config", TINY, *data_args(order_features["features"], order_features["lists"]),
                 "--ckpt_path", str(tmp_path / "nope.ckpt")]) == 2
    assert "nope.ckpt' not found" in capsys.readouterr().err
    write_list(tmp_path / "test.txt", [ListEntry("order_012/absent.mp4", 0)])
    (tmp_path / "classes.txt").write_text((order_features["lists"] / "classes.txt").read_text())
    argv = ["test", "--config", TINY, "--data.features_dir", str(order_features["features"]),
            "--data.train_list", str(order_features["lists"] / "train.txt"), "--data.test_list",
            str(tmp_path / "test.txt"), "--trainer.default_root_dir", str(tmp_path), "--run_name", "t"]
    assert main(argv) == 2  # no --ckpt_path: scoring a random model is refused
    assert "`test` needs --ckpt_path" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.ckpt").write_bytes((trained / "best.ckpt").read_bytes())
    assert main([*argv, "--ckpt_path", str(tmp_path / "run" / "best.ckpt")]) == 2
    assert str(order_features["features"] / "order_012" / "absent.npy") in capsys.readouterr().err
    assert main(["fit", "--config", TINY, "--model.cell", "transformer"]) == 2


@pytest.mark.parametrize("content", ["text", "state_dict", "truncated", "garbage"])
def test_a_file_that_is_no_checkpoint_gives_one_line(order_features, tmp_path, capsys, content):
    bad = tmp_path / "model.ckpt"
    if content == "text":
        bad.write_text("not a checkpoint\n")
    elif content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "pytorch-lightning_version": "2.6.6"}, bad)
        bad.write_bytes(bad.read_bytes()[:2000])  # a copy cut short
    elif content == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(3000))
    else:
        torch.save({"weight": torch.zeros(3)}, bad)  # a bare state dict, no Lightning keys
    argv = ["test", "--config", TINY, *data_args(order_features["features"], order_features["lists"]),
            "--ckpt_path", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{bad}'" in err and "eleatt fit" in err


def test_evaluating_on_features_of_another_dimension_is_refused(trained, order_features, tmp_path, capsys):
    from pipeline.data.features import FeatureFolder

    folder = FeatureFolder(tmp_path / "features16")
    folder.check_settings({"backbone": "synthetic", "weights": "none", "views": "center", "modality": "rgb",
                           "dtype": "float16", "dim": 16})
    entries = read_list(order_features["lists"] / "test.txt")[:4]
    for e in entries:
        folder.write(e.path, np.zeros((10, 16), np.float32))
    write_list(tmp_path / "test.txt", entries)
    (tmp_path / "classes.txt").write_text((order_features["lists"] / "classes.txt").read_text())
    argv = ["test", "--config", TINY, "--data.features_dir", str(tmp_path / "features16"), "--data.test_list",
            str(tmp_path / "test.txt"), "--ckpt_path", str(trained / "best.ckpt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trained with input_size=8 but the data gives input_size=16" in err and "Traceback" not in err


def test_views_are_averaged_as_probabilities_before_metrics():
    torch.manual_seed(0)
    model = EleAttClassifier(input_size=3, num_classes=4, hidden_size=8, dropout=0.0).eval()
    feats = torch.randn(2, 3, 5, 3)  # (B, V, T, D)
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        probs = model.video_probs(feats, lengths)
        per_view = torch.stack([model(feats[:, v], lengths).softmax(-1) for v in range(3)], 1)  # (B, V, C)
    torch.testing.assert_close(probs, per_view.mean(1))


def test_accuracy_summary_and_scores_round_trip(tmp_path):
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]], np.float32)
    labels = np.array([0, 1, 1, -1])
    summary = accuracy_summary(scores, labels)
    assert summary == pytest.approx({"top1": 1 / 3, "top3": 1.0, "mca": 0.5})  # class 0: 1/1, class 1: 0/2
    assert accuracy_summary(scores, np.full(4, -1)) is None
    path = write_scores(tmp_path / "scores_test.npz", ["a b.mp4", "c", "d", "e"], scores, labels, None)
    back = read_scores(path)
    assert set(back) == {"videos", "scores", "labels"} and back["videos"][0] == "a b.mp4"
    np.testing.assert_array_equal(back["scores"], scores)


def test_standard_normalisation_travels_in_the_checkpoint(order_features, tmp_path, capsys):
    args = data_args(order_features["features"], order_features["lists"])
    run = fit(tmp_path, "std", order_features["features"], order_features["lists"], "--trainer.max_epochs", "1",
              "--data.normalize", "standard", "--data.num_steps", "0")
    stats = torch.load(run / "last.ckpt", weights_only=True)["eleatt_stream"]["normalizer"]
    assert stats["mode"] == "standard" and stats["mean"].shape == (8,)
    test = ["test", "--config", TINY, *args, "--data.num_steps", "0", "--ckpt_path", str(run / "last.ckpt")]
    assert main([*test, "--data.normalize", "standard"]) == 0
    scores = read_scores(run / "scores_test.npz")
    # The same numbers by hand: stored features, the checkpoint's statistics, the model alone.
    from pipeline.data.features import FeatureFolder

    feats = torch.from_numpy(FeatureFolder(order_features["features"]).load(str(scores["videos"][0])).astype(np.float32))
    model = load_classifier(run / "last.ckpt")
    with torch.no_grad():
        probs = model(((feats - stats["mean"]) / stats["std"])[None]).softmax(-1)[0]
    np.testing.assert_allclose(scores["scores"][0], probs.numpy(), atol=1e-5)
    capsys.readouterr()
    assert main(test) == 2  # evaluated without the normalisation it was trained with: refused, with the fix
    assert "--data.normalize standard" in capsys.readouterr().err


def test_evaluating_on_other_classes_is_refused(trained, order_features, tmp_path, capsys):
    for name in ("test.txt", "val.txt"):
        (tmp_path / name).write_text((order_features["lists"] / name).read_text())
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    argv = ["test", "--config", TINY, "--data.features_dir", str(order_features["features"]), "--data.train_list",
            str(tmp_path / "val.txt"), "--data.val_list", str(tmp_path / "val.txt"), "--data.test_list",
            str(tmp_path / "test.txt"), "--ckpt_path", str(trained / "best.ckpt")]
    assert main(argv) == 2
    assert "trained on classes ['order_012'" in capsys.readouterr().err


def test_two_process_test_gathers_every_video_once(trained, order_features, tmp_path):
    """`eleatt test` under DDP (2 CPU processes, gloo) writes the same scores file as one process: every video of
    the list once, in list order, although the distributed sampler pads an odd list with a repeated video."""
    odd = tmp_path / "lists"
    entries = read_list(order_features["lists"] / "test.txt")[:-1]  # 31 videos: shares of 16 and 15 (+1 repeat)
    # The repeated video (the first) gets a wrong label, so counting it twice would change the metrics.
    entries[0] = ListEntry(entries[0].path, (entries[0].label + 1) % 4)
    write_list(odd / "test.txt", entries)
    (odd / "classes.txt").write_text((order_features["lists"] / "classes.txt").read_text())
    runs = {}
    for name, extra in (("one", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2"])):
        (tmp_path / name).mkdir()
        ckpt = tmp_path / name / "best.ckpt"
        ckpt.write_bytes((trained / "best.ckpt").read_bytes())
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "test", "--config", TINY, "--data.features_dir",
             str(order_features["features"]), "--data.test_list", str(odd / "test.txt"), "--data.eval_batch_size",
             "4", "--ckpt_path", str(ckpt), *extra],
            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=180,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_scores(tmp_path / name / "scores_test.npz")
        # The printed metrics are those of the scores file: each video once.
        expected = accuracy_summary(runs[name]["scores"], runs[name]["labels"])
        assert printed("test", result.stdout) == pytest.approx(expected, abs=5e-5)
    assert list(runs["ddp"]["videos"]) == [e.path for e in entries]
    np.testing.assert_array_equal(runs["ddp"]["labels"], runs["one"]["labels"])
    np.testing.assert_allclose(runs["ddp"]["scores"], runs["one"]["scores"], atol=1e-5)


# -- non-finite training values stop `fit` --------------------------------------------------------------------------
def _fit_until_poisoned(tmp_path, poison):
    """Fits a tiny EleAttClassifier for 3 epochs of 2 batches, with best/last checkpoints after every epoch;
    `poison(model, flag)` installs something that turns bad while flag["on"], which is set from epoch 1 on (after
    epoch 0's checkpoints). Returns (model, the error raised by fit, the checkpoint files)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from pipeline.training.module import NonFiniteError

    torch.manual_seed(0)
    model = EleAttClassifier(input_size=3, num_classes=3, hidden_size=8, dropout=0.0)
    batches = [{"feats": torch.randn(4, 6, 3), "lengths": torch.tensor([6, 5, 4, 6]),
                "labels": torch.tensor([0, 1, 2, 0]), "videos": [f"c/v{b}{i}.mp4" for i in range(4)]}
               for b in range(2)]
    flag = {"on": False}
    poison(model, flag)

    class Poison(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            flag["on"] = trainer.current_epoch >= 1

    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[Poison(), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(model, loader)
    return model, str(info.value), sorted(tmp_path.glob("*.ckpt"))


def _check_nothing_non_finite_was_stepped_or_saved(model, ckpts):
    assert ckpts and [p.name for p in ckpts if p.name == "last.ckpt"] == ["last.ckpt"]
    for path in ckpts:
        saved = torch.load(path, weights_only=True, map_location="cpu")
        assert saved["epoch"] == 0 and saved["global_step"] == 2  # epoch 0's, never one of the poisoned epoch
        assert all(bool(torch.isfinite(v).all()) for v in saved["state_dict"].values() if v.is_floating_point())
    # the poisoned step was not taken: the weights are still those of epoch 0's last checkpoint
    last = torch.load(ckpts[-1].parent / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, last[key], rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_gradient_of_a_finite_loss_stops_fit(tmp_path, value):
    def poison(model, flag):  # the loss stays finite; the head's gradient overflows
        model.net.head.weight.register_hook(lambda g: torch.full_like(g, value) if flag["on"] else g)

    model, message, ckpts = _fit_until_poisoned(tmp_path, poison)
    assert message.startswith("the gradients are not finite in epoch 1, step 2 (batch videos: c/v00.mp4, c/v01.mp4, "
                               "c/v02.mp4, c/v03.mp4)")
    assert "--trainer.gradient_clip_val" in message
    _check_nothing_non_finite_was_stepped_or_saved(model, ckpts)


def test_an_infinite_loss_stops_fit(tmp_path):
    def poison(model, flag):  # class 0 gets logit -inf: the videos labelled 0 lose +inf, so the mean is +inf
        def hook(module, args, logits):
            if not flag["on"]:
                return logits
            logits = logits.clone()
            logits[:, 0] = float("-inf")
            return logits
        model.net.register_forward_hook(hook)

    model, message, ckpts = _fit_until_poisoned(tmp_path, poison)
    assert message.startswith("the training loss is inf in epoch 1, step 2 (batch videos: c/v00.mp4")
    _check_nothing_non_finite_was_stepped_or_saved(model, ckpts)
