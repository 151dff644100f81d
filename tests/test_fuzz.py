"""Seeded fuzzing of every reader of files from disk (issue 28): flow files, manifests, settings.json, scores files,
skeleton files, feature files and the trained-stream record of checkpoints.

Each reader gets a few hundred damaged versions of a valid file: truncated, bytes flipped or inserted, numbers made
absurd (1e39, -1, NaN, 10**20, ...), paths pointed out of the folder. Every outcome must be either a correct result
(checked against what was written) or one of the project's errors (`UserError`), one line naming the file; any other
exception fails the test with the case that raised it. Python-side memory (numpy, zipfile, OpenCV's arrays: traced
by tracemalloc) must stay under `PEAK_BYTES` per case whatever sizes the damaged file claims.
"""
from __future__ import annotations

import contextlib
import io
import re
import tracemalloc
import zipfile
from typing import Callable, Iterator

import numpy as np
import pytest
import torch

from pipeline.errors import UserError

CASES = 250
PEAK_BYTES = 16 * 2**20  # every valid file here is a few KB; a reader trusting a claimed size would pass this
ABSURD = ("1e39", "-1", "0", "-0.0", "1e999", "NaN", "Infinity", "99999999999999999999", "4294967297", "2.5",
          '"x"', "null", "true", "[]", "{}", '"../../etc/passwd"', '"/abs/x.npy"', "1" * 5000, "[" * 3000)
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def mutations(data: bytes, rng: np.random.Generator, count: int = CASES, text: bool = False) -> Iterator[bytes]:
    """`count` damaged copies of `data`: truncation, flipped bytes, inserted bytes and (for JSON and text) a number
    replaced by an absurd value."""
    for _ in range(count):
        kind = int(rng.integers(6 if text else 3))  # text: half of the cases are absurd numbers
        if kind == 0:
            yield data[: int(rng.integers(len(data)))]
        elif kind == 1:
            out = bytearray(data)
            for pos in rng.integers(0, len(data), int(rng.integers(1, 9))):
                out[pos] ^= int(rng.integers(1, 256))
            yield bytes(out)
        elif kind == 2:
            pos = int(rng.integers(len(data) + 1))
            yield data[:pos] + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes() + data[pos:]
        else:  # 3..5
            numbers = list(NUMBER.finditer(data))
            m = numbers[int(rng.integers(len(numbers)))]
            value = ABSURD[int(rng.integers(len(ABSURD)))].encode()
            yield data[: m.start()] + value + data[m.end():]


@contextlib.contextmanager
def traced():
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def run_case(case: int, read: Callable[[], object], name: str) -> object | None:
    """The reader's result, or None when it refused with one of our one-line errors naming `name`; any other
    exception, or a peak over PEAK_BYTES, fails naming the case."""
    tracemalloc.reset_peak()
    try:
        result = read()
    except UserError as err:
        message = str(err)
        assert name in message and "\n" not in message, f"case {case}: {message!r}"
        result = None
    except Exception as err:  # noqa: BLE001 - the point: nothing else may escape
        pytest.fail(f"case {case}: {type(err).__name__} escaped: {err!r}"[:2000])
    peak = tracemalloc.get_traced_memory()[1]
    assert peak < PEAK_BYTES, f"case {case}: peak {peak / 2**20:.1f} MB"
    return result


def summary(outcomes: list) -> tuple[int, int]:
    refused = sum(o is None for o in outcomes)
    return len(outcomes) - refused, refused


