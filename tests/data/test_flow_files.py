"""pipeline.data.flow_files: quantisation, the .flow.zip file (exact, random access), JPEG import/export, flow stacks."""
from __future__ import annotations

import zipfile

import cv2
import numpy as np
import pytest
import torch

from pipeline.data.flow_files import (DEFAULT_BOUND, FlowFolder, FlowOptions, dequantize, flow_folder_settings, export_jpg, flow_info, flow_stack,
                                jpg_files, load_flow, load_quantized, normalize_flow, quantize, read_jpg_folder,
                                save_flow, stack_indices)
from pipeline.data.transforms import hflip
from tests.helpers import folder_stack
from preprocessing.flow import import_jpg


def test_quantisation_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    for bound in (20.0, 5.0):
        f = rng.uniform(-bound, bound, size=(1000,)).astype(np.float32)
        q = quantize(f, bound)
        assert q.dtype == np.uint8
        step = 2 * bound / 255
        assert np.abs(dequantize(q, bound) - f).max() <= step / 2 + 1e-5
    # the mmaction2 formula, clipping included
    assert quantize(np.array([-100.0, -20.0, 0.0, 20.0, 100.0])).tolist() == [0, 0, 128, 255, 255]
    assert dequantize(np.array([0, 255], dtype=np.uint8)).tolist() == [-20.0, 20.0]
    with pytest.raises(ValueError, match="bound"):
        quantize(np.zeros(2), 0)


def _levels(n=6, h=12, w=10, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 2, h, w), dtype=np.uint8)  # (N, 2, H, W)


def test_store_and_load_are_exact_and_indices_equal_slicing(tmp_path):
    q = _levels()
    path = tmp_path / "v.flow.zip"
    save_flow(path, q, bound=10.0)
    info = flow_info(path)
    assert (info["pairs"], info["height"], info["width"], info["bound"]) == (6, 12, 10, 10.0)
    stored, bound = load_quantized(path)
    assert bound == 10.0 and np.array_equal(stored, q)
    full = load_flow(path)
    assert full.dtype == np.float32 and full.shape == (6, 2, 12, 10)
    assert np.array_equal(full, dequantize(q, 10.0))
    for idx in ([3], [5, 0, 5, 2], np.arange(6)[::-1], []):
        assert np.array_equal(load_flow(path, idx), full[np.asarray(idx, dtype=np.int64)])
    with pytest.raises(ValueError, match="index 6 out of range: the file has 6 pairs"):
        load_flow(path, [1, 6])
    # the container is a plain stored zip: one PNG per pair plus meta.json
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == [f"{i:06d}.png" for i in range(6)] + ["meta.json"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_damaged_and_missing_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.flow.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a flow file or is damaged"):
        load_flow(bad)
    with pytest.raises(FileNotFoundError, match="eleatt flow"):
        load_flow(tmp_path / "none.flow.zip")
    folder = FlowFolder(tmp_path / "flows")
    with pytest.raises(FileNotFoundError, match="no flow for 'a/b.mp4'"):
        folder.load("a/b.mp4")


def test_flow_folder_writes_atomically_and_records(tmp_path):
    folder = FlowFolder(tmp_path / "flows")
    settings = folder.check_settings(flow_folder_settings(FlowOptions(bound=20.0)))
    assert FlowFolder(tmp_path / "flows").settings == settings and FlowOptions.of(settings).bound == 20.0
    q = _levels(n=3)
    record = folder.write_quantized("cls/v1.avi", q, 20.0, source_frames=4)
    assert record["feature"] == "cls/v1.flow.zip" and record["pairs"] == 3 and record["source_frames"] == 4
    assert (record["height"], record["width"]) == (12, 10)
    assert set(folder.finished()) == {"cls/v1.avi"}
    assert np.array_equal(folder.load("cls/v1.avi", [2]), dequantize(q[[2]], 20.0))
    assert not list((tmp_path / "flows").rglob("*.tmp*"))
    with pytest.raises(ValueError, match="no frame pairs"):
        folder.write_quantized("cls/empty.avi", np.zeros((0, 2, 4, 4), np.uint8), 20.0)
    assert not (tmp_path / "flows" / "cls" / "empty.flow.zip").exists()
    assert not list((tmp_path / "flows").rglob("*.tmp*"))


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "fewer_pairs", "no_last_png", "no_first_png"])
def test_finished_counts_a_flow_file_only_when_it_is_whole(tmp_path, damage):
    """`finished()` (what a rerun of `eleatt flow` skips) checks each recorded file: it exists, its zip directory
    reads, its meta counts the record's pairs, and the directory holds each pair's PNG."""
    folder = FlowFolder(tmp_path / "flows")
    folder.check_settings(flow_folder_settings(FlowOptions(bound=20.0)))
    q = _levels(n=5)
    for video in ("a.avi", "b.avi"):
        folder.write_quantized(video, q, 20.0)
    assert set(folder.finished()) == {"a.avi", "b.avi"}
    path = tmp_path / "flows" / "a.flow.zip"
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[:-30])  # the end of the zip directory is lost
    elif damage == "garbage":
        path.write_bytes(bytes(len(data)))
    elif damage == "fewer_pairs":
        save_flow(path, q[:3], 20.0)  # a whole flow file, but not the recorded one (3 pairs, not 5)
    else:  # the meta says 5 pairs, but one pair's PNG is not in the zip
        left_out = "000004.png" if damage == "no_last_png" else "000000.png"
        with zipfile.ZipFile(path) as src:
            members = [(i.filename, src.read(i)) for i in src.infolist() if i.filename != left_out]
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as dst:
            for name, content in members:
                dst.writestr(name, content)
        with pytest.raises(ValueError, match="holds 5 members, but a flow file of 5 pairs .* holds 6"):
            flow_info(path)  # the zip directory is checked against meta.json when the file is opened
    assert set(folder.finished()) == {"b.avi"}
    assert set(folder.finished(verify=False)) == {"a.avi", "b.avi"}


