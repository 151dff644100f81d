"""Online recognition (`pipeline.StreamingClassifier`, `eleatt classify --stream`) on a tiny run trained on features
extracted with `--fps` and every step (`data.num_steps 0`): streaming must give what `classify` gives."""
import json
import os
import threading
import warnings

import numpy as np
import pytest
import torch

from pipeline.data.lists import read_list
from pipeline.data.sampling import Sampling
from pipeline.data.video import load_frames, probe
from pipeline.serving.classify import VideoClassifier
from pipeline.serving.streaming import StreamingClassifier, main

STEP_FPS = 8  # extraction rate; the generated videos play at 24 frames/s


@pytest.fixture(scope="module")
def fps_run(tmp_path_factory):
    """prepare synthetic (4 classes, 24 frames at 24 fps) -> extract --fps 8 -> fit (3 epochs, every step).
    Returns (data folder, best.ckpt)."""
    from pipeline.data.lists import write_list
    from pipeline.training.cli import main as lightning_main
    from preprocessing.extract import main as extract_main
    from preprocessing.synthetic import make_dataset

    out = tmp_path_factory.mktemp("stream_run")
    data = out / "data"
    make_dataset(data, videos_per_class=3, num_frames=24, size=48, seed=0, fps=24,
                 classes=["brighten", "darken", "grow", "shrink"])
    write_list(data / "all.txt", [e for s in ("train", "val", "test") for e in read_list(data / f"{s}.txt")])
    assert extract_main(["--list", str(data / "all.txt"), "--root", str(data), "--out", str(out / "features"),
                         "--backbone", "test_resnet", "--weights", "none", "--fps", str(STEP_FPS), "--device", "cpu",
                         "--no-progress"]) == 0
    code = lightning_main([
        "fit", "--config", "configs/tiny.yaml", "--data.features_dir", str(out / "features"),
        "--data.train_list", str(data / "train.txt"), "--data.val_list", str(data / "val.txt"),
        "--data.test_list", str(data / "test.txt"), "--data.num_steps", "0", "--data.normalize", "standard",
        "--trainer.default_root_dir", str(out / "runs"), "--run_name", "stream", "--trainer.max_epochs", "3"])
    assert code == 0
    return data, out / "runs" / "stream" / "best.ckpt"


@pytest.fixture(scope="module")
def models(fps_run):
    _, ckpt = fps_run
    return VideoClassifier(ckpt, device="cpu"), StreamingClassifier(ckpt, device="cpu")


def _video(data, k=0):
    entry = read_list(data / "test.txt")[k]
    path = data / entry.path
    info = probe(path)
    return path, info, load_frames(path, np.arange(info.num_frames)).numpy()  # (T, H, W, 3)


def _push_all(stream, frames, chunk, **kw):
    stream.reset()
    outs = [stream.push(frames[s:s + chunk], **kw) for s in range(0, len(frames), chunk)]
    return (np.concatenate([o.probs for o in outs]), np.concatenate([o.frames for o in outs]),
            np.concatenate([o.times for o in outs]))


@pytest.mark.parametrize("chunk", [1, 3, "all"])
def test_chunked_push_equals_classify(fps_run, models, chunk):
    data, _ = fps_run
    offline, stream = models
    for k in range(2):
        path, info, frames = _video(data, k)
        probs, numbers, times = _push_all(stream, frames, len(frames) if chunk == "all" else chunk, fps=info.fps)
        expected = Sampling(fps=STEP_FPS).indices(info.num_frames, info.fps)  # 0, 3, 6, ...
        np.testing.assert_array_equal(numbers, expected)
        np.testing.assert_allclose(times, expected / info.fps)
        assert stream.steps == len(expected) == len(probs)
        np.testing.assert_allclose(probs[-1], offline(path).scores, atol=1e-4)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_every_step_equals_one_forward_pass_of_the_stack(fps_run, models):
    """Each streamed step's output is the stack's output at that step in one pass over the whole sequence (and
    so what `classify` gives for the video cut at that frame)."""
    data, _ = fps_run
    offline, stream = models
    path, info, frames = _video(data, 1)
    probs, _, _ = _push_all(stream, frames, 5, fps=info.fps)
    raw = offline.features(path)  # (V, T, D) as stored
    feats = offline.normalizer(raw)
    net = offline.model.net
    with torch.no_grad():
        out, _ = net.rnn(net.proj(feats))  # (V, T, H): one pass
        expected = net.head(out).softmax(-1).mean(0).numpy()  # (T, C)  ("last" pooling at every step)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    for t in (1, len(probs) // 2):  # and the offline classification of a prefix
        np.testing.assert_allclose(probs[t - 1], offline.scores(raw[:, :t]), atol=1e-5)