# ------------------------------------------------------------------------------------------------ flow files
def test_fuzz_flow_files(tmp_path):
    from pipeline.data.flow_files import FlowWriter, load_quantized

    rng = np.random.default_rng(280)
    levels = rng.integers(0, 256, (3, 2, 6, 5), dtype=np.uint8)
    good = tmp_path / "good.flow.zip"
    with FlowWriter(good, 20.0, fps=25.0) as w:
        for pair in levels:
            w.add(pair)
    data = good.read_bytes()
    with zipfile.ZipFile(good) as z:
        meta = z.read("meta.json")
        pngs = {i.filename: z.read(i) for i in z.infolist() if i.filename != "meta.json"}
    path = tmp_path / "v.flow.zip"
    outcomes = []

    def rezipped(meta_bytes: bytes, compression=zipfile.ZIP_STORED) -> bytes:
        with zipfile.ZipFile(path, "w", compression=compression) as z:
            for name, content in pngs.items():
                z.writestr(name, content)
            z.writestr("meta.json", meta_bytes)
        return path.read_bytes()

    cases = list(mutations(data, rng))
    cases += [rezipped(m) for m in mutations(meta, rng, CASES, text=True)]
    cases.append(rezipped(meta, zipfile.ZIP_DEFLATED))
    with traced():
        for case, content in enumerate(cases):
            path.write_bytes(content)
            result = run_case(case, lambda: load_quantized(path), str(path))
            if result is not None:
                q, bound = result
                assert np.array_equal(q, levels), f"case {case}: loaded levels differ from those written"
                assert np.isfinite(bound) and 0 < bound < 1e4
            outcomes.append(result)
    loaded, refused = summary(outcomes)
    assert loaded >= 5 and refused >= 400, (loaded, refused)  # CRCs catch most damage; a few new fps/bounds read


# ------------------------------------------------------------------------------------------------ manifests
def test_fuzz_manifests(tmp_path):
    from pipeline.data.features import FeatureFolder

    rng = np.random.default_rng(281)
    folder = FeatureFolder(tmp_path / "f")
    folder.check_settings({"backbone": "x", "dim": 4, "dtype": "float32"})
    arrays = {}
    for video in ("a/one.mp4", "a/two.mp4", "three.mp4"):
        arrays[video] = rng.normal(size=(int(rng.integers(2, 6)), 4)).astype(np.float32)
        folder.write(video, arrays[video], seconds=1.5)
    folder.record_failure("four.mp4", "decoding failed")
    (tmp_path / "outside.npy").write_bytes((folder.root / "three.npy").read_bytes())
    manifest, failed = folder.manifest_path.read_bytes(), folder.failed_path.read_bytes()
    paths = [b'"../outside.npy"', b'"/' + str(tmp_path).encode() + b'/outside.npy"', b'"a/../../outside.npy"']
    cases = list(mutations(manifest, rng, CASES, text=True))
    cases += [manifest.replace(b'"three.npy"', p) for p in paths]
    outcomes = []
    with traced():
        for case, content in enumerate(cases):
            folder.manifest_path.write_bytes(content)
            folder.failed_path.write_bytes(content[: len(failed)] + failed)
            fresh = FeatureFolder(folder.root)
            done = run_case(case, lambda: (fresh.finished(), fresh.failed(), fresh.finished(verify=False)),
                            str(folder.root))
            if done is not None:
                for video in done[0]:  # finished means: its own file, inside the folder, whole
                    stem = video.rsplit(".", 1)[0]
                    original = next(v for v in arrays if v.rsplit(".", 1)[0] == stem)
                    assert np.array_equal(fresh.load(video), arrays[original]), f"case {case}: {video}"
                assert set(done[0]) <= set(done[2])
            outcomes.append(done)
    assert summary(outcomes)[0] == len(cases)  # a damaged manifest never stops a reader: its videos are redone


# ------------------------------------------------------------------------------------------------ settings.json
def test_fuzz_settings(tmp_path):
    from pipeline.data.features import FeatureFolder, FeatureSettings
    from pipeline.data.flow_files import FlowOptions
    from pipeline.data.sampling import Sampling

    rng = np.random.default_rng(282)
    settings = FeatureSettings(
        modality="flow", backbone="resnet18", weights="imagenet", in_chans=10, stack=5, dim=512, views="three",
        sampling=Sampling(num_segments=25), precision="bf16",
        data_config={"input_size": [10, 224, 224], "mean": [0.5] * 10, "std": [0.5] * 10, "crop_pct": 0.875,
                     "interpolation": "bilinear", "crop_mode": "center"},
        options=FlowOptions(short_side=256, bound=20.0).to_options())
    root = tmp_path / "f"
    FeatureFolder(root).check_settings(settings)
    data = (root / "settings.json").read_bytes()
    outcomes = []
    with traced():
        for case, content in enumerate(mutations(data, rng, 2 * CASES, text=True)):
            (root / "settings.json").write_bytes(content)
            folder = FeatureFolder(root)
            read = run_case(case, lambda: folder.settings, str(root / "settings.json"))
            if read is not None:
                assert FeatureSettings.from_json(read.to_json()) == read
                assert read.dim is None or 1 <= read.dim <= 1 << 16
                if read.modality == "flow":
                    run_case(case, lambda: FlowOptions.of(read, root / "settings.json"), str(root / "settings.json"))
            outcomes.append(read)
    loaded, refused = summary(outcomes)
    assert loaded >= 20 and refused >= 200, (loaded, refused)


