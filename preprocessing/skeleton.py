"""`eleatt prepare ntu-skeleton`: NTU RGB+D `.skeleton` files -> a skeleton feature folder and the lists.

    <out>/features/                     the feature folder: float32 (T, 150) per file (pipeline/data/skeleton.py),
                                        settings.json (modality "skeleton"), manifest.jsonl, failed.jsonl
    <out>/lists/<protocol>/             train.txt, val.txt, test.txt, classes.txt (and problems.txt when inputs fail)

The protocol split is `preprocessing.splits.scan_ntu` (file names SsssCcccPpppRrrrAaaa), and val.txt is held out
from the training files in whole performers by `preprocessing.splits.finish`, as for the NTU videos. The features
of a file do not depend on the protocol or the benchmark: one `--out` per dataset serves all its protocols, and a
rerun converts only the files not finished yet.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from pipeline.data.features import FeatureFolder, FeatureSettings
from pipeline.data.lists import ListEntry, read_text_lines
from pipeline.data.skeleton import CENTRE_JOINT, FEATURE_DIM, NUM_BODIES, NUM_JOINTS, load_skeleton
from pipeline.errors import EXIT_INTERRUPTED, InputNotFoundError, UsageError
from preprocessing.splits import NTU_BENCHMARKS, NTU_NAME, finish, scan_ntu

SUFFIX = ".skeleton"
SETTINGS = FeatureSettings(
    modality="skeleton", backbone=None, dtype="float32", dim=FEATURE_DIM,
    options={
        "bodies": NUM_BODIES,
        "joints": NUM_JOINTS,
        "layout": "body-major: body, joint (NTU order), x/y/z in metres",
        "centre": f"joint {CENTRE_JOINT + 1} (middle of the spine) of the first frame with a body",
        "selection": "two most active bodies (position variance), frames without a body dropped",
    },
)


def read_missing_list(path: str | os.PathLike) -> set[str]:
    """The sample names (SsssCcccPpppRrrrAaaa) of NTU's samples_with_missing_skeletons.txt; `#` comments, blank
    lines and a `.skeleton` ending are tolerated."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"--missing-list '{path}' not found (NTU's samples_with_missing_skeletons.txt)")
    names = set()
    for n, line in enumerate(read_text_lines(path, "--missing-list", "one NTU sample name a line"), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        name = PurePosixPath(text).name
        m = NTU_NAME.match(name)
        if not m or name[m.end():] not in ("", SUFFIX):
            raise UsageError(f"{path}:{n}: expected an NTU sample name like S001C002P005R002A008, got {text!r}")
        names.add(name[: m.end()])
    return names


def _sample_name(entry: ListEntry) -> str:
    return PurePosixPath(entry.path).name[: -len(SUFFIX)]


def _convert(job: tuple[str, str, bool]) -> tuple[str, np.ndarray | None, str | None]:
    """(list path, file path, keep truncated) -> (list path, float32 (T, 150) or None, error or None)."""
    video, file, keep_truncated = job
    try:
        return video, load_skeleton(file, allow_truncated=keep_truncated), None
    except (ValueError, OSError) as err:  # SkeletonFormatError is a ValueError; every message names the file
        return video, None, str(err)


def convert(root: Path, entries: list[ListEntry], folder: FeatureFolder, workers: int = 0,
            keep_truncated: bool = False, progress: bool = True) -> tuple[int, dict[str, str]]:
    """Converts the files of `entries` not finished in `folder` yet. Returns (converted now, {video: error})."""
    done = folder.finished()
    todo = [e.path for e in entries if e.path not in done]
    jobs = [(video, str(root / video), keep_truncated) for video in todo]
    failures: dict[str, str] = {}
    converted = 0
    bar = tqdm(total=len(jobs), unit="file", desc="skeletons", disable=not progress or not jobs, dynamic_ncols=True)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_convert, jobs, chunksize=16) if pool else map(_convert, jobs)
        for video, feats, error in results:
            if error is not None:
                failures[video] = error
                folder.record_failure(video, error)
            else:
                folder.write(video, feats)  # one writer (this process): the manifest stays whole
                converted += 1
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return converted, failures


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skeletons", required=True, type=Path,
                   help="folder searched (recursively) for SsssCcccPpppRrrrAaaa.skeleton files")
    p.add_argument("--benchmark", choices=tuple(NTU_BENCHMARKS), default="ntu60", help="default: ntu60")
    p.add_argument("--protocol", choices=("cs", "cv", "cset"), default="cs",
                   help="cs: cross-subject, cv: cross-view (ntu60), cset: cross-setup (ntu120); default: cs")
    p.add_argument("--out", required=True, type=Path,
                   help="output root: <out>/features (the feature folder, shared by the protocols) and "
                        "<out>/lists/<protocol> (train/val/test.txt, classes.txt)")
    p.add_argument("--missing-list", type=Path, default=None, metavar="FILE",
                   help="NTU's samples_with_missing_skeletons.txt: these samples are left out of the lists")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training files held out as val.txt, in whole performers (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default: 0)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes parsing files (default: min(4, CPUs); 0 or 1: in this process)")
    p.add_argument("--keep-truncated", action="store_true",
                   help="keep the whole frames of files that end early (default: report them as failed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Converts the files and writes the lists; returns 0, or 3 when files failed or were skipped (each listed)."""
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction {args.val_fraction}: a fraction in [0, 1) is needed")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: must be >= 0")
    missing = read_missing_list(args.missing_list) if args.missing_list else set()
    prepared = scan_ntu(args.skeletons, args.benchmark, args.protocol, suffix=SUFFIX, flag="--skeletons")
    if missing:
        before = len(prepared.train) + len(prepared.test)
        prepared.train = [e for e in prepared.train if _sample_name(e) not in missing]
        prepared.test = [e for e in prepared.test if _sample_name(e) not in missing]
        dropped = before - len(prepared.train) - len(prepared.test)
        prepared.notes.append(f"{dropped} samples of --missing-list {args.missing_list.name} left out")

    folder = FeatureFolder(args.out / "features")
    entries = prepared.train + prepared.test
    # Held as `extract` holds its folder: clearing stale temporaries with another writer at work would delete its
    # half-written files, and two writers would convert every file twice.
    with folder.lock("prepare ntu-skeleton"):
        folder.check_settings(SETTINGS)
        folder.remove_stale_temporaries()
        try:
            converted, failures = convert(args.skeletons, entries, folder, args.workers, args.keep_truncated,
                                          progress=not args.no_progress)
        except KeyboardInterrupt:
            done = len(folder.finished())
            print(f"eleatt prepare ntu-skeleton: interrupted; {done} files are converted in {folder.root} and kept. "
                  "Rerun the same command to convert the rest.", file=sys.stderr)
            return EXIT_INTERRUPTED
    if failures:
        # No features, so out of the lists (training refuses lists with missing features); each one is reported.
        prepared.train = [e for e in prepared.train if e.path not in failures]
        prepared.test = [e for e in prepared.test if e.path not in failures]
        prepared.problems += [failures[v] for v in sorted(failures)]
    prepared.notes.insert(0, f"features: {converted} files converted now, {len(entries) - converted - len(failures)} "
                             f"already done, {len(failures)} failed (left out of the lists) -> {folder.root}")
    prepared.title = f"ntu-skeleton {prepared.title}"
    return finish(prepared, args.out / "lists" / args.protocol, val_fraction=args.val_fraction, seed=args.seed)