def test_reset_starts_a_new_stream(fps_run, models):
    data, _ = fps_run
    _, stream = models
    _, info, a = _video(data, 0)
    _, _, b = _video(data, 2)
    fresh, _, _ = _push_all(stream, b, 4, fps=info.fps)
    stream.reset()
    stream.push(a, fps=info.fps)
    carried = stream.push(b, fps=info.fps)  # b after a, state carried
    assert not np.allclose(carried.probs[-1], fresh[-1], atol=1e-4)
    assert carried.frames[0] == len(a)  # numbering goes on
    stream.reset()
    again = stream.push(b, fps=info.fps)
    np.testing.assert_allclose(again.probs, fresh, atol=1e-6)
    assert again.frames[0] == 0 and stream.steps == len(fresh)


def test_timestamps_follow_the_same_rule(fps_run, models):
    data, _ = fps_run
    _, stream = models
    _, info, frames = _video(data, 0)
    by_count, numbers, _ = _push_all(stream, frames, 3, fps=info.fps)
    stamps = 100.0 + np.arange(len(frames)) / info.fps  # a stream whose clock does not start at 0
    stream.reset()
    outs = [stream.push(frames[s:s + 3], timestamps=stamps[s:s + 3]) for s in range(0, len(frames), 3)]
    np.testing.assert_array_equal(np.concatenate([o.frames for o in outs]), numbers)
    np.testing.assert_allclose(np.concatenate([o.probs for o in outs]), by_count, atol=1e-6)



def test_timestamps_that_are_not_times_are_refused(fps_run, models):
    # NaN stamps (a source whose frames carry no time) used to compare false with every step time: the stream
    # then sampled nothing and reported no step, without a word
    _, stream = models
    stream.reset()
    frames = np.zeros((3, 48, 48, 3), np.uint8)
    with pytest.raises(ValueError, match="timestamps"):
        stream.push(frames, timestamps=[0.0, float("nan"), 0.1])
    with pytest.raises(ValueError, match="timestamps"):
        stream.push(frames, timestamps=[0.2, 0.1, 0.3])
    assert stream.steps == 0

def test_bad_input_and_other_checkpoints(fps_run, models, tmp_path):
    _, ckpt = fps_run
    _, stream = models
    stream.reset()
    with pytest.raises(ValueError, match="uint8"):
        stream.push(np.zeros((2, 8, 8, 3), np.float32), fps=24)
    with pytest.raises(ValueError, match="frame rate"):
        StreamingClassifier(ckpt, device="cpu").push(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="step length"):
        StreamingClassifier(ckpt, device="cpu", sample_fps=4)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["extraction_settings"]["sampling"] = {"mode": "segments", "num_segments": 8}
    checkpoint["data_state"]["num_steps"] = 8
    other = tmp_path / "segments.ckpt"
    torch.save(checkpoint, other)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segments = StreamingClassifier(other, device="cpu")
    messages = " | ".join(str(w.message) for w in caught)
    assert "less reliable" in messages and "num_steps" in messages
    assert segments.sample_fps == 4.0  # DEFAULT_SEGMENT_FPS
    out = segments.push(np.zeros((12, 48, 48, 3), np.uint8), fps=24)
    np.testing.assert_array_equal(out.frames, [0, 6])