# ------------------------------------------------------------------------------------------------ scores files
def test_fuzz_scores_files(tmp_path):
    from pipeline.evaluation.scores import read_scores, write_scores

    rng = np.random.default_rng(283)
    probs = rng.dirichlet(np.ones(4), size=5).astype(np.float32)
    labels = np.array([0, 3, -1, 2, 1])
    good = write_scores(tmp_path / "good.npz", [f"v{i}.mp4" for i in range(5)], probs, labels, list("abcd"))
    data = good.read_bytes()
    path = tmp_path / "s.npz"

    def arrays(**changes) -> bytes:
        base = {"videos": np.array([f"v{i}.mp4" for i in range(5)]), "scores": probs, "labels": labels,
                "classes": np.array(list("abcd"))}
        base.update(changes)
        np.savez(path, **{k: v for k, v in base.items() if v is not None})
        return path.read_bytes()

    absurd = [arrays(scores=np.where(rng.random(probs.shape) < 0.1, np.nan, probs)), arrays(labels=labels + 10**9),
              arrays(scores=probs[:3]), arrays(labels=labels.astype(np.float32)), arrays(videos=np.arange(5)),
              arrays(classes=np.array(list("abc"))), arrays(scores=None), arrays(scores=probs[:, :0]),
              arrays(scores=np.full_like(probs, np.inf))]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:  # a compressed member claiming 200 MB
        with z.open("scores.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY" + bytes(200 * 2**20 - 6))
    absurd.append(path.read_bytes())
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:  # valid headers, 200 MB of zeros
        for name, value in (("videos", np.array(["v"])), ("labels", np.zeros(1, np.int64))):
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, value)
        with z.open("scores.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (1, 50 * 2**20)})
            for _ in range(200):
                f.write(bytes(2**20))
    absurd.append(path.read_bytes())
    outcomes = []
    with traced():
        for case, content in enumerate([*mutations(data, rng), *absurd]):
            path.write_bytes(content)
            read = run_case(case, lambda: read_scores(path), str(path))
            if read is not None:
                assert np.array_equal(read["scores"], probs) and np.array_equal(read["labels"], labels), case
            outcomes.append(read)
    loaded, refused = summary(outcomes)
    assert loaded >= 1 and refused >= 200, (loaded, refused)


# ------------------------------------------------------------------------------------------------ skeleton files
def test_fuzz_skeleton_files(tmp_path):
    from pipeline.data.skeleton import load_skeleton, write_skeleton

    rng = np.random.default_rng(284)
    frames = [[("72057594037931101", rng.normal(size=(25, 3)))] for _ in range(3)]
    frames[1].append(("72057594037931102", rng.normal(size=(25, 3)) + 1))
    good = write_skeleton(tmp_path / "good.skeleton", frames)
    data = good.read_bytes()
    path = tmp_path / "S001C001P001R001A001.skeleton"
    outcomes = []
    with traced():
        for case, content in enumerate([*mutations(data, rng, CASES, text=True),
                                        b"20000\n" + b"0\n" * 20_000, b"20001\n" + b"0\n" * 20_001,
                                        b"99999999999999999999\n0\n"]):
            path.write_bytes(content)
            for truncated in (False, True):
                seq = run_case(case, lambda: load_skeleton(path, allow_truncated=truncated), str(path))
                if seq is not None:
                    assert seq.dtype == np.float32 and seq.ndim == 2 and seq.shape[1] == 150 and len(seq) >= 1
                    assert np.isfinite(seq).all() and np.abs(seq).max() <= 2e4, case
                outcomes.append(seq)
    loaded, refused = summary(outcomes)
    assert loaded >= 20 and refused >= 200, (loaded, refused)


# ------------------------------------------------------------------------------------------------ feature files
def test_fuzz_feature_files(tmp_path):
    from pipeline.data.features import FeatureFolder

    rng = np.random.default_rng(285)
    folder = FeatureFolder(tmp_path / "f")
    folder.check_settings({"backbone": "x", "dim": 6})
    feats = rng.normal(size=(2, 5, 6)).astype(np.float16)
    folder.write("v.mp4", feats)
    path = folder.feature_path("v.mp4")
    data = path.read_bytes()
    claims = []  # headers claiming far more data than the file holds (np.load would allocate the claim)
    for shape in ((2**28, 6), (2, 2**27, 6), (1, 2**40, 6), (-1, 6), (2**62, 6)):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False, "shape": shape})
        claims.append(header.getvalue() + data[128:])
    outcomes = []
    with traced():
        for case, content in enumerate([*mutations(data, rng, 2 * CASES), *claims]):
            path.write_bytes(content)
            for mmap in (False, True):
                fresh = FeatureFolder(folder.root)
                got = run_case(case, lambda: np.array(fresh.load("v.mp4", mmap=mmap)), str(path))
                if got is not None:
                    assert got.shape[-1] == 6 and got.ndim in (2, 3) and np.isfinite(got).all(), case
                outcomes.append(got)
                assert run_case(case, lambda: fresh.finished(), str(path)) is not None
    loaded, refused = summary(outcomes)
    assert loaded >= 20 and refused >= 200, (loaded, refused)


