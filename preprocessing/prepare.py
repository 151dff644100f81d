"""`eleatt prepare DATASET ...`: the command that writes train/val/test lists and classes.txt for a dataset.

The list makers live in `preprocessing.splits` (official split files, NTU names, Kinetics CSVs, folders of classes),
the skeleton features (NTU .skeleton files, pyskl annotation files) in `preprocessing.skeleton`, the generated
dataset in `preprocessing.synthetic`; this module only builds the command line over them (so none of them imports
another's command).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE
from pipeline.paths import ensure_writable_dir
from preprocessing.splits import (
    NTU_BENCHMARKS, PROBLEMS_FILE, VIDEO_EXTENSIONS, _check_ext, filter_lists, finish, parse_hmdb, parse_kinetics,
    parse_ucf101, print_problems, scan_folder, scan_ntu,
)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in [0, 1) is needed")
    return value


def _common(p: argparse.ArgumentParser, val: bool = True, check: bool = True, ext: bool = True) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder for train/val/test.txt and classes.txt")
    if val:
        p.add_argument(
            "--val-fraction", type=_fraction, default=0.1,
            help="fraction of the training videos held out as val.txt, in whole source groups (default: 0.1)",
        )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default: 0)")
    if check:
        p.add_argument("--check-root", type=Path, metavar="DIR",
                       help="report listed videos missing under DIR (exit 3, all listed in <out>/problems.txt)")
        p.add_argument("--drop-missing", action="store_true",
                       help="with --check-root: leave missing videos out of the lists (still exit 3)")
    p.add_argument("--drop-collisions", action="store_true",
                   help="leave out videos whose flow and feature files would share a name (x.avi and x.mp4: files "
                        "are named by the path without its extension), listed, exit 3 (default: refuse, naming them)")
    if ext:
        p.add_argument("--ext", type=str, default=None, metavar="EXT",
                       help="replace the listed files' extension, e.g. .mp4 for re-encoded copies, '' for "
                            "raw-frame folders (default: keep as written)")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import add_subcommands, command_parser

    parser = command_parser(
        prog="eleatt prepare", config=False,
        description="Write train.txt, val.txt, test.txt and classes.txt (lines '<relative path> <0-based label>') "
        "for a dataset. Exit 0 when all is done, 3 when inputs were skipped or missing (each listed), 2 on "
        "usage errors.",
    )
    sub = add_subcommands(parser, dest="dataset", required=True, metavar="DATASET")

    p = sub.add_parser("ucf101", help="UCF101 from ucfTrainTestlist/ (classInd.txt, trainlist0N, testlist0N)",
                       description="UCF101: labels from classInd.txt in its own order; val held out in whole gNN "
                       "groups of the training split.")
    p.add_argument("--splits-dir", required=True, type=Path, help="the ucfTrainTestlist folder")
    p.add_argument("--split", type=int, choices=(1, 2, 3), default=1, help="official split (default: 1)")
    _common(p)

    for name, folder in (("hmdb51", "testTrainMulti_7030_splits"), ("jhmdb", "splits")):
        p = sub.add_parser(name, help=f"{name.upper()} from <class>_test_split<N>.txt files",
                           description=f"{name.upper()}: lines '<video> <id>' with 1 train, 2 test, 0 unused; classes "
                           "sorted by name; val held out in whole source videos (the clip name without its HMDB "
                           "tags, clip number and class).")
        p.add_argument("--splits-dir", required=True, type=Path, help=f"the folder of split files (e.g. {folder}/)")
        p.add_argument("--split", type=int, choices=(1, 2, 3), default=1, help="official split (default: 1)")
        _common(p)

    p = sub.add_parser("ntu", help="NTU RGB+D 60/120 from the file names found under --videos",
                       description="NTU RGB+D: labels from SsssCcccPpppRrrrAaaa names (A-1); cs: cross-subject, "
                       "cv: cross-view (ntu60), cset: cross-setup (ntu120); val held out in whole performers.")
    p.add_argument("--videos", required=True, type=Path, help="folder searched (recursively) for the NTU files")
    p.add_argument("--benchmark", choices=tuple(NTU_BENCHMARKS), default="ntu60", help="default: ntu60")
    p.add_argument("--protocol", choices=("cs", "cv", "cset"), default="cs", help="default: cs")
    p.add_argument("--suffix", default="_rgb.avi",
                   help="file name ending after the id (default: _rgb.avi; .skeleton for skeleton files)")
    _common(p, check=False, ext=False)

    p = sub.add_parser("kinetics", help="Kinetics from the official train/validate/test CSVs",
                       description="Kinetics: CSVs parsed by header names; paths <split>/<id>_<start:06d>_<end:06d>"
                       ".mp4; unlabeled test rows get -1; val.txt is the official validation set.")
    p.add_argument("--csv-dir", required=True, type=Path, help="folder of train.csv, validate.csv, test.csv")
    p.add_argument("--by-label", action="store_true", help="paths <split>/<label>/<file> (videos sorted by class)")
    _common(p, val=False)

    p = sub.add_parser("folder", help="a folder-per-class tree <root>/<class>/<video>",
                       description="A folder per class (classes sorted by name); test and val drawn by seed, "
                       "stratified by class, in whole groups when --group-regex names them.")
    p.add_argument("--root", required=True, type=Path, help="folder holding one sub-folder per class")
    p.add_argument("--test-fraction", type=_fraction, default=0.2,
                   help="fraction of the videos for test (default: 0.2)")
    p.add_argument("--group-regex", default=None,
                   help="regex on file names whose first group (or match) names a source group kept on one side, "
                        r"e.g. '_g(\d+)_' (default: every video is its own group)")
    p.add_argument("--extensions", nargs="+", default=list(VIDEO_EXTENSIONS), metavar="EXT",
                   help="video file extensions taken (default: %(default)s); sub-folders of images count as videos")
    _common(p, check=False, ext=False)

    p = sub.add_parser("filter", help="lists without the videos that failed in flow or extract (all streams alike)",
                       description="Write train/val/test/all.txt and classes.txt of --lists into --out without the "
                       "videos that any of --folders (flow folders of `eleatt flow`, feature folders of `eleatt "
                       "extract`) has not finished, so that every stream trains and is tested on the same videos; "
                       f"{PROBLEMS_FILE} in --out names each video left out, the folder and the reason. Exit 3 when "
                       "videos were left out, 0 when none.")
    p.add_argument("--lists", required=True, type=Path, help="folder of the lists (train.txt, val.txt, test.txt, "
                                                             "classes.txt)")
    p.add_argument("--folders", required=True, nargs="+", type=Path, metavar="DIR",
                   help="the flow and feature folders made from these lists, e.g. data/flow data/features/rgb "
                        "data/features/flow")
    p.add_argument("--out", required=True, type=Path, help="folder for the filtered lists (not --lists itself)")

    from preprocessing.skeleton import add_arguments as add_skeleton_arguments

    p = sub.add_parser("ntu-skeleton", help="NTU RGB+D .skeleton files -> a skeleton feature folder and lists",
                       description="NTU RGB+D 3D skeletons: float32 (T, 150) features (two most active bodies, "
                       "centred on the spine) in <out>/features and the protocol's lists in <out>/lists/<protocol>; "
                       "val held out in whole performers. Malformed files are listed and left out (exit 3).")
    add_skeleton_arguments(p)

    from preprocessing.skeleton import add_pyskl_arguments

    p = sub.add_parser("pyskl", help="a pyskl/mmaction2 skeleton annotation file -> skeleton feature folders and lists",
                       description="pyskl/mmaction2 annotation pickles ({split, annotations}), read by an unpickler "
                       "that builds only plain data (a file asking for anything else is refused, nothing of it "
                       "run): the first two bodies per sample, 3D centred as ntu-skeleton does, 2D scaled by the "
                       "image size; lists from the file's splits, val held out in whole performers (NTU names). "
                       "Samples that cannot be used are listed and left out (exit 3).")
    add_pyskl_arguments(p)

    from preprocessing.synthetic import add_arguments

    p = sub.add_parser("synthetic", help="generate the order-only synthetic dataset (videos + lists)",
                       description="Generate small lossless H.264 videos whose classes differ only in temporal "
                       "order (pairs: grow/shrink, move right/left, rotate cw/ccw, brighten/darken, hue "
                       "forward/backward), with train/val/test lists and classes.txt.")
    add_arguments(p)
    return parser


def _synthetic(args: argparse.Namespace) -> int:
    from preprocessing.synthetic import DESCRIPTIONS, make_dataset

    start = time.perf_counter()
    summary = make_dataset(args.out, videos_per_class=args.videos_per_class, num_frames=args.frames,
                           size=args.size, seed=args.seed, classes=args.classes, fps=args.fps)
    seconds = time.perf_counter() - start
    print(f"eleatt prepare synthetic: {len(summary['classes'])} classes, {summary['num_videos']} videos of "
          f"{args.frames} frames at {args.size}x{args.size}, {args.fps} fps, seed {args.seed} ({seconds:.1f} s)")
    for name in ("train", "val", "test"):
        print(f"  {name + '.txt':<12}{summary['counts'][name]:>8} videos")
    print(f"  {'classes.txt':<12}{len(summary['classes']):>8} names")
    for label, name in enumerate(summary["classes"]):
        print(f"    {label:>2} {name:<13} {DESCRIPTIONS[name]}")
    print(f"  written to {args.out}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`eleatt prepare DATASET ...`; returns 0, 3 (inputs skipped or missing, each listed) or 2 (usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed by argparse)
        return int(stop.code or 0)
    ensure_writable_dir(args.out, "--out")  # before any work: an unwritable --out is one line, exit 2
    if args.dataset == "synthetic":
        return _synthetic(args)
    if args.dataset == "ntu-skeleton":
        from preprocessing.skeleton import run

        return run(args)
    if args.dataset == "pyskl":
        from preprocessing.skeleton import run_pyskl

        return run_pyskl(args)
    if args.dataset == "filter":
        return _filter(args)
    if getattr(args, "drop_missing", False) and args.check_root is None:
        print("eleatt prepare: error: --drop-missing needs --check-root DIR", file=sys.stderr)
        return EXIT_USAGE
    ext = _check_ext(getattr(args, "ext", None))
    if args.dataset == "ucf101":
        prepared = parse_ucf101(args.splits_dir, args.split, ext=ext)
    elif args.dataset in ("hmdb51", "jhmdb"):
        prepared = parse_hmdb(args.splits_dir, args.split, dataset=args.dataset, ext=ext)
    elif args.dataset == "ntu":
        prepared = scan_ntu(args.videos, args.benchmark, args.protocol, args.suffix)
    elif args.dataset == "kinetics":
        prepared = parse_kinetics(args.csv_dir, by_label=args.by_label, ext=ext)
    else:
        exts = [e if e.startswith(".") else f".{e}" for e in args.extensions]
        prepared = scan_folder(args.root, args.test_fraction, args.seed, args.group_regex, exts)
    return finish(
        prepared,
        args.out,
        val_fraction=getattr(args, "val_fraction", 0.0),
        seed=args.seed,
        check_root=getattr(args, "check_root", None),
        drop_missing=getattr(args, "drop_missing", False),
        collisions="drop" if args.drop_collisions else "refuse",
    )


def _filter(args: argparse.Namespace) -> int:
    problems = filter_lists(args.lists, args.folders, args.out)
    kept = sum(1 for line in (args.out / "all.txt").read_text(encoding="utf-8").splitlines() if line.strip())
    print(f"eleatt prepare filter: {kept} videos kept, {len(problems)} left out -> {args.out}")
    print_problems(problems, args.out / PROBLEMS_FILE, "eleatt prepare filter")
    return EXIT_SOME_FAILED if problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
