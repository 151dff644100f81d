"""pipeline.data.video: exact frames on generated lossless videos, accuracy against sequential decoding on the real
videos in ../shared/data/videos (h265 where decord is wrong, AV1 it cannot open), display rotation, variable frame
rates, torchcodec, bad inputs, raw-frame folders.

Tests that reach into the decoding internals (monkeypatched constants and functions, the caches) run them in this
process (`inprocess`: ELEATT_DECODE_TIMEOUT=off); the others go through the decoding process as commands do."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import video as V
from pipeline.data.video import VideoInfo, VideoReadError, load_frames, probe
from tests.data.video_files import FPS, LOSSLESS, VFR_MS, H, T, W, make_frames, write_vfr, write_video

BACKENDS = ["pyav", "decord", "torchcodec", "auto"]

ORDER = [29, 0, 7, 7, 13, 6, 12, 28, 1, 29, 5]  # out of order, repeats, both ends


@pytest.fixture(scope="module")
def lossless(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("lossless")
    frames = make_frames()
    return {ext: write_video(out / f"clip.{ext}", frames, ext) for ext in LOSSLESS}


@pytest.fixture(autouse=True)
def _fresh_cache():
    V.clear_cache()
    yield
    V.clear_cache()


@pytest.fixture
def inprocess(monkeypatch):
    """Decode in this process, where monkeypatches and the caches are visible."""
    monkeypatch.setenv("ELEATT_DECODE_TIMEOUT", "off")


def needs(backend: str) -> None:
    if backend == "decord" and not V.decord_available():
        pytest.skip("decord is not installed on this platform")
    if backend == "torchcodec" and not V.torchcodec_available():
        pytest.skip(f"torchcodec cannot be used here ({V._torchcodec_missing}); pip install 'eleatt[torchcodec]' "
                    "and apt-get install ffmpeg")


def sequential(path: Path, indices=None) -> np.ndarray:
    """Reference: decode from the start, keep frames `indices` (sorted distinct; all when None) as RGB."""
    want = None if indices is None else set(indices)
    out = []
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if want is None or i in want:
                out.append(frame.to_ndarray(format="rgb24"))
            if want is not None and i >= max(want):
                break
    return np.stack(out)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_same_frames(got: np.ndarray, asked: list[int], ref: dict[int, np.ndarray], name: str) -> None:
    """Each returned frame is the asked one: near-equal to it (colour conversion may differ slightly between
    backends) and no closer to the neighbouring frames (non-strict: static scenes repeat frames exactly)."""
    for g, i in zip(got, asked):
        d = {j: mad(g, ref[j]) for j in (i - 1, i, i + 1) if j in ref}
        assert d[i] <= V.SAME_FRAME_TOL, f"{name}: frame {i} differs from sequential frame {i} by {d[i]:.2f}"
        assert d[i] <= min(d.values()), f"{name}: asked frame {i}, got one closer to a neighbour: {d}"


# --- generated lossless videos: the frames written are the frames read ------------------------------------------------

@pytest.mark.parametrize("container", list(LOSSLESS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_lossless_frames_are_exact(lossless, container, backend, monkeypatch, inprocess):
    needs(backend)
    monkeypatch.setattr(V, "SEEK_MIN_SKIP", 1)  # seek wherever a keyframe lies between targets
    if container != "avi":  # MP4/MKV: every PyAV read must be served by pts-matched seeking, never the fallback
        monkeypatch.setattr(V, "_decode_sequential", _no_fallback)
    path, frames = lossless[container], make_frames()
    assert probe(path) == VideoInfo(num_frames=T, fps=float(FPS), height=H, width=W)

    got = load_frames(path, ORDER, backend)
    assert got.dtype == torch.uint8 and got.shape == (len(ORDER), H, W, 3)
    np.testing.assert_array_equal(got.numpy(), frames[ORDER])
    np.testing.assert_array_equal(load_frames(path, np.arange(T), backend).numpy(), frames)
    np.testing.assert_array_equal(load_frames(path, torch.tensor([3]), backend).numpy(), frames[[3]])
    assert load_frames(path, [], backend).shape == (0, H, W, 3)
    key = V._index(path)[1]
    assert key not in V._no_seek, "pts-matched seeking hit a mismatch on a well-formed file"
    if backend == "auto" and V.torchcodec_available() and container != "avi":  # the first dense backend: used
        assert V._torchcodec_ok[key] is True, "torchcodec is exact on this file; auto should use it"
    elif backend == "auto" and V.decord_available():
        assert V._decord_ok[key] is True, "decord is exact on this file; auto should use it"


@pytest.mark.parametrize("container", list(LOSSLESS))
def test_lossless_frames_through_the_decoding_process(lossless, container):
    path, frames = lossless[container], make_frames()
    assert probe(path) == VideoInfo(num_frames=T, fps=float(FPS), height=H, width=W)
    np.testing.assert_array_equal(load_frames(path, ORDER).numpy(), frames[ORDER])
    np.testing.assert_array_equal(load_frames(path, np.arange(T)).numpy(), frames)  # dense: auto's checked backends
    assert load_frames(path, [], "pyav").shape == (0, H, W, 3)


def _no_fallback(*args):
    raise AssertionError("fell back to sequential decoding")


def test_seek_mismatch_falls_back_to_sequential(lossless, inprocess):
    """A wrong index (here: every pts shifted by one frame) must cost time, never return a wrong frame."""
    path = lossless["mkv"]
    index, key = V._index(path)
    assert index.seekable
    shifted = np.concatenate([[index.pts[0] - 1], index.pts[:-1]])  # pts[i] now names frame i - 1
    V._index_cache[key] = dataclasses.replace(index, pts=shifted)
    got = load_frames(path, [20, 3, 14], "pyav")
    np.testing.assert_array_equal(got.numpy(), make_frames()[[20, 3, 14]])
    assert key in V._no_seek


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_seeks_only_past_the_next_keyframe(lossless, container, monkeypatch, inprocess):
    """Keyframes every 6 frames (0, 6, 12, ...): a read decodes forward and seeks only where the next wanted frame
    lies at or beyond the next keyframe; the frames stay exact."""
    seeks: list[int] = []
    real_seek = V._seek
    monkeypatch.setattr(V, "_seek", lambda c, stream, pts: (seeks.append(pts), real_seek(c, stream, pts)))
    monkeypatch.setattr(V, "SEEK_MIN_SKIP", 1)
    path, frames = lossless[container], make_frames()
    index = V._index(path)[0]
    assert index.key_index.tolist() == list(range(0, T, 6))
    cases = [
        ([0, 2, 5], []),  # all before the first keyframe after 0: decode forward
        ([1, 4, 7], [6]),  # 7 lies past keyframe 6: seek there rather than decode 5 and 6
        ([13, 14, 17], [12]),  # from the start straight to keyframe 12, then forward within its group
        ([3, 12, 13, 25, 27], [12, 24]),
        ([6, 8, 11], [6]),
    ]
    for asked, keys in cases:
        seeks.clear()
        np.testing.assert_array_equal(load_frames(path, asked, "pyav").numpy(), frames[asked])
        assert seeks == [int(index.pts[k]) for k in keys], (asked, seeks)
    # A minimum skip keeps seeks that would save fewer frames than a seek costs out: 5 -> 7 decodes 6 on.
    monkeypatch.setattr(V, "SEEK_MIN_SKIP", 4)
    seeks.clear()
    np.testing.assert_array_equal(load_frames(path, [5, 7, 20], "pyav").numpy(), frames[[5, 7, 20]])
    assert seeks == [int(index.pts[18])]


def test_edited_file_is_reindexed(tmp_path):
    path = write_video(tmp_path / "v.mkv", make_frames(12))
    assert probe(path).num_frames == 12
    write_video(path, make_frames(20)[13:])  # same path, new content: the cache key (size, mtime) changes
    assert probe(path).num_frames == 7
    np.testing.assert_array_equal(load_frames(path, [0]).numpy()[0], make_frames(20)[13])


def test_decord_bridge_is_left_alone(lossless, inprocess):
    decord = pytest.importorskip("decord")
    decord.bridge.set_bridge("torch")  # a user's global choice must neither break us nor be changed by us
    try:
        got = load_frames(lossless["mp4"], [4, 2], "decord")
        assert decord.bridge._CURRENT_BRIDGE.type == "torch"
    finally:
        decord.bridge.reset_bridge()
    np.testing.assert_array_equal(got.numpy(), make_frames()[[4, 2]])


def _child_load(path: str) -> list:
    return load_frames(path, [9, 2]).numpy().tolist()


def test_forked_workers_read_correct_frames(lossless):
    """The parent has read the file (caches filled); forked children open their own readers."""
    path = lossless["mp4"]
    load_frames(path, [1, 2])
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(_child_load, [str(path)] * 2)
    for r in results:
        np.testing.assert_array_equal(np.asarray(r, dtype=np.uint8), make_frames()[[9, 2]])


def test_import_opens_nothing_and_leaves_decord_unloaded():
    code = ("import sys, pipeline.data.video as v; print('decord' in sys.modules, 'torch' in sys.modules, "
            "len(v._index_cache))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["False", "False", "0"]  # the decoding process imports neither


# --- real videos: accuracy against sequential decoding ---------------------------------------------------------------

REAL = ["kinetics_arm_wrestling.mp4", "test.mp4", "test.avi", "S001C001P001R001A001_rgb.avi", "av1_video.mkv",
        "h265_video.mp4"]
BIG = "S001C001P001R001A001_rgb.avi"  # 1920x1080: a few indices only


@pytest.mark.parametrize("name", REAL)
def test_real_video_matches_sequential_decoding(shared_data, name, monkeypatch, inprocess):
    path = shared_data / "videos" / name
    info = probe(path)
    if name == BIG:
        asked = [102, 0, 51, 1, 51]
        near = {j for i in asked for j in (i - 1, i, i + 1)}
        ref, count = {}, 0
        with av.open(str(path)) as c:  # one pass: the count sequential decoding yields, and the frames near `asked`
            for count, frame in enumerate(c.decode(video=0), 1):
                if count - 1 in near:
                    ref[count - 1] = frame.to_ndarray(format="rgb24")
    else:
        frames = sequential(path)
        ref, count = dict(enumerate(frames)), len(frames)
        rng = np.random.default_rng(0)
        asked = [count - 1, 0] + rng.integers(0, count, 12).tolist() + [count // 2, count // 2]
    assert info.num_frames == count
    assert (info.height, info.width) == ref[0].shape[:2]
    # (backend, SEEK_MIN_SKIP, DENSE_READ_FRACTION); auto at fraction 0: the torchcodec/decord checks, then the
    # first that passed.
    cases = [("pyav", V.SEEK_MIN_SKIP, V.DENSE_READ_FRACTION), ("auto", V.SEEK_MIN_SKIP, V.DENSE_READ_FRACTION),
             ("auto", V.SEEK_MIN_SKIP, 0.0)]
    if path.suffix != ".avi":  # AVI is never sought in; elsewhere also seek wherever a keyframe lies between targets
        cases.insert(1, ("pyav", 1, V.DENSE_READ_FRACTION))
    for backend, seek_min_skip, dense_fraction in cases:
        monkeypatch.setattr(V, "SEEK_MIN_SKIP", seek_min_skip)
        monkeypatch.setattr(V, "DENSE_READ_FRACTION", dense_fraction)
        if path.suffix != ".avi":
            monkeypatch.setattr(V, "_decode_sequential", _no_fallback)
        got = load_frames(path, asked, backend).numpy()
        assert got.shape == (len(asked), info.height, info.width, 3)
        assert_same_frames(got, asked, ref, f"{name} [{backend}, seek>={seek_min_skip}, dense>={dense_fraction}]")
        V.clear_cache()


def test_auto_rejects_decord_on_h265_where_it_is_wrong(shared_data, monkeypatch, inprocess):
    if not V.decord_available():
        pytest.skip("decord is not installed on this platform")
    monkeypatch.setattr(V, "DENSE_BACKENDS", ("decord",))
    path = shared_data / "videos" / "h265_video.mp4"
    ref = dict(enumerate(sequential(path)))
    asked = [3, 5, 9, 2, 7]
    raw = load_frames(path, asked, "decord").numpy()
    if all(mad(g, ref[i]) <= V.SAME_FRAME_TOL for g, i in zip(raw, asked)):
        pytest.skip("this decord build returns the right frames on h265_video.mp4")
    monkeypatch.setattr(V, "DENSE_READ_FRACTION", 0.0)  # every read counts as dense: auto runs the decord check
    assert_same_frames(load_frames(path, asked, "auto").numpy(), asked, ref, "h265 auto")
    assert V._decord_ok[V._index(path)[1]] is False
    # And where decord is exact, auto keeps it.
    load_frames(shared_data / "videos" / "test.mp4", [0], "auto")
    assert V._decord_ok[V._index(shared_data / "videos" / "test.mp4")[1]] is True


def test_auto_uses_decord_for_dense_reads_once_verified(lossless, monkeypatch, inprocess):
    if not V.decord_available():
        pytest.skip("decord is not installed on this platform")
    monkeypatch.setattr(V, "DENSE_BACKENDS", ("decord",))
    path, frames = lossless["mp4"], make_frames()
    key = V._index(path)[1]
    real_decode_decord = V._decode_decord
    used = []
    monkeypatch.setattr(V, "_decode_decord", lambda *a: used.append(len(a[2])) or real_decode_decord(*a))
    for _ in range(2):
        np.testing.assert_array_equal(load_frames(path, [3, 20, 3]).numpy(), frames[[3, 20, 3]])
    assert key not in V._decord_ok and used == []  # sparse reads: PyAV, no check
    monkeypatch.setattr(V, "DECORD_MAX_PIXELS", H * W - 1)
    np.testing.assert_array_equal(load_frames(path, np.arange(T)).numpy(), frames)
    assert key not in V._decord_ok and used == []  # dense, but larger than decord is used for: PyAV
    monkeypatch.setattr(V, "DECORD_MAX_PIXELS", H * W)
    np.testing.assert_array_equal(load_frames(path, np.arange(T)[::-1]).numpy(), frames[::-1])
    assert V._decord_ok[key] is True and used[-1] == T  # dense read: checked (a probe read), then decord


def test_av1_falls_back_to_pyav(shared_data):
    path = shared_data / "videos" / "av1_video.mkv"
    asked = [124, 0, 60, 60, 1]
    ref = dict(enumerate(sequential(path)))
    assert_same_frames(load_frames(path, asked).numpy(), asked, ref, "av1 auto")
    if V.decord_available():
        with pytest.raises(VideoReadError, match=r"av1_video\.mkv.*decord cannot read it.*'pyav'"):
            load_frames(path, [0], "decord")


# --- bad inputs ------------------------------------------------------------------------------------------------------

def truncated_copy(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated_mp4", "truncated_faststart", "truncated_mkv",
                                  "truncated_avi"])
def test_bad_files_raise_naming_the_file(tmp_path, lossless, case):
    frames = make_frames()
    if case == "missing":
        path, reason = tmp_path / "nope.mp4", "no such file"
    elif case == "empty":
        path, reason = tmp_path / "empty.mp4", "empty"
        path.touch()
    elif case == "text":
        path, reason = tmp_path / "notes.mp4", "not a video"
        path.write_text("this is not a video\n" * 50)
    elif case == "truncated_mp4":  # index (moov) at the end: lost
        path, reason = truncated_copy(lossless["mp4"], tmp_path / "cut.mp4"), "not a video"
    elif case == "truncated_faststart":  # index at the start: it lists frames that are gone
        full = write_video(tmp_path / "fs.mp4", frames, "mp4", movflags="faststart")
        path, reason = truncated_copy(full, tmp_path / "cut_fs.mp4"), "truncated"
    elif case == "truncated_mkv":
        path, reason = truncated_copy(lossless["mkv"], tmp_path / "cut.mkv"), "truncated"
    else:
        path, reason = truncated_copy(lossless["avi"], tmp_path / "cut.avi"), "truncated"
    for call in (lambda: probe(path), lambda: load_frames(path, [0]), lambda: load_frames(path, [0], "pyav")):
        with pytest.raises(VideoReadError, match=reason) as e:
            call()
        assert str(e.value).startswith(f"{path}: ") and "; " in str(e.value)  # file: reason; fix
    assert isinstance(e.value, ValueError)


def test_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(VideoReadError, match="pipe.mp4: is not a regular file"):
        probe(fifo)


@pytest.mark.parametrize("name", ["test.mp4", "test.avi"])
def test_truncated_real_videos(shared_data, tmp_path, name):
    path = truncated_copy(shared_data / "videos" / name, tmp_path / name)
    with pytest.raises(VideoReadError, match=name):
        load_frames(path, [0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_index_is_an_error(lossless, backend):
    needs(backend)
    path = lossless["mp4"]
    for bad in (T, -1, 10_000):
        with pytest.raises(VideoReadError, match=rf"frame index {bad} is out of range; the video has {T} frames") as e:
            load_frames(path, [0, bad, 1], backend)
        assert str(path) in str(e.value)


def test_bad_arguments(lossless, tmp_path):
    path = lossless["mp4"]
    with pytest.raises(ValueError, match="unknown video backend 'opencv'; use one of auto, decord, pyav, rawframes, "
                                         "torchcodec"):
        load_frames(path, [0], "opencv")
    with pytest.raises(ValueError, match="1-D"):
        load_frames(path, [[0, 1]])
    with pytest.raises(ValueError, match="integers"):
        load_frames(path, [0.5])
    with pytest.raises(VideoReadError, match="needs a folder"):
        load_frames(path, [0], "rawframes")
    with pytest.raises(VideoReadError, match="is a folder; backend 'pyav' reads video files"):
        load_frames(tmp_path, [0], "pyav")
    (tmp_path / "empty_dir").mkdir()
    for call in (lambda: probe(tmp_path / "empty_dir"), lambda: load_frames(tmp_path / "empty_dir", [0])):
        with pytest.raises(VideoReadError, match="empty_dir.*img_00001.jpg"):
            call()


# --- raw-frame folders -----------------------------------------------------------------------------------------------

def test_shared_rawframes(shared_data):
    folder = shared_data / "rawframes"
    assert probe(folder) == VideoInfo(num_frames=10, fps=V.DEFAULT_RAWFRAME_FPS, height=240, width=320)
    assert probe(folder, fps=25).fps == 25.0
    asked = [9, 0, 0, 4]
    expected = np.stack([np.asarray(Image.open(folder / f"img_{i + 1:05d}.jpg").convert("RGB")) for i in asked])
    for backend in ("auto", "rawframes"):
        got = load_frames(folder, asked, backend)
        assert got.dtype == torch.uint8
        np.testing.assert_array_equal(got.numpy(), expected)
    with pytest.raises(VideoReadError, match="frame index 10 is out of range; the video has 10 frames"):
        load_frames(folder, [10])


def test_generated_rawframes_exact_and_gaps(tmp_path):
    frames = make_frames(5)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"img_{i + 1:05d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    assert probe(tmp_path) == VideoInfo(5, V.DEFAULT_RAWFRAME_FPS, H, W)
    np.testing.assert_array_equal(load_frames(tmp_path, [4, 1, 1]).numpy(), frames[[4, 1, 1]])
    (tmp_path / "img_00003.png").unlink()
    with pytest.raises(VideoReadError, match="img_00003 is missing"):
        probe(tmp_path)


# --- the benchmark ---------------------------------------------------------------------------------------------------

def test_decode_benchmark_quick(lossless, capsys):
    from pipeline.benchmarks import decode

    assert decode.main(["--quick", str(lossless["mp4"]), str(lossless["avi"])]) == 0
    out = capsys.readouterr().out
    table, summary = out.split("\n\n", 1)
    rows = [line.split() for line in table.splitlines() if line.startswith("clip.")]
    backends = {" ".join(r[2:-7]) for r in rows}  # video mode BACKEND frames ms best fps ratio vs-ref wrong
    assert {"pyav", "forward", "auto", "auto (no guard)", "auto (1st read)"} <= backends
    assert all(r[-2].endswith("x") for r in rows), out  # every row has its ratio to the faster reference
    assert all(r[-1] == "0" for r in rows), out  # no wrong frames on lossless files
    # the summary: every backend of every file frame-exact, its sparse time, no dense time in a quick run
    lines = [line.split() for line in summary.splitlines() if line.startswith("clip.")]
    assert {(r[0], r[-3], r[-1]) for r in lines} == {(v, "yes", "-") for v in ("clip.mp4", "clip.avi")}
    assert "worst auto sparse read: " in summary and "target <= 1.1x" in summary
    assert decode.main(["--quick", str(lossless["mp4"]), "/nonexistent.mp4"]) == 3


def test_decode_benchmark_generates_videos_or_reads_a_folder(tmp_path, monkeypatch, capsys):
    from pipeline.benchmarks import decode

    one = [g for g in decode.GENERATED if g[0] == "h264_rotated90.mp4"]
    monkeypatch.setattr(decode, "GENERATED", [(*one[0][:3], (48, 64), 24, *one[0][5:])])
    made = decode.make_videos(tmp_path)
    assert [p.name for p in made] == ["h264_rotated90.mp4"]
    info = probe(made[0])
    assert (info.num_frames, info.height, info.width, info.rotation) == (24, 64, 48, 90)
    monkeypatch.setenv(decode.ENV_VIDEOS, str(tmp_path))
    assert decode.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "h264_rotated90.mp4" in out and "generating" not in out
    monkeypatch.delenv(decode.ENV_VIDEOS)
    assert decode.main(["--quick"]) == 0
    assert "no videos given (and no ELEATT_BENCH_VIDEOS): generating test videos" in capsys.readouterr().out


def test_a_one_pixel_video_is_read_and_its_flow_refused_by_name(tmp_path):
    """A 1x1 video decodes; OpenCV's DIS refuses frames that small (it raises under 12 px, crashes under 32), which
    `classify` of a flow checkpoint did not catch (a traceback, the other videos never classified): the size is
    refused by name before OpenCV runs, as a ValueError each command records per video."""
    from pipeline.data.flow_estimation import OpenCVFlow, video_flow
    from pipeline.errors import UsageError

    frames = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1).repeat(3, -1) * 20
    path = write_video(tmp_path / "dot.mkv", frames)
    assert probe(path) == VideoInfo(12, float(FPS), 1, 1)
    np.testing.assert_array_equal(load_frames(path, [11, 0]).numpy(), frames[[11, 0]])
    with pytest.raises(UsageError, match=r"dot\.mkv': its frames are 1x1; dis needs at least 32x32") as err:
        list(video_flow(path, OpenCVFlow("dis", "fast"), None, 20.0))
    assert isinstance(err.value, ValueError)


def test_decode_benchmark_summary_by_hand():
    """The summary of hand-made rows: exact or not per file and backend, sparse (segments) and dense (all) times,
    and the worst auto sparse read against the faster of decord and forward."""
    from pipeline.benchmarks.decode import format_summary

    def row(video, mode, backend, ms, wrong=0):
        return dict(video=video, mode=mode, backend=backend, frames=8, ms=ms, best_ms=ms, fps=1, wrong=wrong, note="")

    rows = [row("a.mp4", "segments", "decord", 10.0, wrong=2), row("a.mp4", "segments", "forward", 20.0),
            row("a.mp4", "segments", "auto", 11.0), row("a.mp4", "train", "decord", 40.0),
            row("a.mp4", "train", "forward", 30.0), row("a.mp4", "train", "auto", 36.0),
            row("a.mp4", "all", "auto", 100.0), row("a.mp4", "all", "decord", 90.0),
            dict(row("b.avi", "segments", "decord", None), note="cannot open it")]
    lines = [line.split() for line in format_summary(rows).splitlines()[2:]]
    assert lines[:4] == [["a.mp4", "decord", "NO", "(2", "wrong)", "10.0", "90.0"],
                         ["a.mp4", "forward", "yes", "20.0", "-"],
                         ["a.mp4", "auto", "yes", "11.0", "100.0"],
                         ["b.avi", "decord", "fails:", "cannot", "open", "it", "-", "-"]]
    # auto: 11/10 = 1.10x on segments, 36/30 = 1.20x on train: the worst is train
    assert format_summary(rows).splitlines()[-1] == ("worst auto sparse read: 1.20x the faster of decord and forward "
                                                     "(a.mp4, train; target <= 1.1x)")


# --- display rotation --------------------------------------------------------------------------------------------------

# (degrees counter-clockwise as av writes them, mirrored) -> the displayed frame from the stored one. Written by hand
# from what the ffmpeg command line (which applies the display matrix) shows for such files: 90 -> np.rot90 once
# (counter-clockwise), -90 -> three times, 180 -> twice, a mirror alone -> flipped left-right, 90 mirrored -> turned
# once, then flipped left-right.
ROTATIONS = {
    (90, False): lambda f: np.rot90(f, 1, axes=(1, 2)),
    (-90, False): lambda f: np.rot90(f, 3, axes=(1, 2)),
    (180, False): lambda f: f[:, ::-1, ::-1],
    (0, True): lambda f: f[:, :, ::-1],
    (90, True): lambda f: np.rot90(f, 1, axes=(1, 2))[:, :, ::-1],
}
# what probe reports for them: (rotation, mirrored)
REPORTED = {(90, False): (90, False), (-90, False): (270, False), (180, False): (180, False), (0, True): (0, True),
            (90, True): (90, True)}


@pytest.fixture(scope="module")
def rotated(tmp_path_factory) -> dict[tuple, Path]:
    out = tmp_path_factory.mktemp("rotated")
    return {(deg, mir, ext): write_video(out / f"r{deg}_{int(mir)}.{ext}", make_frames(), ext, deg, mir)
            for (deg, mir) in ROTATIONS for ext in ("mp4", "mkv")}


@pytest.mark.parametrize("turn", list(ROTATIONS), ids=lambda t: f"{t[0]}{'m' if t[1] else ''}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_applies_the_display_rotation(rotated, turn, backend):
    needs(backend)
    expected = ROTATIONS[turn](make_frames())  # (T, H', W', 3) as displayed
    for ext in ("mp4", "mkv"):
        path = rotated[(*turn, ext)]
        info = probe(path)
        assert (info.height, info.width) == expected.shape[1:3]
        assert (info.rotation, info.mirrored) == REPORTED[turn]
        if backend == "decord":  # decord turns such files its own (wrong) way: refused, never a wrong frame
            with pytest.raises(VideoReadError, match=r"decord mis-decodes videos with a display rotation \(this one "
                                                     rf"is turned {REPORTED[turn][0]} degrees"):
                load_frames(path, ORDER, backend)
            continue
        np.testing.assert_array_equal(load_frames(path, ORDER, backend).numpy(), expected[ORDER])
        np.testing.assert_array_equal(load_frames(path, np.arange(T), backend).numpy(), expected)


def test_the_per_file_checks_compare_like_with_like_on_rotated_files(rotated, inprocess):
    """torchcodec passes its check on a rotated lossless file (its frames and the reference are compared before the
    rotation, its own turn undone), decord is not tried there, and auto's dense reads come out displayed."""
    path = rotated[(90, True, "mp4")]
    index, key = V._index(path)
    assert index.orient == (1, True) and (index.height, index.width) == (H, W)
    assert not V._passes("decord", path, index, key)
    if V.torchcodec_available():
        assert V._passes("torchcodec", path, index, key)
    np.testing.assert_array_equal(load_frames(path, np.arange(T)).numpy(), ROTATIONS[(90, True)](make_frames()))