def test_stack_indices_repeat_the_last_pair():
    idx = stack_indices([0, 3, 5, 9], num_pairs=6, length=3)
    assert idx.tolist() == [[0, 1, 2], [3, 4, 5], [5, 5, 5], [5, 5, 5]]
    with pytest.raises(ValueError, match="no flow pairs"):
        stack_indices([0], num_pairs=0)


def test_flow_stack_layout_interleaves_x_and_y(tmp_path):
    n, h, w, bound = 7, 4, 6, 20.0
    q = np.empty((n, 2, h, w), dtype=np.uint8)
    for i in range(n):  # pair i: x = level 10 + i, y = level 200 - i everywhere
        q[i, 0], q[i, 1] = 10 + i, 200 - i
    path = tmp_path / "v.flow.zip"
    save_flow(path, q, bound)
    stack = flow_stack(path, [1, 5], length=5, normalize=False)  # (P, 2L, H, W)
    assert stack.shape == (2, 10, h, w) and stack.dtype == np.float32
    for p, start in enumerate([1, 5]):
        for k in range(5):
            pair = min(start + k, n - 1)
            assert np.all(stack[p, 2 * k] == dequantize(np.uint8(10 + pair), bound))  # x_k
            assert np.all(stack[p, 2 * k + 1] == dequantize(np.uint8(200 - pair), bound))  # y_k
    normed = flow_stack(path, [1, 5], length=5)
    assert np.allclose(normed, stack / bound) and np.abs(normed).max() <= 1.0
    assert np.allclose(normalize_flow(torch.from_numpy(stack), bound).numpy(), normed)
    folder = FlowFolder(tmp_path / "flows")
    folder.write_quantized("a/v.mp4", q, bound)
    assert np.array_equal(folder_stack(folder, "a/v.mp4", [1, 5]), normed)


def test_flipping_a_stack_negates_x_and_mirrors(tmp_path):
    q = _levels(n=4, h=5, w=7, seed=3)
    path = tmp_path / "v.flow.zip"
    save_flow(path, q, DEFAULT_BOUND)
    stack = torch.from_numpy(flow_stack(path, [0, 2], length=2))  # (P, 4, H, W) x1 y1 x2 y2
    flipped = hflip(stack, flow=True)
    assert torch.equal(flipped[:, 0::2], -stack[:, 0::2].flip(-1))
    assert torch.equal(flipped[:, 1::2], stack[:, 1::2].flip(-1))
    # uint8 levels flip to 255 - q: the same motion as negating the dequantised x
    qs = torch.from_numpy(load_quantized(path, [0])[0].reshape(1, 2, 5, 7))
    fq = hflip(qs, flow=True)
    assert torch.allclose(torch.from_numpy(dequantize(fq.numpy())), hflip(torch.from_numpy(dequantize(qs.numpy())),
                                                                         flow=True), atol=1e-5)


def _read_jpgs(folder):
    xs, ys = jpg_files(folder)
    return np.stack([np.stack([cv2.imread(str(x), cv2.IMREAD_GRAYSCALE), cv2.imread(str(y), cv2.IMREAD_GRAYSCALE)])
                     for x, y in zip(xs, ys)])  # (N, 2, H, W)


def test_jpg_import_and_export_of_the_shared_flow_folder(shared_data, tmp_path):
    src = shared_data / "flow_jpg"
    original = _read_jpgs(src)
    summary = import_jpg(src, tmp_path / "flows", bound=20.0, progress=False)
    assert (summary.done, summary.failed) == (1, {})
    folder = FlowFolder(tmp_path / "flows")
    assert set(folder.finished()) == {"flow_jpg"}
    stored, bound = load_quantized(folder.feature_path("flow_jpg"))
    assert bound == 20.0 and np.array_equal(stored, original)  # imported levels are stored exactly
    for prefix in ("", "flow_"):
        out = tmp_path / f"export{prefix}"
        assert export_jpg(folder.feature_path("flow_jpg"), out, prefix=prefix) == len(original)
        assert sorted(p.name for p in out.iterdir())[0] == f"{prefix}x_00001.jpg"
        back = _read_jpgs(out)
        assert back.shape == original.shape
        assert np.abs(back.astype(int) - original.astype(int)).max() <= 2
        assert np.array_equal(np.stack(list(read_jpg_folder(out))), back)
    # a rerun skips what is imported
    assert import_jpg(src, tmp_path / "flows", bound=20.0, progress=False).skipped == 1


def test_jpg_folder_errors(tmp_path):
    (tmp_path / "x_00001.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="do not match"):
        jpg_files(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no flow JPEGs"):
        jpg_files(empty)


def test_flow_files_read_after_decord_was_loaded(tmp_path):
    """decord bundles a zlib with soname libz.so.1: loaded before OpenCV it broke cv2's PNG decoding (flow files)."""
    import subprocess
    import sys

    q = _levels(n=2)
    save_flow(tmp_path / "v.flow.zip", q)
    code = ("from pipeline.data.video import decord_available; decord_available(); "
            "import numpy as np; from pipeline.data.flow_files import load_quantized; "
            f"print(int(load_quantized({str(tmp_path / 'v.flow.zip')!r})[0].sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == int(q.astype(np.int64).sum())
