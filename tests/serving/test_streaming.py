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
    net = offline.net
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
    checkpoint["eleatt_stream"]["features"]["sampling"] = {"mode": "segments", "num_segments": 8}
    checkpoint["eleatt_stream"]["num_steps"] = 8
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


# ---------------------------------------------------------------------------------------------------------------
# fps sampling where the source rate is not a multiple of the step rate, checked by value: frame i of the video is
# filled with grey level LEVEL * i (lossless), so the frames the stream encodes say which they are.
# ---------------------------------------------------------------------------------------------------------------
LEVEL = 4
# The frame on screen at each step time k / rate is floor(k * src / rate), worked out by hand for 13 steps:
#   30 fps at 8 steps/s:  k * 3.75  = 0, 3.75, 7.5, 11.25, 15, 18.75, 22.5, 26.25, 30, 33.75, 37.5, 41.25, 45
#   25 fps at 8 steps/s:  k * 3.125 = 0, 3.125, 6.25, 9.375, 12.5, 15.625, 18.75, 21.875, 25, 28.125, 31.25,
#                                     34.375, 37.5
#   29.97 (30000/1001) fps at 6 steps/s: k * 5000/1001 = 5k - 5k/1001, just under 5k: frame 5k - 1 for k >= 1
# (rounding the ratio to 4, 3 and 5 frames -- or rounding to nearest -- gives other frames from the 2nd step on).
NON_INTEGER_RATIOS = {
    "30fps_at_8": (30, 8, 48, [0, 3, 7, 11, 15, 18, 22, 26, 30, 33, 37, 41, 45]),
    "25fps_at_8": (25, 8, 40, [0, 3, 6, 9, 12, 15, 18, 21, 25, 28, 31, 34, 37]),
    "29.97fps_at_6": ("30000/1001", 6, 60, [0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49, 54, 59]),
}


@pytest.fixture(scope="module")
def models_at_6(fps_run, tmp_path_factory):
    """The fps run's checkpoint recorded as extracted at 6 steps/s (the weights do not care): offline and stream."""
    _, ckpt = fps_run
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["eleatt_stream"]["features"]["sampling"] = {"mode": "fps", "fps": 6.0,
                                                                         "num_segments": None}
    path = tmp_path_factory.mktemp("at6") / "at6.ckpt"
    torch.save(checkpoint, path)
    return VideoClassifier(path, device="cpu"), StreamingClassifier(path, device="cpu")


