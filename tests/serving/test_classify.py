"""`eleatt classify` and `pipeline.classify`, on the run the quick demo makes (prepare -> extract -> fit -> test)."""
import json

import numpy as np
import pytest
import torch

from pipeline.data.features import FeatureFolder
from pipeline.data.lists import read_list
from pipeline.serving.classify import VideoClassifier, classify, main
from pipeline.evaluation.scores import read_scores


@pytest.fixture(scope="module")
def demo_run(quick_demo):
    """The quick demo (conftest's session fixture, shared with the report tests); returns (data folder, run folder)."""
    return quick_demo["data"], quick_demo["run"]


def test_demo_writes_every_stage(demo_run):
    data, run = demo_run
    for name in ("best.ckpt", "last.ckpt", "scores_test.npz", "confusion_test.png"):
        assert (run / name).is_file(), name
    scores = read_scores(run / "scores_test.npz")
    assert list(scores["videos"]) == [e.path for e in read_list(data / "test.txt")]


def test_classify_agrees_with_test_scores(demo_run):
    data, run = demo_run
    scores = read_scores(run / "scores_test.npz")
    tests = read_list(data / "test.txt")
    predictions = classify([data / e.path for e in tests], run / "best.ckpt", topk=3, device="cpu")
    for entry, pred, row in zip(tests, predictions, scores["scores"]):
        assert pred.ok, pred.error
        assert pred.labels[0] == int(row.argmax()), entry.path
        np.testing.assert_allclose(pred.scores, row, atol=2e-3, err_msg=entry.path)
        assert pred.names[0] == str(scores["classes"][pred.labels[0]])
        assert pred.probs == sorted(pred.probs, reverse=True) and len(pred.names) == 3


def test_cli_reports_unreadable_video_and_goes_on(demo_run, tmp_path, capsys):
    data, run = demo_run
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    good = data / read_list(data / "test.txt")[0].path
    from pipeline.data.video import close_readers
    from tests.data.test_decode_guard import children

    close_readers()
    before = set(children())  # the demo's processes (a forkserver), not the command's
    code = main([str(good), str(bad), "--ckpt", str(run / "best.ckpt"), "--json", "--topk", "2"])
    assert code == 3
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["video"] == str(good) and len(lines[0]["topk"]) == 2
    assert lines[1]["video"] == str(bad) and "broken.mp4" in lines[1]["error"]
    assert "1 of 2 videos could not be classified" in err
    assert set(children()) <= before  # the command stopped its decoding process