def test_cli_file_json_and_plot(fps_run, models, tmp_path, capsys):
    data, ckpt = fps_run
    offline, _ = models
    path, info, _ = _video(data, 0)
    plot = tmp_path / "timeline.png"
    assert main(["--stream", str(path), "--ckpt", str(ckpt), "--device", "cpu", "--json", "--every", "0.25",
                 "--topk", "2", "--plot", str(plot)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    steps, summary = lines[:-1], lines[-1]["summary"]
    assert [s["time"] for s in steps] == [0.0, 0.25, 0.5, 0.75]  # 8 steps/s over 1 s, a line every 0.25 s
    assert all(len(s["topk"]) == 2 for s in steps)
    assert summary["frames"] == info.num_frames and summary["steps"] == 8 and not summary["interrupted"]
    expected = offline(path, topk=2)
    assert [t["class"] for t in summary["final"]] == expected.names
    np.testing.assert_allclose([t["prob"] for t in summary["final"]], expected.probs, atol=1e-4)
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"


def test_network_sources_through_pyav(fps_run, models, tmp_path, capsys):
    """A file: URL and a pipe (what a network stream looks like to the decoder: no seeking, no index)."""
    data, ckpt = fps_run
    offline, _ = models
    path, _, _ = _video(data, 1)
    expected = offline(path, topk=1)
    assert main(["--stream", f"file:{path}", "--ckpt", str(ckpt), "--device", "cpu", "--json"]) == 0
    final = json.loads(capsys.readouterr().out.splitlines()[-1])["summary"]["final"][0]
    assert final["class"] == expected.names[0] and abs(final["prob"] - expected.probs[0]) < 1e-4

    # a live stream arrives in a streamable container (an MP4 keeps its index at the end): remux to Matroska
    import av

    mkv = tmp_path / "live.mkv"
    with av.open(str(path)) as src, av.open(str(mkv), "w", format="matroska") as dst:
        video = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = video
                dst.mux(packet)
    read_fd, write_fd = os.pipe()
    payload = mkv.read_bytes()

    def feed():
        with os.fdopen(write_fd, "wb") as w:
            w.write(payload)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        code = main(["--stream", f"pipe:{read_fd}", "--ckpt", str(ckpt), "--device", "cpu"])
    finally:
        writer.join()
        os.close(read_fd)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"final: {expected.names[0]} {expected.probs[0]:.1%}" in out
    assert "stream ended: 24 frames decoded, 8 steps" in out


def test_bad_sources_give_one_line_and_exit_3(fps_run, tmp_path, capsys):
    from pipeline.cli import main as eleatt

    _, ckpt = fps_run
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all")
    for source, reason in ((str(tmp_path / "missing.mp4"), "no such file or device"),
                           (str(garbage), "cannot be opened"),
                           ("/dev/video97", "cannot be opened")):
        assert eleatt(["classify", "--stream", source, "--ckpt", str(ckpt), "--device", "cpu"]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and source in err[0] and reason in err[0], err


def test_ctrl_c_ends_cleanly_with_a_summary(fps_run, tmp_path, monkeypatch, capsys):
    import pipeline.serving.streaming as streaming

    data, ckpt = fps_run
    path, _, _ = _video(data, 0)
    real = streaming.decode_frames

    def interrupted(container, chunk=1):
        for i, item in enumerate(real(container, chunk)):
            if i == 10:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(streaming, "decode_frames", interrupted)
    plot = tmp_path / "cut.png"
    assert main(["--stream", str(path), "--ckpt", str(ckpt), "--device", "cpu", "--plot", str(plot)]) == 130
    out = capsys.readouterr().out
    assert "stream interrupted: 10 frames decoded, 4 steps" in out and "final:" in out and plot.is_file()


def test_two_clips_back_to_back_make_one_timeline(fps_run, models, tmp_path, capsys):
    """"grow" then "shrink" in one file: one stream over both, every step on the timeline. (The 3-epoch model is
    too weak to switch its top-1 reliably at the cut, so this checks the timeline, not the switch.)"""
    from preprocessing.synthetic import render_video, video_seed, write_lossless_video

    data, ckpt = fps_run
    offline, stream = models
    clip = np.concatenate([render_video(name, video_seed(1, name, 0), 24, 48) for name in ("grow", "shrink")])
    video = tmp_path / "grow_then_shrink.mp4"
    write_lossless_video(video, clip, fps=24)
    assert main(["--stream", str(video), "--ckpt", str(ckpt), "--device", "cpu", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["time"] for s in lines[:-1]] == [0.0, 1.0]  # a line per second of video
    assert lines[-1]["summary"]["steps"] == 16
    probs, numbers, _ = _push_all(stream, clip, 7, fps=24)
    np.testing.assert_array_equal(numbers, np.arange(0, 48, 3))
    np.testing.assert_allclose(probs[-1], offline(video).scores, atol=1e-4)
    # the first half of the stream is exactly the stream of the first clip alone
    first, _, _ = _push_all(stream, clip[:24], 24, fps=24)
    np.testing.assert_allclose(probs[:8], first, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_stream_equals_forward_on_every_prefix(cell, pooling):
    """`SequenceClassifier.stream`, in chunks of 1, 4 and all steps, gives `forward` of every prefix: the state of
    every layer (h, and c for the LSTM) is carried, and "mean" pooling keeps its running mean."""
    from pipeline.nn.classifier import SequenceClassifier

    net = SequenceClassifier(6, 5, cell=cell, hidden_size=8, num_layers=2, proj_size=4, pooling=pooling).eval()
    x = torch.randn(3, 9, 6)  # (B, T, D)
    with torch.no_grad():
        expected = torch.stack([net(x[:, :t]) for t in range(1, 10)], 1)  # (B, T, C)
    for chunk in (1, 4, 9):
        state, outs = None, []
        for s in range(0, 9, chunk):
            logits, state = net.stream(x[:, s:s + chunk], state)
            outs.append(logits)
        torch.testing.assert_close(torch.cat(outs, 1), expected, atol=1e-5, rtol=0)
        assert state.steps == 9
