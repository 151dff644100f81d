"""The report (table, pictures, commands) and `eleatt visualize`, on hand-made scores and on the quick demo's run."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluation.report import Stream, write_report
from tests.helpers import image_is_blank
from pipeline.evaluation.scores import read_scores, write_scores

METRICS = "epoch,step,train/loss_epoch,val/loss,val/top1\n0,1,2.0,2.1,0.3\n1,3,1.5,1.7,0.6\n2,5,1.0,1.2,0.8\n"


def _scores(path, correct, classes=("a", "b", "c")):
    """A scores file of 6 videos (two per class) where the first `correct` are right."""
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = labels.copy()
    pred[correct:] = (labels[correct:] + 1) % 3
    scores = np.full((6, 3), 0.1, dtype=np.float32)
    scores[np.arange(6), pred] = 0.8
    return write_scores(path, [f"v{i}.mp4" for i in range(6)], scores, labels, list(classes))


def _referenced_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_report_of_streams_and_baseline(tmp_path):
    runs = {}
    for name in ("rgb", "flow"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "metrics.csv").write_text(METRICS)
    streams = [Stream("RGB", _scores(runs["rgb"] / "scores_test.npz", 4), runs["rgb"]),
               Stream("flow", _scores(runs["flow"] / "scores_test.npz", 3), runs["flow"]),
               Stream("fused", _scores(tmp_path / "fused.npz", 6))]
    baseline = {"top1": 0.5, "top3": 1.0, "mca": 0.5, "labels": np.zeros(6), "note": "mean features"}
    out = tmp_path / "report"
    html_path = write_report(out, streams, baselines={"order-blind baseline": baseline},
                             commands=[("train", "eleatt fit --config configs/ucf101_rgb.yaml")], title="T")
    assert html_path == out / "report.html"
    markdown = (out / "report.md").read_text()
    text = html_path.read_text()
    # the table: measured values per row, then chance (1/3, top-3 = 3/3)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in markdown.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["RGB"][:4] == ["66.7%", "100.0%", "66.7%", "6"]
    assert rows["flow"][:3] == ["50.0%", "100.0%", "50.0%"]
    assert rows["fused"][:3] == ["100.0%", "100.0%", "100.0%"]
    assert rows["order-blind baseline"][:3] == ["50.0%", "100.0%", "50.0%"]
    assert rows["chance level"][:3] == ["33.3%", "100.0%", "33.3%"]
    for value in ("66.7%", "33.3%", "order-blind baseline", "eleatt fit --config configs/ucf101_rgb.yaml"):
        assert value in text
    images = _referenced_images(markdown)
    assert sorted(images) == ["confusion_flow.png", "confusion_fused.png", "confusion_rgb.png", "curves.png"]
    for name in images:
        assert (out / name).is_file() and not image_is_blank(out / name)
        assert name in text
    assert text.count("data:image/png;base64,") == len(images)  # self-contained


def test_report_refuses_what_does_not_fit(tmp_path):
    with pytest.raises(ValueError, match="at least one stream"):
        write_report(tmp_path, [])
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        write_report(tmp_path, [Stream("RGB", tmp_path / "missing.npz")])
    a = _scores(tmp_path / "a.npz", 6)
    b = write_scores(tmp_path / "b.npz", ["x"], np.ones((1, 4), np.float32) / 4, np.array([0]), None)
    with pytest.raises(ValueError, match="label space"):
        write_report(tmp_path / "r", [Stream("RGB", a), Stream("flow", b)])



def test_streams_whose_pictures_would_share_a_file_are_refused(tmp_path):
    # "RGB" and "rgb" both draw confusion_rgb.png (and one line of the curves): the second would silently
    # replace the first stream's picture
    a, b = _scores(tmp_path / "a.npz", 6), _scores(tmp_path / "b.npz", 3)
    with pytest.raises(ValueError, match="confusion_rgb.png"):
        write_report(tmp_path / "r", [Stream("RGB", a), Stream("rgb", b)])
    assert not (tmp_path / "r" / "report.html").exists()

def test_test_videos_counts_labelled_videos_only(tmp_path):
    # 6 videos, 2 of them unlabelled (-1): the table counts 4 test videos and measures on those 4 alone
    labels = np.array([0, -1, 1, 1, -1, 2])
    pred = np.array([0, 2, 1, 2, 2, 2])  # labelled: right, right, wrong (1 -> 2), right; unlabelled: "2"
    scores = np.full((6, 3), 0.1, dtype=np.float32)
    scores[np.arange(6), pred] = 0.8
    path = write_scores(tmp_path / "scores_test.npz", [f"v{i}.mp4" for i in range(6)], scores, labels, ["a", "b", "c"])
    baseline = {"top1": 0.5, "top3": 1.0, "mca": 0.5, "labels": np.array([0, -1, 1, -1, 2])}
    write_report(tmp_path / "r", [Stream("RGB", path)], baselines={"order-blind baseline": baseline})
    markdown = (tmp_path / "r" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in markdown.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["RGB"][:4] == ["75.0%", "100.0%", "83.3%", "4"]  # top-1 3/4; mca (1 + 1/2 + 1) / 3
    assert rows["order-blind baseline"][3] == "3"
    assert rows["chance level"][3] == ""
    html_text = (tmp_path / "r" / "report.html").read_text()
    assert "<tr><td>RGB</td><td>75.0%</td><td>100.0%</td><td>83.3%</td><td>4</td>" in html_text
    from pipeline.evaluation.report import stream_metrics

    assert stream_metrics(Stream("RGB", path))[0].videos == 4


# -- on the quick demo's run ----------------------------------------------------------------------------------------
def test_demo_prints_the_report_path_last_and_the_report_holds_the_run(quick_demo):
    session, stdout = quick_demo["session"], quick_demo["stdout"]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("report: ")
    report = Path(last.split("report: ", 1)[1])
    assert report.is_absolute() and report == session / "report.html" and report.is_file()
    for stage in ("[2/10] flow", "[4/10] extract flow", "[6/10] fit flow", "[8/10] fuse", "[10/10] report"):
        assert stage in stdout
    from pipeline.evaluation.scores import accuracy_summary

    markdown = (session / "report.md").read_text()
    top1 = {}
    for name, path in (("RGB", quick_demo["run"] / "scores_test.npz"), ("flow", quick_demo["flow_run"] /
                       "scores_test.npz"), ("fused", session / "fused_test.npz")):
        scores = read_scores(path)
        top1[name] = accuracy_summary(scores["scores"], scores["labels"])["top1"]
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {top1[name]:.1%} |" in row, row
    # the summary line prints the figures of this run, and the fusion's weights come from validation
    assert f"RGB {top1['RGB']:.1%}, flow {top1['flow']:.1%}, fused {top1['fused']:.1%}" in stdout
    assert "picked weights" in stdout and "on validation" in stdout
    assert "| order-blind baseline |" in markdown and "| chance level | 10.0% |" in markdown
    assert "eleatt prepare ucf101" in markdown and "eleatt flow" in markdown and "--modality flow" in markdown
    assert "eleatt fuse" in markdown and "eleatt visualize" in markdown
    images = _referenced_images(markdown)
    assert {"curves.png", "confusion_rgb.png", "confusion_flow.png", "confusion_fused.png",
            "attention.png"} <= set(images)
    for name in images:
        assert (session / name).is_file() and not image_is_blank(session / name)


def test_visualize_features_writes_pngs_and_the_gates_of_the_model(quick_demo, tmp_path, capsys):
    from pipeline.cli import main as eleatt
    from pipeline.data.features import FeatureFolder
    from pipeline.data.lists import read_list
    from pipeline.trained.load import load_stream

    data, run = quick_demo["data"], quick_demo["run"]
    entry = read_list(data / "test.txt")[0]
    features_dir = quick_demo["features"]
    npy = FeatureFolder(features_dir).feature_path(entry.path)
    out = tmp_path / "vis"
    assert eleatt(["visualize", "--ckpt", str(run / "best.ckpt"), "--features", str(npy), "--out", str(out),
                   "--label", str(entry.label)]) == 0
    stem = npy.stem
    for name in (f"{stem}_gates_layer1.png", f"{stem}_probabilities.png"):
        assert (out / name).is_file() and not image_is_blank(out / name)
    arrays = np.load(out / f"{stem}_visualize.npz", allow_pickle=False)
    # the heat map's array is what the checkpoint's EleAttLSTM returns for this video's test-time input
    model = load_stream(run / "best.ckpt")
    seq = model.prepare(np.load(npy))  # (V, T, D)
    with torch.no_grad():
        _, _, gates = model.net.rnn(model.net.proj(seq), return_attention=True)
        final = model.net.video_probs(seq[None], torch.tensor([seq.shape[1]]))[0]
    np.testing.assert_allclose(arrays["gates"], gates[0][0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(arrays["probs"][-1], final.numpy(), rtol=1e-5, atol=1e-6)  # all steps = `test`
    assert arrays["gates"].shape == (seq.shape[1], model.record.input_size)
    assert list(arrays["classes"]) == model.class_names
    assert "wrote" in capsys.readouterr().out


def test_visualize_video_and_errors(quick_demo, tmp_path, capsys):
    from pipeline.cli import main as eleatt
    from pipeline.data.lists import read_list

    data, run = quick_demo["data"], quick_demo["run"]
    video = data / read_list(data / "test.txt")[1].path
    out = tmp_path / "vis"
    assert eleatt(["visualize", "--ckpt", str(run / "best.ckpt"), "--video", str(video), "--out", str(out)]) == 0
    assert not image_is_blank(out / f"{video.stem}_gates_layer1.png")
    assert (out / f"{video.stem}_probabilities.png").is_file()
    capsys.readouterr()
    ckpt = str(run / "best.ckpt")
    cases = [(["--features", str(tmp_path / "nope.npy")], 2, "nope.npy"),
             (["--video", str(video), "--layer", "2"], 2, "--layer 2"),
             (["--features", str(tmp_path / "bad.npy")], 2, "dimensions")]
    np.save(tmp_path / "bad.npy", np.zeros((5, 3), np.float32))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    cases.append((["--video", str(broken)], 3, "broken.mp4"))
    for args, code, needle in cases:
        assert eleatt(["visualize", "--ckpt", ckpt, *args, "--out", str(out)]) == code, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_visualize_help(capsys):
    from pipeline.cli import main as eleatt

    with pytest.raises(SystemExit) as exit_info:
        eleatt(["visualize", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--ckpt" in text and "--features" in text and "--video" in text and "--layer" in text
    assert eleatt(["--help"]) == 0
    assert "visualize" in capsys.readouterr().out


def test_the_videos_left_out_are_listed(tmp_path):
    from pipeline.evaluation.scores import write_scores

    labels = np.array([0, 1, 1])
    write_scores(tmp_path / "s.npz", ["a", "b", "c"], np.eye(2, dtype=np.float32)[labels], labels, ["x", "y"])
    left = [{"video": "c/bad|name.mp4", "stage": "flow", "reason": "VideoReadError: broken"},
            {"video": "d/one.mp4", "stage": "prepare", "reason": "twin <of> d/one.avi"}]
    html_path = write_report(tmp_path / "out", [Stream("RGB", tmp_path / "s.npz")], left_out=left)
    markdown = (tmp_path / "out" / "report.md").read_text()
    section = markdown.split("## Videos left out\n", 1)[1].split("\n## ", 1)[0]
    assert section.splitlines()[1] == "2 video(s) left out of every stream's training and test, each with the stage " \
                                      "where it failed and why:"
    assert "| c/bad\\|name.mp4 | flow | VideoReadError: broken |" in section
    assert "<td>twin &lt;of&gt; d/one.avi</td>" in html_path.read_text()
    write_report(tmp_path / "none", [Stream("RGB", tmp_path / "s.npz")])
    assert "left out" not in (tmp_path / "none" / "report.md").read_text()
