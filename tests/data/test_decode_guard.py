"""pipeline.data.decode_guard: a read that never returns (holding the GIL in C, as decord #373), a decoder that
crashes, raises its own exception or outgrows its memory, and Ctrl-C while waiting, each end as one named error
within the deadline, with no process left behind; through `eleatt flow` on a list the rest finish and it exits 3."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import decode_guard as G
from pipeline.data import video as V
from pipeline.data.video import VideoReadError, load_frames, probe
from preprocessing.synthetic import write_lossless_video

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the decoding guard runs on POSIX")
FLOOR = 2.0  # seconds: the deadline floor these tests run under
T, H, W = 8, 32, 48


def frames_of(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guard")
    for i, name in enumerate(["a", "hang", "b", "crash", "raise", "grow"]):
        write_lossless_video(root / f"{name}.mp4", frames_of(i))
    (root / "list.txt").write_text("a.mp4 0\nhang.mp4 1\nb.mp4 0\n")
    return root


@pytest.fixture(autouse=True)
def guarded(monkeypatch):
    monkeypatch.setenv(G.ENV_TIMEOUT, str(FLOOR))
    V.register_backend("misbehaving", "tests.data.fake_backends:misbehaving")
    yield
    V.register_backend("misbehaving", None)
    G.shutdown()


def children() -> list[int]:
    """Live (not zombie) child processes of this process."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def test_a_read_that_never_returns_is_stopped_at_its_deadline(videos):
    assert load_frames(videos / "a.mp4", [1], "misbehaving").shape == (1, H, W, 3)  # the helper is warm
    deadline = G.read_deadline(3, H, W)
    assert FLOOR < deadline < FLOOR + 0.01  # 4 frames of 32x48: the floor dominates
    start = time.monotonic()
    with pytest.raises(VideoReadError, match=r"hang\.mp4: decoding did not finish in 2 s .*ELEATT_DECODE_TIMEOUT"):
        load_frames(videos / "hang.mp4", [3, 0], "misbehaving")
    took = time.monotonic() - start
    assert FLOOR <= took < FLOOR + 3, took
    assert children() == [], "the stuck helper must be killed and reaped"
    # the next read starts a new helper and is exact
    np.testing.assert_array_equal(load_frames(videos / "b.mp4", [7, 2], "misbehaving").numpy(), frames_of(2)[[7, 2]])


def test_a_crashing_decoder_is_a_named_failure(videos):
    with pytest.raises(VideoReadError, match=r"crash\.mp4: its decoding process was killed by SIGSEGV"):
        load_frames(videos / "crash.mp4", [0], "misbehaving")
    assert children() == []
    np.testing.assert_array_equal(load_frames(videos / "a.mp4", [5], "misbehaving").numpy(), frames_of(0)[[5]])


def test_a_library_exception_names_the_file(videos):
    with pytest.raises(VideoReadError, match=r"raise\.mp4: the video backend .*misbehaving failed \(KeyError: "):
        load_frames(videos / "raise.mp4", [0], "misbehaving")


def test_memory_bounds(videos, monkeypatch):
    monkeypatch.setenv(G.ENV_MAX_MB, "0.01")  # 10 KB: 3 frames of 32x48 RGB (13.5 KB) are refused before decoding
    with pytest.raises(VideoReadError, match=r"a\.mp4: reading 3 frames of 48x32 needs 0 MB, more than one read may "
                                             r"take \(0 MB, ELEATT_DECODE_MAX_MB\)"):
        load_frames(videos / "a.mp4", [0, 1, 2], "misbehaving")
    monkeypatch.setenv(G.ENV_MAX_MB, "4096")
    assert load_frames(videos / "a.mp4", [0, 1, 2], "misbehaving").shape == (3, H, W, 3)
    # A decoder growing past the frames of its read plus the margin is stopped (the deadline is much later).
    monkeypatch.setattr(G, "MEMORY_MARGIN", 100 << 20)
    monkeypatch.setenv(G.ENV_TIMEOUT, "60")
    start = time.monotonic()
    with pytest.raises(VideoReadError, match=r"grow\.mp4: its decoder used more than 100 MB of memory for this read"):
        load_frames(videos / "grow.mp4", [0], "misbehaving")
    assert time.monotonic() - start < 20 and children() == []


