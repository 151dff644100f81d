"""`eleatt classify` and `pipeline.classify`, on the run the quick demo makes (prepare -> extract -> fit -> test)."""
import json

import numpy as np
import pytest
import torch

from pipeline.data.lists import read_list
from pipeline.inference import VideoClassifier, classify, main
from pipeline.scores import read_scores


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
    code = main([str(good), str(bad), "--ckpt", str(run / "best.ckpt"), "--json", "--topk", "2"])
    assert code == 3
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["video"] == str(good) and len(lines[0]["topk"]) == 2
    assert lines[1]["video"] == str(bad) and "broken.mp4" in lines[1]["error"]
    assert "1 of 2 videos could not be classified" in err


def test_table_output(demo_run, capsys):
    data, run = demo_run
    good = data / read_list(data / "test.txt")[0].path
    assert main([str(good), "--ckpt", str(run / "best.ckpt"), "--topk", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(good) and out[1].lstrip().startswith("1. ") and out[2].lstrip().startswith("2. ")


def test_checkpoint_without_settings_is_refused(demo_run, tmp_path):
    _, run = demo_run
    checkpoint = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["extraction_settings"] = None
    stripped = tmp_path / "old.ckpt"
    torch.save(checkpoint, stripped)
    with pytest.raises(ValueError, match="does not record the feature extraction settings"):
        VideoClassifier(stripped, device="cpu")


def test_missing_recorded_weights_name_the_flag(demo_run, tmp_path):
    _, run = demo_run
    checkpoint = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["extraction_settings"]["weights"] = str(tmp_path / "gone.safetensors")
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
    import pipeline.lit_cli
    from pipeline.demo import main as demo_main

    monkeypatch.setattr(pipeline.lit_cli, "main", lambda argv: 7)  # stop after extraction
    out = tmp_path / "demo"
    for seed in ("0", "1"):
        assert demo_main(["--quick", "--videos-per-class", "3", "--out", str(out), "--seed", seed]) == 7
        assert "extract: 30 done, 0 skipped, 0 failed of 30 videos" in capsys.readouterr().out
    assert demo_main(["--quick", "--videos-per-class", "3", "--out", str(out), "--seed", "1"]) == 7
    assert "extract: 0 done, 30 skipped" in capsys.readouterr().out  # the same dataset again: resumed