def test_a_rotation_that_is_not_a_quarter_turn_is_refused(tmp_path):
    path = write_video(tmp_path / "tilted.mp4", make_frames(3), "mp4", rotation=30)
    with pytest.raises(VideoReadError, match=r"tilted\.mp4: its display matrix turns frames by -30\.0 degrees"):
        probe(path)


# --- variable frame rate -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_variable_frame_rate_video_reports_its_times(tmp_path, ext):
    from pipeline.data.sampling import Sampling

    path = write_vfr(tmp_path / f"vfr.{ext}", VFR_MS)
    info = probe(path)
    assert info.num_frames == 10
    np.testing.assert_allclose(info.times, np.array(VFR_MS) / 1000, atol=1e-9)
    assert info.fps == pytest.approx(9 / 0.78)  # the mean rate, not the nominal 30
    # 10 frames/s: the frame shown at 0, 0.1, ..., 0.8 s is 0, 2, 2, 3, 6, 6, 6, 7, 9 (each once)
    assert Sampling(fps=10).indices(info.num_frames, info.fps, info.times).tolist() == [0, 2, 3, 6, 7, 9]
    np.testing.assert_array_equal(load_frames(path, [9, 3]).numpy(), make_frames(10)[[9, 3]])
    # an evenly spaced file has no times, and its nominal rate
    assert probe(write_vfr(tmp_path / f"cfr.{ext}", [0, 40, 80, 120, 160])).times is None