def test_ctrl_c_while_waiting_kills_the_helper(videos):
    load_frames(videos / "a.mp4", [0], "misbehaving")
    [helper] = children()
    os.kill(helper, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group: the helper ignores it
    time.sleep(0.5)
    assert children() == [helper]
    np.testing.assert_array_equal(load_frames(videos / "a.mp4", [4], "misbehaving").numpy(), frames_of(0)[[4]])
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        load_frames(videos / "hang.mp4", [0], "misbehaving")
    timer.join()
    assert children() == []


def test_settings_are_checked(monkeypatch, videos):
    monkeypatch.setenv(G.ENV_TIMEOUT, "soon")
    with pytest.raises(ValueError, match="ELEATT_DECODE_TIMEOUT='soon': give the decoding deadline's floor"):
        probe(videos / "a.mp4")
    monkeypatch.setenv(G.ENV_TIMEOUT, "off")
    assert not G.enabled()
    assert probe(videos / "a.mp4").num_frames == T  # in this process
    assert children() == []
    monkeypatch.setenv(G.ENV_TIMEOUT, "30")
    # the deadline grows with the work: the last frame asked for, times the frame size
    assert G.read_deadline(999, 1080, 1920) == pytest.approx(30 + 1000 * 1080 * 1920 / 20e6)
    assert G.probe_deadline(200_000_000) == pytest.approx(30 + 10)
    with pytest.raises(ValueError, match="backend 'pyav' is built in"):
        V.register_backend("pyav", "x:y")
    with pytest.raises(ValueError, match="must be 'module:function'"):
        V.register_backend("mine", "not a target")


def test_flow_command_lists_the_hanging_video_and_finishes_the_rest(videos, tmp_path, capsys):
    from preprocessing.flow import main

    out = tmp_path / "flow"
    start = time.monotonic()
    code = main(["--list", str(videos / "list.txt"), "--root", str(videos), "--out", str(out), "--short-side", "0",
                 "--workers", "1", "--backend", "misbehaving", "--no-progress"])
    took = time.monotonic() - start
    text = capsys.readouterr().out
    assert code == 3, text
    assert "2 done, 0 skipped, 1 failed of 3 videos" in text
    assert "failed: hang.mp4: VideoReadError: " in text and "decoding did not finish in 2 s" in text
    assert sorted(p.name for p in out.glob("*.flow.zip")) == ["a.flow.zip", "b.flow.zip"]
    assert children() == [], "no decoding process may outlive the command"
    assert took < FLOOR + 15, took  # the deadline plus a few seconds (helper starts and the two good videos)


def test_a_hanging_video_is_skipped_by_end_to_end_clips(videos):
    """End-to-end training and evaluation read clips through the same guard: the stuck video is skipped with its
    reason, the others come through."""
    from pipeline.data.lists import ListEntry
    from pipeline.training.clip_data import VideoClipDataset, collate_clips

    cfg = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
               interpolation="bilinear", crop_mode="center")
    entries = [ListEntry("a.mp4", 0), ListEntry("hang.mp4", 1), ListEntry("b.mp4", 0)]
    data = VideoClipDataset(videos, entries, cfg, num_segments=4, train=False, backend="misbehaving")
    start = time.monotonic()
    batch = collate_clips([data[i] for i in range(3)])
    assert time.monotonic() - start < FLOOR + 5
    assert batch["videos"] == ["a.mp4", "b.mp4"] and batch["feats"].shape == (2, 1, 4, 3, 16, 16)
    [(video, reason)] = batch["skipped"]
    assert video == "hang.mp4" and "decoding did not finish in 2 s" in reason


def test_a_stream_file_source_reads_under_the_deadline(videos):
    from pipeline.serving.streaming import FileSource, SourceError, decode_frames

    good = FileSource(str(videos / "a.mp4"), block=3, backend="misbehaving")
    got = list(decode_frames(good, chunk=2))
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), frames_of(0))
    assert [len(g[0]) for g in got] == [2, 1, 2, 1, 2] and got[0][2] == 12.0  # blocks of 3, chunks of 2; its rate
    np.testing.assert_allclose(np.concatenate([g[1] for g in got]), np.arange(T) / 12)
    assert len(children()) == 1
    good.close()  # what the stream command does when it ends, whichever way
    assert children() == []
    stuck = FileSource(str(videos / "hang.mp4"), backend="misbehaving")
    with pytest.raises(SourceError, match=r"stream source '.*hang\.mp4': decoding failed after 0 frames \(decoding "
                                          r"did not finish in 2 s"):
        list(decode_frames(stuck))
    assert children() == []


