"""`eleatt prepare ntu-skeleton` and `eleatt prepare pyskl`: skeletons -> skeleton feature folders and the lists.

    <out>/features/                     the joint stream: float32 (T, 150) per file (pipeline/data/skeleton.py),
                                        settings.json (modality "skeleton"), manifest.jsonl, failed.jsonl
    <out>/features_<stream>/            with --streams: bone, joint_motion, bone_motion, derived from features/
                                        (`pipeline.data.skeleton.derive_stream`), same names and shapes
    <out>/lists/<protocol>/             train.txt, val.txt, test.txt, classes.txt (and problems.txt when inputs fail)

`ntu-skeleton` reads NTU's `.skeleton` files (with the dataset authors' noise filter unless --no-denoise);
`pyskl` reads a pyskl/mmaction2 annotation pickle through the restricted unpickler of pipeline/data/pyskl.py and
takes its splits (xsub_train/xsub_val, ...) from the file. The same sample gives the same arrays either way.

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
from pipeline.data.lists import ListEntry, read_classes, read_text_lines
from pipeline.data.skeleton import (
    BONES_BY_JOINTS, CENTRE_JOINT, FEATURE_DIM, NOISE_MAX_FRAMES, NOISE_SPREAD, NOISE_SPREAD_FRACTION, NUM_BODIES,
    NUM_JOINTS, STREAMS,
    NoiseCounts, derive_stream, skeleton_features,
)
from pipeline.errors import EXIT_INTERRUPTED, InputNotFoundError, UsageError
from preprocessing.splits import NTU_ACTIONS, NTU_BENCHMARKS, NTU_NAME, Prepared, finish, ntu_performer, scan_ntu

SUFFIX = ".skeleton"
DERIVED = {
    "bone": "per joint, the joint minus its parent (NTU pairs); joint 21 zero",
    "joint_motion": "x[t+1] - x[t] of the joints, last step zero, zero where the body is absent at t or t+1",
    "bone_motion": "x[t+1] - x[t] of the bones, last step zero, zero where the body is absent at t or t+1",
}
# The joint folder of `prepare ntu-skeleton --no-denoise`: the settings of folders made before the noise filter.
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
DENOISED_SETTINGS = SETTINGS.replace(options={
    **SETTINGS.options,
    "noise_filter": f"bodies of at most {NOISE_MAX_FRAMES} frames, then bodies with x spread > {NOISE_SPREAD} x y "
                    f"spread in >= {NOISE_SPREAD_FRACTION} of their frames, dropped when a file has several",
})


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


Result = tuple  # (video, features or None, error or None, NoiseCounts, extra manifest fields)


def _convert(job: tuple[str, str, bool, bool]) -> Result:
    """(list path, file path, keep truncated, denoise) -> a Result (what the noise filter did, no extra fields)."""
    video, file, keep_truncated, denoise = job
    try:
        feats, counts = skeleton_features(file, allow_truncated=keep_truncated, denoise=denoise)
        return video, feats, None, counts, {}
    except (ValueError, OSError) as err:  # SkeletonFormatError is a ValueError; every message names the file
        return video, None, str(err), NoiseCounts(), {}


def write_features(results, total: int, folder: FeatureFolder, desc: str = "skeletons",
                   progress: bool = True) -> tuple[int, dict[str, str], NoiseCounts]:
    """Writes Results into `folder` (one writer: the manifest stays whole), recording each failure. Returns
    (written, {video: error}, the summed noise counts of the written files)."""
    failures: dict[str, str] = {}
    written, counts = 0, NoiseCounts()
    with tqdm(total=total, unit="file", desc=desc, disable=not progress or not total, dynamic_ncols=True) as bar:
        for video, feats, error, noise, extra in results:
            if error is not None:
                failures[video] = error
                folder.record_failure(video, error)
            else:
                folder.write(video, feats, **extra)
                written += 1
                counts = counts + noise
            bar.update(1)
    return written, failures, counts


def convert(root: Path, entries: list[ListEntry], folder: FeatureFolder, workers: int = 0,
            keep_truncated: bool = False, progress: bool = True,
            denoise: bool = True) -> tuple[int, dict[str, str], NoiseCounts]:
    """Converts the files of `entries` not finished in `folder` yet. Returns (converted now, {video: error}, what
    the noise filter did to the files converted now)."""
    done = folder.finished()
    jobs = [(e.path, str(root / e.path), keep_truncated, denoise) for e in entries if e.path not in done]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_convert, jobs, chunksize=16) if pool else map(_convert, jobs)
        return write_features(results, len(jobs), folder, progress=progress)
    finally:
        if pool is not None:
            pool.terminate()


def stream_settings(joint: FeatureSettings, stream: str) -> FeatureSettings:
    """The settings of a stream folder derived from a joint folder with settings `joint`."""
    return joint.replace(options={**joint.options, "stream": stream, "derived": DERIVED[stream]})


def _layout(settings: FeatureSettings) -> dict:
    channels = settings.options.get("channels", "x, y, z")
    return {"joints": int(settings.options.get("joints", NUM_JOINTS)), "channels": len(channels.split(", ")),
            "score": channels.endswith("score")}


def derive_streams(out: Path, streams, entries: list[ListEntry], progress: bool = True) -> dict[str, str]:
    """Writes `<out>/features_<stream>` for each derived stream asked for, from the finished files of the joint
    folder `<out>/features`. A derived file is redone when its joint file changed since (size or time).
    Returns {video: error} of the files that could not be derived (each names the stream)."""
    joint = FeatureFolder(out / "features")
    layout = _layout(joint.settings)
    sources = joint.finished()
    stats: dict[str, list[int]] = {}  # video -> [size, mtime_ns] of its joint file, what a derived file records
    for e in entries:
        try:
            st = (joint.root / sources[e.path]["feature"]).stat()
        except (KeyError, OSError):  # no joint file (failed, or gone since): nothing to derive
            continue
        stats[e.path] = [st.st_size, st.st_mtime_ns]
    failures: dict[str, str] = {}
    for stream in (s for s in STREAMS if s in streams and s != "joint"):
        folder = FeatureFolder(out / f"features_{stream}")
        with folder.lock(f"prepare (the {stream} stream)"):
            folder.check_settings(stream_settings(joint.settings, stream))
            folder.remove_stale_temporaries()
            done = folder.finished()
            todo = [(video, source) for video, source in stats.items() if done.get(video, {}).get("source") != source]

            def derived(job, stream=stream) -> Result:
                video, source = job
                try:
                    return video, derive_stream(joint.load(video), stream, **layout), None, NoiseCounts(), \
                        {"source": source}
                except (ValueError, OSError) as err:
                    return video, None, f"{stream}: {err}", NoiseCounts(), {}

            failures.update(write_features(map(derived, todo), len(todo), folder, desc=stream, progress=progress)[1])
    return failures


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", nargs="+", choices=STREAMS, default=["joint"], metavar="STREAM",
                   help="streams to store: joint (always: the others derive from it), bone, joint_motion, "
                        "bone_motion, each in <out>/features_<stream> (default: joint)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training files held out as val.txt, in whole performers (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes parsing files (default: min(4, CPUs); 0 or 1: in this process)")
    p.add_argument("--keep-truncated", action="store_true",
                   help="keep the whole frames of files that end early (default: report them as failed)")
    p.add_argument("--no-denoise", action="store_true",
                   help="keep every body (default: the dataset authors' noise filter drops bodies seen in at most "
                        f"{NOISE_MAX_FRAMES} frames and bodies wider than tall, in files with several bodies)")
    _common_arguments(p)


def _check_common(args: argparse.Namespace) -> None:
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction {args.val_fraction}: a fraction in [0, 1) is needed")


def _store(args: argparse.Namespace, prepared: Prepared, command: str, settings: FeatureSettings,
           convert_todo) -> tuple[int, dict[str, str], NoiseCounts] | int:
    """Holds `<out>/features`, runs `convert_todo(folder)`, then derives the streams; the exit status 130 on
    Ctrl-C (what was written is kept), else (converted, failures, noise counts)."""
    folder = FeatureFolder(args.out / "features")
    entries = prepared.train + prepared.test
    try:
        # Held as `extract` holds its folder: clearing stale temporaries with another writer at work would delete
        # its half-written files, and two writers would convert every file twice.
        with folder.lock(command):
            folder.check_settings(settings)
            folder.remove_stale_temporaries()
            converted, failures, counts = convert_todo(folder)
        failures.update(derive_streams(args.out, args.streams, entries, progress=not args.no_progress))
    except KeyboardInterrupt:
        print(f"eleatt {command}: interrupted; {len(folder.finished())} files are converted in {folder.root} and "
              "kept. Rerun the same command to convert the rest.", file=sys.stderr)
        return EXIT_INTERRUPTED
    derived = [f"features_{s}" for s in STREAMS if s in args.streams and s != "joint"]
    prepared.notes.insert(0, f"features: {converted} files converted now, {len(entries) - converted - len(failures)}"
                             f" already done, {len(failures)} failed (left out of the lists) -> {folder.root}"
                             + (f" (and {', '.join(derived)} beside it)" if derived else ""))
    return converted, failures, counts


def _finish(args: argparse.Namespace, prepared: Prepared, failures: dict[str, str], lists: Path) -> int:
    if failures:
        # No features, so out of the lists (training refuses lists with missing features); each one is reported.
        prepared.train = [e for e in prepared.train if e.path not in failures]
        prepared.test = [e for e in prepared.test if e.path not in failures]
        prepared.problems += [failures[v] for v in sorted(failures)]
    return finish(prepared, lists, val_fraction=args.val_fraction, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    """Converts the files and writes the lists; returns 0, or 3 when files failed or were skipped (each listed)."""
    _check_common(args)
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

    denoise = not args.no_denoise
    stored = _store(args, prepared, "prepare ntu-skeleton", DENOISED_SETTINGS if denoise else SETTINGS,
                    lambda folder: convert(args.skeletons, prepared.train + prepared.test, folder, args.workers,
                                           args.keep_truncated, progress=not args.no_progress, denoise=denoise))
    if isinstance(stored, int):
        return stored
    _, failures, counts = stored
    if denoise:
        prepared.notes.insert(1, f"{counts.summary()}, in the files converted now")
    prepared.title = f"ntu-skeleton {prepared.title}"
    return _finish(args, prepared, failures, args.out / "lists" / args.protocol)


# ----------------------------------------------------------------------------------------------- pyskl
PYSKL_SPLITS = {"cs": ("xsub_train", "xsub_val"), "cv": ("xview_train", "xview_val"), "cset": ("xset_train", "xset_val")}


def add_pyskl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, type=Path, metavar="PKL",
                   help="the pyskl/mmaction2 annotation file (e.g. ntu60_3danno.pkl), read without running code")
    p.add_argument("--protocol", choices=tuple(PYSKL_SPLITS), default="cs",
                   help="cs: xsub_train/xsub_val, cv: xview_train/xview_val, cset: xset_train/xset_val; the lists "
                        "go to <out>/lists/<protocol> (default: cs)")
    p.add_argument("--splits", nargs=2, metavar=("TRAIN", "TEST"), default=None,
                   help="the file's split names to use instead (lists in <out>/lists/<TRAIN>_<TEST>)")
    p.add_argument("--out", required=True, type=Path,
                   help="output root: <out>/features (and <out>/features_<stream>) and <out>/lists/...")
    p.add_argument("--benchmark", choices=tuple(NTU_BENCHMARKS), default=None,
                   help="class names of NTU samples (default: ntu60 when every label is below 60, else ntu120)")
    p.add_argument("--classes", type=Path, default=None, metavar="FILE",
                   help="classes.txt for other datasets (default for non-NTU samples: the label numbers)")
    p.add_argument("--prefix", default="", help="put before each frame_dir to make its list path (default: none)")
    p.add_argument("--suffix", default=SUFFIX,
                   help="put after each frame_dir to make its list path (default: .skeleton, so that the lists and "
                        "feature files are those of `prepare ntu-skeleton` for the same samples)")
    _common_arguments(p)


def _pyskl_convert(annotations, entries: list[ListEntry], names: dict[str, str], folder: FeatureFolder,
                   progress: bool) -> tuple[int, dict[str, str], NoiseCounts]:
    from pipeline.data.pyskl import sample_features

    done = folder.finished()
    todo = [e.path for e in entries if e.path not in done]

    def one(video: str) -> Result:
        try:
            return video, sample_features(annotations.samples[names[video]]), None, NoiseCounts(), {}
        except ValueError as err:  # PysklFormatError, SkeletonFormatError: each names the sample
            return video, None, f"{Path(annotations.path).name}: {err}", NoiseCounts(), {}

    return write_features(map(one, todo), len(todo), folder, desc="samples", progress=progress)


def run_pyskl(args: argparse.Namespace) -> int:
    """`eleatt prepare pyskl`: features and lists from an annotation file; 0, or 3 when samples were left out."""
    from pipeline.data.pyskl import layout_of, read_annotations

    _check_common(args)
    if not args.suffix.startswith(".") or "/" in args.suffix or args.prefix.startswith("/") or ".." in args.prefix:
        raise UsageError(f"--suffix {args.suffix!r} must start with '.' (the feature file replaces it with .npy) and "
                         f"--prefix {args.prefix!r} must be a relative folder (no '..')")
    annotations = read_annotations(args.annotations)
    train_split, test_split = args.splits or PYSKL_SPLITS[args.protocol]
    for split in (train_split, test_split):
        if split not in annotations.split:
            raise UsageError(f"annotation file '{args.annotations}' has no split {split!r} (it has "
                             f"{', '.join(sorted(annotations.split)) or 'none'}); choose --protocol or --splits")
    problems = list(annotations.problems)
    ntu = all(NTU_NAME.fullmatch(n) for n in annotations.samples)
    if args.classes is not None:
        classes = read_classes(args.classes)
    elif ntu:
        benchmark = args.benchmark or ("ntu60" if annotations.max_label < 60 else "ntu120")
        classes = list(NTU_ACTIONS[:NTU_BENCHMARKS[benchmark][0]])
    else:
        classes = [str(i) for i in range(annotations.max_label + 1)]
    names: dict[str, str] = {}  # list path -> frame_dir
    parts: dict[str, list[ListEntry]] = {"train": [], "test": []}
    for part, split in (("train", train_split), ("test", test_split)):
        for name in annotations.split[split]:
            ann = annotations.samples.get(name)
            if ann is None:
                if name not in annotations.bad:
                    problems.append(f"{args.annotations.name}: {name} is in split {split} but has no annotation")
                continue
            label = int(ann["label"])
            m = NTU_NAME.fullmatch(name) if ntu else None
            if label >= len(classes) or (m and label != int(m.group(5)) - 1):
                why = f"its name says action {int(m.group(5))}" if m and label < len(classes) else \
                    f"there are {len(classes)} classes"
                problems.append(f"{args.annotations.name}: {name} has label {label} but {why}")
                continue
            path = f"{args.prefix.rstrip('/') + '/' if args.prefix else ''}{name}{args.suffix}"
            names[path] = name
            parts[part].append(ListEntry(path, label))
    layouts = {layout_of(annotations.samples[n]) for n in names.values()}
    if len(layouts) > 1:
        raise UsageError(f"annotation file '{args.annotations}' mixes keypoint layouts ({sorted(map(str, layouts))});"
                         " the samples of one feature folder need one")
    layout = layouts.pop() if layouts else None
    if layout is not None and layout.joints not in BONES_BY_JOINTS and any(s.startswith("bone") for s in args.streams):
        raise UsageError(f"--streams {' '.join(args.streams)}: bone streams need the NTU 25-joint or the COCO "
                         f"17-keypoint layout (their bone pairs), and '{args.annotations}' has {layout.joints} joints; "
                         "use joint and joint_motion")
    lists = args.out / "lists" / (f"{train_split}_{test_split}" if args.splits else args.protocol)
    prepared = Prepared(
        title=f"pyskl {args.annotations.name} {train_split}/{test_split}", classes=classes,
        train=sorted(parts["train"], key=lambda e: e.path), test=sorted(parts["test"], key=lambda e: e.path),
        group_of=ntu_performer if ntu else (lambda e: e.path), group_kind="performers" if ntu else "videos",
        problems=problems)
    if layout is None:  # nothing usable: finish names every problem
        return finish(prepared, lists, val_fraction=args.val_fraction, seed=args.seed)
    settings = FeatureSettings(
        modality="skeleton", backbone=None, dtype="float32", dim=layout.dim,
        options={"bodies": NUM_BODIES, "joints": layout.joints, "channels": layout.channels,
                 "layout": f"body-major: body, joint (the file's order), {layout.channels}",
                 "centre": (f"joint {CENTRE_JOINT + 1} of the first frame with a body" if layout.channels == "x, y, z"
                            else "none; x and y scaled to [-1, 1] by the image size"),
                 "selection": "the file's first two bodies, frames without a body dropped",
                 "source": "pyskl annotation file"})
    stored = _store(args, prepared, "prepare pyskl", settings,
                    lambda folder: _pyskl_convert(annotations, prepared.train + prepared.test, names, folder,
                                                  progress=not args.no_progress))
    if isinstance(stored, int):
        return stored
    return _finish(args, prepared, stored[1], lists)