def test_table_output(demo_run, capsys):
    data, run = demo_run
    good = data / read_list(data / "test.txt")[0].path
    assert main([str(good), "--ckpt", str(run / "best.ckpt"), "--topk", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(good) and out[1].lstrip().startswith("1. ") and out[2].lstrip().startswith("2. ")


def test_checkpoint_without_settings_is_refused(demo_run, tmp_path):
    _, run = demo_run
    checkpoint = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    checkpoint["eleatt_stream"]["features"] = None
    stripped = tmp_path / "old.ckpt"
    torch.save(checkpoint, stripped)
    with pytest.raises(ValueError, match="does not record the feature extraction settings"):
        VideoClassifier(stripped, device="cpu")


def test_missing_recorded_weights_name_the_flag(demo_run, tmp_path):
    _, run = demo_run
    checkpoint = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    checkpoint["eleatt_stream"]["features"]["weights"] = str(tmp_path / "gone.safetensors")
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    with pytest.raises(FileNotFoundError, match="--weights"):
        VideoClassifier(moved, device="cpu")
    # the flag supplies them: here, the same (seeded random) weights the features were made with
    assert VideoClassifier(moved, weights="none", device="cpu").encoder.weights == "none"


def test_unreadable_checkpoint_and_bad_device_are_one_line_errors(demo_run, tmp_path, capsys):
    """Through `eleatt classify`: exit 2 and one line naming the file or the flag, no traceback."""
    from pipeline.cli import main as eleatt

    data, run = demo_run
    video = str(data / read_list(data / "test.txt")[0].path)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint\n")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run / "best.ckpt").read_bytes()[:1000])
    for ckpt in (garbage, truncated):
        assert eleatt(["classify", video, "--ckpt", str(ckpt), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"checkpoint '{ckpt}' cannot be loaded" in err and len(err.strip().splitlines()) == 1
    assert eleatt(["classify", video, "--ckpt", str(run / "best.ckpt"), "--device", "bogus"]) == 2
    assert "--device 'bogus'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert eleatt(["classify", video, "--ckpt", str(run / "best.ckpt"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_demo_rerun_with_another_dataset_does_not_reuse_stale_features(tmp_path, monkeypatch, capsys):
    """The demo regenerates its videos each run: features of the videos of an earlier run (other seed or sizes)
    in the same --out must not be skipped as finished."""
    import pipeline.training.cli
    from pipeline.demo import main as demo_main

    monkeypatch.setattr(pipeline.training.cli, "main", lambda argv: 7)  # stop after extraction
    out = tmp_path / "demo"
    for seed in ("0", "1"):
        assert demo_main(["--quick", "--videos-per-class", "3", "--out", str(out), "--seed", seed]) == 7
        printed = capsys.readouterr().out
        assert "flow: 30 done, 0 skipped, 0 failed of 30 videos" in printed
        assert printed.count("extract: 30 done, 0 skipped, 0 failed of 30 videos") == 2  # RGB and flow
    assert demo_main(["--quick", "--videos-per-class", "3", "--out", str(out), "--seed", "1"]) == 7
    printed = capsys.readouterr().out
    assert printed.count("extract: 0 done, 30 skipped") == 2 and "flow: 0 done, 30 skipped" in printed  # resumed


@pytest.fixture(scope="module")
def second_run(demo_run):
    """Another RGB stream on the demo's features (other seed and size), trained and tested like the demo's run."""
    from pipeline.demo import CONFIG, TRAINING
    from pipeline.training.cli import main as lightning_main

    data, run = demo_run
    features = next((run.parents[2] / "features").glob("rgb-*"))  # <out>/checkpoints/<session>/rgb -> <out>
    common = ["--config", str(CONFIG), "--data.features_dir", str(features), "--data.train_list",
              str(data / "train.txt"), "--data.val_list", str(data / "val.txt"), "--data.test_list",
              str(data / "test.txt"), "--data.num_workers", "0", "--trainer.default_root_dir", str(run.parent),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--seed_everything", "1", "--model.hidden_size", "16", *TRAINING]
    assert lightning_main(["fit", *common, "--run_name", "second", "--trainer.max_epochs", "3"]) == 0
    second = run.parent / "second"
    assert lightning_main(["test", *common, "--ckpt_path", str(second / "best.ckpt")]) == 0
    return second


def test_two_checkpoints_give_what_test_and_fuse_give(demo_run, second_run, tmp_path, capsys):
    """classify with two streams' checkpoints = `test` of each + `eleatt fuse` of their scores (within 2e-3)."""
    from pipeline.cli import main as eleatt

    data, run = demo_run
    tests = read_list(data / "test.txt")
    ckpts = [run / "best.ckpt", second_run / "best.ckpt"]
    fused = {}
    for mode, weights in (("prob", []), ("logit", ["--weights", "1", "0.5"])):
        assert eleatt(["fuse", "--scores", str(run / "scores_test.npz"), str(second_run / "scores_test.npz"),
                       "--out", str(tmp_path / f"{mode}.npz"), "--mode", mode, "--no-plot", *weights]) == 0
        fused[mode] = read_scores(tmp_path / f"{mode}.npz")
        assert list(fused[mode]["videos"]) == [e.path for e in tests]
    # four test videos (each is encoded once per stream), the default fusion (1 : 1.5 of probabilities)
    picks = list(range(0, len(tests), max(1, len(tests) // 4)))[:4]
    predictions = classify([data / tests[i].path for i in picks], ckpts, topk=2, device="cpu")
    for i, pred in zip(picks, predictions):
        entry, row = tests[i], fused["prob"]["scores"][i]
        assert pred.ok, pred.error
        np.testing.assert_allclose(pred.scores, row, atol=2e-3, err_msg=entry.path)
        assert pred.labels[0] == int(row.argmax()) and len(pred.names) == 2
    alone = read_scores(run / "scores_test.npz")["scores"]
    assert np.abs(fused["prob"]["scores"] - alone).max() > 1e-3  # the streams differ: the fusion is neither

    # the command line, log-probabilities 1 : 0.5: with two checkpoints, --weights are the streams' weights
    capsys.readouterr()
    assert main([str(data / tests[0].path), "--ckpt", *map(str, ckpts), "--weights", "1", "0.5", "--mode", "logit",
                 "--json", "--topk", "3", "--device", "cpu"]) == 0
    top = json.loads(capsys.readouterr().out)["topk"]
    row = fused["logit"]["scores"][0]
    assert [t["label"] for t in top] == list(np.argsort(-row, kind="stable")[:3])
    np.testing.assert_allclose([t["prob"] for t in top], np.sort(row)[::-1][:3], atol=2e-3)


def test_two_checkpoint_refusals(demo_run, second_run, tmp_path, capsys):
    from pipeline.cli import main as eleatt

    data, run = demo_run
    video = str(data / read_list(data / "test.txt")[0].path)
    checkpoint = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    flow = json.loads(json.dumps(checkpoint["eleatt_stream"]["features"]))
    flow["modality"] = "flow"
    checkpoint["eleatt_stream"]["features"] = flow
    torch.save(checkpoint, tmp_path / "flow.ckpt")  # a flow stream's settings without how its flow was computed
    assert eleatt(["classify", video, "--ckpt", str(run / "best.ckpt"), str(tmp_path / "flow.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flow.ckpt" in err and "flow options" in err
    with pytest.raises(ValueError, match="eleatt extract --modality flow"):
        classify(video, [run / "best.ckpt", tmp_path / "flow.ckpt"], device="cpu")

    renamed = torch.load(second_run / "best.ckpt", map_location="cpu", weights_only=True)
    names = list(renamed["eleatt_stream"]["class_names"])
    renamed["eleatt_stream"]["class_names"] = [names[1], names[0], *names[2:]]
    torch.save(renamed, tmp_path / "renamed.ckpt")
    with pytest.raises(ValueError, match=f"class 0 is '{names[0]}' in .* but '{names[1]}' in .*renamed.ckpt"):
        classify(video, [run / "best.ckpt", tmp_path / "renamed.ckpt"], device="cpu")

    for argv, message in (
        ([video, "--ckpt", str(run / "best.ckpt"), "--weights", "1", "2"], "need two or more checkpoints"),
        ([video, "--ckpt", str(run / "best.ckpt"), str(second_run / "best.ckpt"), "--weights", "1"],
         "1 weights given for 2 streams"),
        ([video, "--ckpt", str(run / "best.ckpt"), str(second_run / "best.ckpt"), "--weights", "a", "b"],
         "give numbers"),
    ):
        assert eleatt(["classify", *argv, "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as stop:  # videos after --ckpt are taken as checkpoints: say where they go
        main(["--ckpt", str(run / "best.ckpt"), video])
    assert stop.value.code == 2 and "name the videos before --ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("era", ["data_state", "lightning_keys"])
def test_a_checkpoint_written_before_the_record_classifies_the_same(demo_run, tmp_path, era):
    """Checkpoints written the old ways keep loading: no trained-stream record; the data state under our earlier
    `data_state` key, or (older still) only under Lightning's own keys, with settings without `format`."""
    from pipeline.data.features import FeatureSettings

    data, run = demo_run
    checkpoint = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    record = checkpoint.pop("eleatt_stream")
    assert record["format"] == 1 and set(record["normalizer"]) == {"mode", "mean", "std"}
    state = {"normalizer": record["normalizer"], "num_steps": record["num_steps"]}
    new = checkpoint["hyper_parameters"]["extraction_settings"]
    if era == "data_state":
        checkpoint["data_state"] = state
    else:
        checkpoint["FeatureDataModule"] = {"normalizer": state["normalizer"]}
        checkpoint["datamodule_hyper_parameters"]["num_steps"] = state["num_steps"]
        old_keys = ("backbone", "weights", "data_config", "input_size", "sampling", "views", "modality", "dtype",
                    "dim", "precision")
        checkpoint["hyper_parameters"]["extraction_settings"] = {k: new[k] for k in old_keys}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    video = data / read_list(data / "test.txt")[0].path
    then, now = VideoClassifier(old, device="cpu"), VideoClassifier(run / "best.ckpt", device="cpu")
    assert then.settings == now.settings == FeatureSettings.from_json(new)
    assert then.num_steps == now.num_steps and then.normalizer.mode == now.normalizer.mode
    assert then.class_names == now.class_names
    for key in ("mean", "std"):
        a, b = then.normalizer.state_dict()[key], now.normalizer.state_dict()[key]
        assert (a is None and b is None) or torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    np.testing.assert_array_equal(then(video).scores, now(video).scores)


def test_classify_makes_exactly_the_stored_features(demo_run):
    """extract and classify share the path (data/frames.video_views + FrameEncoder.encode_stored): equal bits."""
    from pipeline.data.features import FeatureFolder, as_views

    data, run = demo_run
    (features,) = [p for p in (data.parent / "features").glob("rgb-*") if (p / "settings.json").is_file()]
    folder = FeatureFolder(features)
    model = VideoClassifier(run / "best.ckpt", device="cpu")
    assert model.settings == folder.settings
    for entry in read_list(data / "test.txt")[:2]:
        stored = as_views(folder.load(entry.path)).astype(np.float32)  # (V, T, D)
        np.testing.assert_array_equal(model.features(data / entry.path).numpy(), stored)


@pytest.fixture(scope="module")
def flow_run(quick_demo):
    """The quick demo's flow stream: `eleatt flow` -> `extract --modality flow` -> fit -> validate/test."""
    return quick_demo["flow_run"]


def test_flow_checkpoint_gives_what_test_gives(demo_run, flow_run):
    """classify with a flow-stream checkpoint computes each video's flow as `eleatt flow` does and gives the
    probabilities `test` gives on the features `extract --modality flow` made (within 2e-3)."""
    from pipeline.demo import QUICK

    data, _ = demo_run
    scores = read_scores(flow_run / "scores_test.npz")
    tests = read_list(data / "test.txt")
    picks = list(range(0, len(tests), max(1, len(tests) // 3)))[:3]
    model = VideoClassifier(flow_run / "best.ckpt", device="cpu")
    assert model.settings.modality == "flow" and model.flow.short_side is None and model.settings.stack == QUICK["stack"]
    (stored,) = [FeatureFolder(p) for p in (data.parent / "features").glob(f"flow{QUICK['stack']}-*")]
    for i in picks:
        pred = model(data / tests[i].path, topk=3)
        assert pred.ok, pred.error
        assert np.ptp(scores["scores"][i]) > 0.02  # the streams' probabilities are not flat: the check means something
        np.testing.assert_allclose(pred.scores, scores["scores"][i], atol=2e-3, err_msg=tests[i].path)
        assert pred.labels[0] == int(scores["scores"][i].argmax())
    # the features themselves: the recomputed flow gives the stored flow stream's features
    feats = model.features(data / tests[picks[0]].path)  # (1, T, D)
    np.testing.assert_allclose(feats[0].numpy(), stored.load(tests[picks[0]].path).astype(np.float32), atol=1e-3)


def test_rgb_and_flow_checkpoints_give_what_test_and_fuse_give(demo_run, flow_run, tmp_path, capsys):
    from pipeline.cli import main as eleatt

    data, run = demo_run
    tests = read_list(data / "test.txt")
    assert eleatt(["fuse", "--scores", str(run / "scores_test.npz"), str(flow_run / "scores_test.npz"),
                   "--out", str(tmp_path / "fused.npz"), "--no-plot"]) == 0
    fused = read_scores(tmp_path / "fused.npz")
    assert list(fused["videos"]) == [e.path for e in tests]
    capsys.readouterr()
    i = len(tests) // 2
    assert main([str(data / tests[i].path), "--ckpt", str(run / "best.ckpt"), str(flow_run / "best.ckpt"),
                 "--json", "--topk", "3", "--device", "cpu"]) == 0
    top = json.loads(capsys.readouterr().out)["topk"]
    row = fused["scores"][i]  # 1 : 1.5, RGB : flow, as TSN
    assert [t["label"] for t in top] == list(np.argsort(-row, kind="stable")[:3])
    np.testing.assert_allclose([t["prob"] for t in top], np.sort(row)[::-1][:3], atol=2e-3)