def test_end_to_end_training_clips_skip_a_hanging_video_too(videos):
    from pipeline.data.lists import ListEntry
    from pipeline.training.clip_data import VideoClipDataset

    cfg = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
               interpolation="bilinear", crop_mode="center")
    data = VideoClipDataset(videos, [ListEntry("hang.mp4", 1), ListEntry("a.mp4", 0)], cfg, num_segments=4,
                            train=True, backend="misbehaving")
    clip, reason = data._read(0, np.random.default_rng(0))
    assert clip is None and "decoding did not finish in 2 s" in reason
    clip, reason = data._read(1, np.random.default_rng(0))
    assert reason is None and clip.shape == (4, 3, 16, 16)


def test_a_variable_frame_rate_file_streams_by_its_times(tmp_path):
    from pipeline.serving.streaming import FileSource, decode_frames
    from tests.data.test_video import VFR_MS, write_vfr

    source = FileSource(str(write_vfr(tmp_path / "vfr.mkv", VFR_MS)), block=4)
    got = list(decode_frames(source, chunk=10))
    assert [g[2] for g in got] == [None, None, None]  # no rate: the stream samples by timestamps
    np.testing.assert_allclose(np.concatenate([g[1] for g in got]), np.array(VFR_MS) / 1000, atol=1e-9)


def test_the_clip_data_module_stops_its_decoding_process_at_teardown(videos):
    from pipeline.training.clip_data import VideoDataModule

    dm = VideoDataModule(str(videos), test_list=str(videos / "list.txt"), backbone="resnet18", frame_size=16,
                         num_segments=2, num_workers=0, backend="misbehaving")
    dm.setup("test")
    assert dm.datasets["test"][0]["video"] == "a.mp4" and len(children()) == 1
    dm.teardown("test")
    assert children() == []


def test_extract_command_lists_the_hanging_video_and_finishes_the_rest(videos, tmp_path, capsys):
    from preprocessing.extract import main

    out = tmp_path / "features"
    start = time.monotonic()
    code = main(["--list", str(videos / "list.txt"), "--root", str(videos), "--out", str(out), "--backbone",
                 "test_resnet", "--weights", "none", "--device", "cpu", "--workers", "0", "--no-progress",
                 "--backend", "misbehaving"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 3, text
    assert "hang.mp4" in text and "decoding did not finish in 2 s" in text
    assert sorted(p.name for p in out.glob("*.npy")) == ["a.npy", "b.npy"]
    assert children() == [], "no decoding process may outlive the command"
    assert time.monotonic() - start < FLOOR + 30


def test_the_read_size_bound_is_inclusive(tmp_path, monkeypatch):
    """2 frames of 4x4 RGB are 96 bytes: allowed under a bound of 96, refused under 95."""
    monkeypatch.setattr(G, "max_read_bytes", lambda: 96)
    G.check_read_size(tmp_path / "v.mp4", 2, 4, 4, VideoReadError)
    monkeypatch.setattr(G, "max_read_bytes", lambda: 95)
    with pytest.raises(VideoReadError, match=r"v\.mp4: reading 2 frames of 4x4 needs 0 MB"):
        G.check_read_size(tmp_path / "v.mp4", 2, 4, 4, VideoReadError)


@pytest.mark.parametrize("asked", [[5, 1, 3], [5, 1, 1, 3], [0, 1, 2]])
def test_a_read_in_a_buffer_of_its_own_comes_back_in_the_order_asked(videos, monkeypatch, asked):
    """Reads above the kept buffer's size get a buffer of their own, returned without a copy when the frames are
    already in the order asked: any other order (and repeats) is gathered."""
    monkeypatch.setattr(G, "_KEEP_BUFFER", 0)
    got = load_frames(videos / "a.mp4", asked, "misbehaving").numpy()
    np.testing.assert_array_equal(got, frames_of(0)[asked])


@pytest.mark.parametrize("timeout", [str(FLOOR), "off"])
def test_a_registered_backend_reads_with_the_guard_on_and_off(videos, monkeypatch, timeout):
    """With ELEATT_DECODE_TIMEOUT=off the read runs in this process, through the same backend (it fell back to PyAV)."""
    monkeypatch.setenv(G.ENV_TIMEOUT, timeout)
    V.register_backend("inverted", "tests.data.fake_backends:inverted")
    try:
        got = load_frames(videos / "a.mp4", [4, 0, 4], "inverted").numpy()
    finally:
        V.register_backend("inverted", None)
    np.testing.assert_array_equal(got, 255 - frames_of(0)[[4, 0, 4]])
