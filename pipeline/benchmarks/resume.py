"""What a resume costs per finished video: `python -m pipeline.benchmarks.resume [--sizes 1000 10000 100000] [--quick]`.

Generates, in a temporary folder, a flow folder and a feature folder of N finished videos (a flow file of 250 pairs
and a (300, 2048) float16 feature file, copied once into each of 100 class folders and hard-linked there for each
video; the manifest in 3 rank shards), then times what a rerun with nothing left to do checks, per video, for each N side by side:

- flow: `FlowFolder.finished()` as a rerun of `eleatt flow` calls it (a `stat` per file against the size and time
  its record noted), and the reference measured in the same run: the full check of the zip's directory (every
  pair's member), which every record gets without those fields (records written before them, or files touched
  since). The ratio is reference / check.
- extract: `FeatureFolder.finished()` (the .npy header of each file, once per run), and `finished(verify=False)`
  (the manifest read and each record's path checked inside the folder: the part every pass pays).

Per-video costs that stay flat from 1k to 100k are linear totals. Warm page cache (the files were just written).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.data.features import FeatureFolder
from pipeline.data.flow_files import FlowFolder
from pipeline.errors import quiet_broken_pipe

PAIRS = 250  # a 10 s clip at 25 fps
STEPS, DIM = 300, 2048  # Kinetics-size features


def _names(n: int) -> list[str]:
    return [f"class{i % 100:03d}/video{i:07d}.mp4" for i in range(n)]


def _fill(folder: FeatureFolder, first: dict, source: Path, n: int) -> list[dict]:
    """N records over 3 rank shards, their files hard links of one copy of `source` per class folder (a file system
    allows some 65k links to a file); a flow record notes its own copy's size and time."""
    records = []
    copies: dict[Path, Path] = {}
    for name in _names(n):
        target = folder.feature_path(name)
        copy = copies.get(target.parent)
        if copy is None:
            target.parent.mkdir(exist_ok=True)
            if target != source:
                shutil.copyfile(source, target)
            copy = copies[target.parent] = target
        elif target != copy:
            os.link(copy, target)
        record = {**first, "video": name, "feature": folder.relative(target)}
        if "mtime_ns" in first:
            stat = copy.stat()
            record.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
        records.append(record)
    _write_shards(folder.root, records)
    return records


def _write_shards(root: Path, records: list[dict]) -> None:
    for old in root.glob("manifest*.jsonl"):
        old.unlink()
    for k in range(3):
        (root / f"manifest.rank{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[k::3]))


def _timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    count = len(fn())
    return time.perf_counter() - start, count


def measure(base: Path, n: int, reference: bool) -> dict[str, float]:
    rng = np.random.default_rng(0)
    flow = FlowFolder(base / f"flow{n}")
    first = flow.write_quantized(_names(1)[0], rng.integers(0, 256, (PAIRS, 2, 16, 20), dtype=np.uint8), 20.0)
    records = _fill(flow, {k: v for k, v in first.items() if k not in ("video", "feature")},
                    flow.feature_path(first["video"]), n)
    out: dict[str, float] = {}
    seconds, count = _timed(lambda: FlowFolder(flow.root).finished())
    assert count == n, count
    out["flow check"] = seconds / n
    if reference:
        _write_shards(flow.root, [{k: v for k, v in r.items() if k not in ("bytes", "mtime_ns")} for r in records])
        seconds, count = _timed(lambda: FlowFolder(flow.root).finished())
        assert count == n, count
        out["flow full check (reference)"] = seconds / n

    features = FeatureFolder(base / f"features{n}")
    first = features.write(_names(1)[0], np.ones((STEPS, DIM), np.float16))
    _fill(features, {k: v for k, v in first.items() if k not in ("video", "feature")},
          features.feature_path(first["video"]), n)
    seconds, count = _timed(lambda: FeatureFolder(features.root).finished())
    assert count == n, count
    out["extract check"] = seconds / n
    seconds, count = _timed(lambda: FeatureFolder(features.root).finished(verify=False))
    out["manifest pass"] = seconds / n
    return out


KEYS = ("flow check", "flow full check (reference)", "extract check", "manifest pass")


def format_table(rows: dict[int, dict[str, float]]) -> list[str]:
    """The printed table: microseconds per video for each N (seconds per video in `rows`), '-' where not measured;
    the reference's ratio to the stat check over the sizes where both were measured; the totals at the largest N."""
    sizes = sorted(rows)
    lines = [f"{'us per finished video':<32}" + "".join(f"{n:>12,}" for n in sizes)]
    for key in KEYS:
        cells = "".join(f"{rows[n][key] * 1e6:>12.1f}" if key in rows[n] else f"{'-':>12}" for n in sizes)
        lines.append(f"{key:<32}{cells}")
    ratios = [rows[n][KEYS[1]] / rows[n][KEYS[0]] for n in sizes if KEYS[1] in rows[n]]
    if ratios:
        lines.append(f"flow resume: the full check takes {min(ratios):.0f}-{max(ratios):.0f}x the stat check "
                     f"({PAIRS} pairs a file)")
    largest = sizes[-1]
    lines.append(f"at {largest:,} videos: flow resume {rows[largest][KEYS[0]] * largest:.1f} s, extract resume "
                 f"{rows[largest][KEYS[2]] * largest:.1f} s")
    return lines


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.resume", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000], help="finished videos")
    p.add_argument("--reference-up-to", type=int, default=10_000,
                   help="measure the full flow check only up to this N (it reads every zip directory)")
    p.add_argument("--quick", action="store_true", help="sizes 1000 and 5000")
    args = p.parse_args(argv)
    sizes = [1000, 5000] if args.quick else args.sizes
    if min(sizes) < 1:
        p.error(f"--sizes {' '.join(map(str, sizes))}: each must be at least 1 video")
    rows: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="eleatt-resume-") as tmp:
        for n in sizes:
            rows[n] = measure(Path(tmp), n, reference=n <= args.reference_up_to)
    print("\n".join(format_table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