def test_views_sample_a_variable_frame_rate_video_by_its_times(tmp_path):
    from pipeline.data.features import FeatureSettings
    from pipeline.data.sampling import Sampling
    from pipeline.data.views import video_views

    path = write_vfr(tmp_path / "vfr.mkv", VFR_MS)
    cfg = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
               interpolation="bilinear", crop_mode="center")
    settings = FeatureSettings(modality="rgb", data_config=cfg, in_chans=3, sampling=Sampling(fps=10), views="center")
    chunks = list(video_views(path, settings))
    assert sum(c.views.shape[1] for c in chunks) == 6 and chunks[0].total == 6
    assert chunks[0].source.fps == pytest.approx(9 / 0.78)


# --- torchcodec ---------------------------------------------------------------------------------------------------------

def test_torchcodec_on_the_shared_videos_is_exact_or_refused(shared_data, inprocess):
    """Every real test video: torchcodec's frames are the sequential reference's, or its per-file check refuses it
    (and auto then reads the file with PyAV, exactly)."""
    needs("torchcodec")
    refused = []
    for path in sorted((shared_data / "videos").iterdir()):
        index, key = V._index(path)
        n = index.num_frames
        asked = np.unique(np.r_[0, n - 1, np.random.default_rng(0).integers(0, n, 10), V._probe_positions(index)])
        if index.height * index.width > 1280 * 720:
            asked = asked[asked < 120]  # the 1080p clip: its first 4 s
        ref = dict(enumerate(sequential(path, asked.tolist())))
        ref = {i: ref[k] for k, i in enumerate(sorted(set(asked.tolist())))}
        if not V._passes("torchcodec", path, index, key):
            refused.append(path.name)
            continue
        got = V._decode_torchcodec(path, index, asked, key)
        assert_same_frames(V._orient(got, index.orient), asked.tolist(), ref, f"{path.name} [torchcodec]")
    assert "test.mp4" not in refused  # it is exact on plain H.264 MP4
    assert {"test.avi", "S001C001P001R001A001_rgb.avi"} <= set(refused)  # AVI: no presentation timestamps