@pytest.mark.parametrize("case", list(NON_INTEGER_RATIOS))
def test_non_integer_fps_ratio_streams_the_frames_classify_takes(fps_run, models, models_at_6, tmp_path,
                                                                 monkeypatch, case):
    from fractions import Fraction

    from preprocessing.synthetic import write_lossless_video

    src, rate, num_frames, by_hand = NON_INTEGER_RATIOS[case]
    offline, stream = models if rate == STEP_FPS else models_at_6
    assert stream.sample_fps == rate
    frames = np.stack([np.full((48, 48, 3), LEVEL * i, np.uint8) for i in range(num_frames)])
    path = tmp_path / f"{case}.mp4"
    write_lossless_video(path, frames, fps=Fraction(src))
    info = probe(path)
    assert info.num_frames == num_frames and abs(info.fps - float(Fraction(src))) < 1e-9

    encoded = []  # the frames the stream hands to the backbone, and what it gets back
    real_encode = stream.video.encode

    def spy(chunk):
        feats = real_encode(chunk)
        encoded.append((chunk.clone(), feats))
        return feats

    monkeypatch.setattr(stream.video, "encode", spy)
    probs, numbers, times = _push_all(stream, frames, 7, fps=info.fps)  # 7: chunks cut across the steps
    shown = [int(f.float().mean()) // LEVEL for chunk, _ in encoded for f in chunk]
    assert numbers.tolist() == shown == by_hand  # reported = encoded = by hand, over the whole video
    np.testing.assert_array_equal(numbers, Sampling(fps=rate).indices(num_frames, info.fps))  # sampling's rule
    np.testing.assert_allclose(times, np.asarray(by_hand) / float(Fraction(src)), rtol=0, atol=1e-12)

    # what classify extracts from the file: the same frames' features, bit for bit, and the same probabilities
    raw = offline.features(path)  # (V, T, D)
    streamed = torch.cat([f for _, f in encoded], dim=1)
    assert raw.shape[1] == len(by_hand)
    torch.testing.assert_close(streamed, raw, atol=0, rtol=0)
    assert (raw[:, 1:] - raw[:, :-1]).abs().amax() > 1e-3  # neighbouring frames differ: the check has teeth
    for t in range(1, len(by_hand) + 1):
        np.testing.assert_allclose(probs[t - 1], offline.scores(raw[:, :t]), atol=1e-5)
    np.testing.assert_allclose(probs[-1], offline(path).scores, atol=1e-5)

    # per-frame timestamps (a clock that does not start at 0) take the same frames
    encoded.clear()
    stamps = 50.0 + np.arange(num_frames) / float(Fraction(src))
    stream.reset()
    outs = [stream.push(frames[s:s + 5], timestamps=stamps[s:s + 5]) for s in range(0, num_frames, 5)]
    assert np.concatenate([o.frames for o in outs]).tolist() == by_hand
    assert [int(f.float().mean()) // LEVEL for chunk, _ in encoded for f in chunk] == by_hand


def test_reset_lets_a_new_source_set_another_rate(models):
    # the refusal of a changed rate says "call reset() and set the rate again": that used to raise all the same
    _, stream = models
    frames = np.zeros((8, 48, 48, 3), np.uint8)
    stream.reset()
    stream.push(frames, fps=24)
    with pytest.raises(ValueError, match="differs from the rate"):
        stream.push(frames, fps=30)  # mid-stream: refused
    stream.reset()
    out = stream.push(frames, fps=30)  # a new source at 30 fps, stepped at 8/s: frames 0, 3.75 -> 0, 3, 7
    assert stream.src_fps == 30.0 and out.frames.tolist() == [0, 3, 7]
    stream.reset()
    assert stream.push(frames).frames.tolist() == [0, 3, 7]  # the rate is kept across reset() when not given


def test_timestamps_with_dropped_frames_take_one_step_per_frame(fps_run):
    """A camera that drops frames (no rate given): each frame lasts the gap since the previous one, and a frame
    that spans several step times is taken once, the steps then resume on the k / 8 s grid."""
    _, ckpt = fps_run
    stream = StreamingClassifier(ckpt, device="cpu")  # fresh: no source rate known
    kept = [0, 1, 2, 3, *range(12, 24)]  # a 24 fps camera that lost frames 4..11
    frames = np.stack([np.full((48, 48, 3), LEVEL * i, np.uint8) for i in kept])
    stamps = 7.0 + np.asarray(kept) / 24
    outs = [stream.push(frames[s:s + 3], timestamps=stamps[s:s + 3]) for s in range(0, len(kept), 3)]
    # by hand, steps due at k / 8 s: frame 0 (the first) takes step 0; frame 3 spans [0.125, 0.167) s: step 1;
    # frame 12 comes at 0.5 s after a 0.375 s gap, spans [0.5, 0.875): one step, the next due is 7 (0.875 s);
    # frames 13..20 end by 0.875; frame 21 spans [0.875, 0.917): step 7; frames 22, 23 end by 1.0: step 8 not yet
    numbers = np.concatenate([o.frames for o in outs])
    assert numbers.tolist() == [0, 3, 4, 13]  # the 1st, 4th, 5th and 14th frames pushed: source frames 0, 3, 12, 21
    np.testing.assert_allclose(np.concatenate([o.times for o in outs]), [0.0, 0.125, 0.5, 0.875], atol=1e-9)
    assert stream.steps == 4


def test_views_are_averaged_as_classify_averages_them(fps_run, tmp_path):
    """A checkpoint whose features were extracted over ten views: after every step the stream gives the mean of the
    views' probabilities, as classify does -- not one view's."""
    data, ckpt = fps_run
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["eleatt_stream"]["features"]["views"] = "ten"
    ten = tmp_path / "ten.ckpt"
    torch.save(checkpoint, ten)
    offline, stream = VideoClassifier(ten, device="cpu"), StreamingClassifier(ten, device="cpu")
    path, info, frames = _video(data, 0)
    probs, _, _ = _push_all(stream, frames, 5, fps=info.fps)
    raw = offline.features(path)  # (10, T, D)
    assert raw.shape[0] == 10 and len(probs) == raw.shape[1] == 8
    for t in range(1, len(probs) + 1):
        np.testing.assert_allclose(probs[t - 1], offline.scores(raw[:, :t]), atol=1e-5)
    with torch.no_grad():  # the views disagree, so the mean is no single view's answer
        logits, _ = offline.net.stream(offline.normalizer(raw))  # (10, T, C)
    per_view = logits.softmax(-1).numpy()
    np.testing.assert_allclose(probs, per_view.mean(0), atol=1e-5)
    assert np.abs(per_view - per_view.mean(0)).max(axis=(1, 2)).min() > 1e-3