# ------------------------------------------------------------------------------------------------ trained streams
def _leaves(value, prefix=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*prefix, k))
    elif isinstance(value, list) and value and not isinstance(value[0], (int, float)):
        for i, v in enumerate(value):
            yield from _leaves(v, (*prefix, i))
    else:
        yield prefix


def _set(value, path, new):
    for key in path[:-1]:
        value = value[key]
    value[path[-1]] = new


def test_fuzz_trained_stream_records(tmp_path):
    from pipeline.data.features import FeatureSettings
    from pipeline.nn.classifier import SequenceClassifier
    from pipeline.trained.load import load_stream
    from pipeline.trained.record import RECORD_KEY, TrainedStream

    rng = np.random.default_rng(286)
    torch.manual_seed(0)
    net = SequenceClassifier(input_size=6, num_classes=3, cell="gru", hidden_size=5, num_layers=2,
                             attention_layers=1, dropout=0.0)
    record = TrainedStream(network=net.config, class_names=["a", "b", "c"],
                           features=FeatureSettings(backbone="test_resnet", dim=6), num_steps=4,
                           normalizer={"mode": "standard", "mean": torch.zeros(6), "std": torch.ones(6)})
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": state, RECORD_KEY: record.to_dict()}, path)
    data = path.read_bytes()
    absurd_values = [1e39, -1, 0, 10**20, float("nan"), "x", None, [], {}, True, 65537, 2.5, "../x"]
    leaves = list(_leaves(record.to_dict()))
    cases: list[bytes] = []
    for _ in range(100):  # absurd values in the record (each case saves and loads a checkpoint: the slow reader)
        stored = record.to_dict()
        _set(stored, leaves[int(rng.integers(len(leaves)))], absurd_values[int(rng.integers(len(absurd_values)))])
        torch.save({"state_dict": state, RECORD_KEY: stored}, path)
        cases.append(path.read_bytes())
    cases += list(mutations(data, rng, 60))  # damaged files
    poisoned = dict(state, **{"net.head.weight": state["net.head.weight"].clone().fill_(float("nan"))})
    torch.save({"state_dict": poisoned, RECORD_KEY: record.to_dict()}, path)
    cases.append(path.read_bytes())
    outcomes = []
    for case, content in enumerate(cases):
        path.write_bytes(content)
        try:
            stream = load_stream(path)
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err), f"case {case}: {err}"
            stream = None
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"case {case}: {type(err).__name__} escaped: {err!r}"[:2000])
        if stream is not None:
            probs = stream.probabilities(stream.prepare(np.ones((3, 6), np.float32)))
            assert probs.shape == (3,) and np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-5, case
        outcomes.append(stream)
    loaded, refused = summary(outcomes)
    assert loaded >= 15 and refused >= 100, (loaded, refused)