def test_torchcodec_missing_is_named(lossless, monkeypatch, inprocess):
    monkeypatch.setattr(V, "_torchcodec_module", False)
    monkeypatch.setattr(V, "_torchcodec_missing", "the torchcodec package is not installed")
    with pytest.raises(VideoReadError, match=r"clip\.mp4: backend 'torchcodec' cannot be used: the torchcodec package "
                                             r"is not installed; pip install 'eleatt\[torchcodec\]'"):
        load_frames(lossless["mp4"], [0], "torchcodec")
    np.testing.assert_array_equal(load_frames(lossless["mp4"], np.arange(T)).numpy(), make_frames())  # auto: decord/PyAV


def test_the_per_file_check_reads_a_frame_between_keyframes_alone(lossless, inprocess):
    """A backend exact when it reads from the start (the probes: keyframes and the frames after them) but one frame
    early when a read starts between keyframes (torchcodec on AVI files) fails the check; an exact one passes."""
    path, frames = lossless["mp4"], make_frames()
    index, key = V._index(path)
    assert index.key_index.tolist() == [0, 6, 12, 18, 24] and V._probe_positions(index).tolist() == [6, 7, 18, 19, 24, 25]

    def early_when_alone(p, i, wanted, k):
        return frames[wanted - 1] if len(wanted) == 1 else frames[wanted]  # the lone read: frame 15 -> 14

    assert V._verify(path, index, key, lambda p, i, wanted, k: frames[wanted])
    assert not V._verify(path, index, key, early_when_alone)
