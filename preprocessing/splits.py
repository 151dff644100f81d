"""`eleatt prepare`: official split files, NTU file names, class folders or the generated dataset -> the lists.

Every dataset ends as `train.txt`, `val.txt`, `test.txt`, `all.txt` (the three together, for `eleatt flow` and
`eleatt extract`) and `classes.txt` in `--out` (the list format of pipeline/data/lists.py). Where the protocol has
no validation split, `val.txt` holds `--val-fraction` of the training videos, drawn by `--seed` in whole source
groups (UCF101 `gNN`, NTU performers, HMDB51/JHMDB source videos), so that no source straddles train and val and
model selection never looks at the test split.

Two videos whose outputs would collide (`x.avi` and `x.mp4`: flow and feature files are named by the list path
without its extension) are refused, naming both (`collisions="drop"`: both left out, listed, exit 3).
`filter_lists` is the one policy for videos that failed in a stage: the lists of the videos every given folder
finished, and `problems.jsonl` naming each video left out, the stage and the reason (`eleatt prepare filter`,
and `eleatt run` between extraction and training).
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import numpy as np

from pipeline.data.lists import ListEntry, read_classes, read_list, read_text_lines, write_classes, write_list
from pipeline.paths import atomic_write, ensure_writable_dir

from pipeline.errors import EXIT_OK, EXIT_SOME_FAILED as EXIT_INCOMPLETE, InputNotFoundError, UsageError
MAX_LISTED = 20  # problems printed to the terminal; all of them go to a file in --out
SPLITS = ("train", "val", "test")
ALL_LIST = "all.txt"  # train, val and test in one list: what `eleatt flow` and `eleatt extract` take
PROBLEMS_FILE = "problems.jsonl"  # filter_lists: one {"video", "stage", "reason"} a line

# NTU RGB+D cross-subject training performers (Shahroudy et al. 2016; Liu et al. 2019 adds the second row).
NTU60_TRAIN_SUBJECTS = frozenset({1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38})
NTU120_TRAIN_SUBJECTS = NTU60_TRAIN_SUBJECTS | {
    45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89, 91, 92, 93,
    94, 95, 97, 98, 100, 103,
}
NTU60_CV_TRAIN_CAMERAS = frozenset({2, 3})
NTU_NAME = re.compile(r"^S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
# Action names A1..A120 as in the dataset's README (github.com/shahroudy/NTURGB-D); A1..A60 are NTU RGB+D 60.
NTU_ACTIONS: tuple[str, ...] = (
    "drink water", "eat meal/snack", "brushing teeth", "brushing hair", "drop", "pickup", "throw", "sitting down",
    "standing up (from sitting position)", "clapping", "reading", "writing", "tear up paper", "wear jacket",
    "take off jacket", "wear a shoe", "take off a shoe", "wear on glasses", "take off glasses", "put on a hat/cap",
    "take off a hat/cap", "cheer up", "hand waving", "kicking something",
    "put something inside pocket / take out something from pocket", "hopping (one foot jumping)", "jump up",
    "make a phone call/answer phone", "playing with phone/tablet", "typing on a keyboard",
    "pointing to something with finger", "taking a selfie", "check time (from watch)", "rub two hands together",
    "nod head/bow", "shake head", "wipe face", "salute", "put the palms together", "cross hands in front (say stop)",
    "sneeze/cough", "staggering", "falling", "touch head (headache)", "touch chest (stomachache/heart pain)",
    "touch back (backache)", "touch neck (neckache)", "nausea or vomiting condition",
    "use a fan (with hand or paper)/feeling warm", "punching/slapping other person", "kicking other person",
    "pushing other person", "pat on back of other person", "point finger at the other person",
    "hugging other person", "giving something to other person", "touch other person's pocket", "handshaking",
    "walking towards each other", "walking apart from each other",
    # NTU RGB+D 120 only
    "put on headphone", "take off headphone", "shoot at the basket", "bounce ball", "tennis bat swing",
    "juggling table tennis balls", "hush (quite)", "flick hair", "thumb up", "thumb down", "make ok sign",
    "make victory sign", "staple book", "counting money", "cutting nails", "cutting paper (using scissors)",
    "snapping fingers", "open bottle", "sniff (smell)", "squat down", "toss a coin", "fold paper", "ball up paper",
    "play magic cube", "apply cream on face", "apply cream on hand back", "put on bag", "take off bag",
    "put something into a bag", "take something out of a bag", "open a box", "move heavy objects", "shake fist",
    "throw up cap/hat", "hands up (both hands)", "cross arms", "arm circles", "arm swings", "running on the spot",
    "butt kicks (kick backward)", "cross toe touch", "side kick", "yawn", "stretch oneself", "blow nose",
    "hit other person with something", "wield knife towards other person",
    "knock over other person (hit with body)", "grab other person's stuff", "shoot at other person with a gun",
    "step on foot", "high-five", "cheers and drink", "carry something with other person",
    "take a photo of other person", "follow other person", "whisper in other person's ear",
    "exchange things with other person", "support somebody with one's hand (someone is sick, help him to walk)",
    "finger-guessing game (playing rock-paper-scissors)",
)
assert len(NTU_ACTIONS) == 120
NTU_BENCHMARKS = {"ntu60": (60, 17), "ntu120": (120, 32)}  # (actions, setups)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class Prepared:
    """A dataset's lists before writing. `val is None` means: hold out part of `train` by `group_of`."""

    title: str
    classes: list[str]
    train: list[ListEntry]
    test: list[ListEntry]
    val: list[ListEntry] | None = None
    group_of: Callable[[ListEntry], str] | None = None
    group_kind: str = "videos"
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # inputs that were skipped: exit 3, each listed


# --------------------------------------------------------------------------------------------------- helpers
def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; CRLF and a UTF-8 BOM are tolerated. A file in another
    encoding, or one without a single line, raises ValueError naming it and what was expected."""
    lines = [(n, line.strip()) for n, line in
             enumerate(read_text_lines(path, "split file", "the official split format"), 1) if line.strip()]
    if not lines:
        raise UsageError(f"split file '{path}' is empty; expected the official split lines (is it the right file, "
                         "or was its download cut short?)")
    return lines


def _deduplicate(lists: dict[str, list[ListEntry]]) -> tuple[dict[str, list[ListEntry]], list[str]]:
    """Drops repeated videos: a second line of a video within a list, and a training/validation video that the test
    list also holds (it would leak the test set into training; the test list is kept whole). Returns the lists and
    one problem line per dropped entry (reported, exit 3)."""
    problems: list[str] = []
    test_videos = {e.path for e in lists.get("test", [])}
    out: dict[str, list[ListEntry]] = {}
    for name, entries in lists.items():
        seen: dict[str, ListEntry] = {}
        kept = []
        for entry in entries:
            if entry.path in seen:
                other = seen[entry.path]
                same = "the same label" if other.label == entry.label else f"labels {other.label} and {entry.label}"
                problems.append(f"{entry.path}: listed twice in {name} ({same}); kept once")
                continue
            if name != "test" and entry.path in test_videos:
                problems.append(f"{entry.path}: in both {name} and test; left out of {name}")
                continue
            seen[entry.path] = entry
            kept.append(entry)
        out[name] = kept
    return out, problems


def output_stem(video: str) -> str:
    """The name a video's flow and feature files get: its list path without the extension (FeatureFolder's rule,
    `<dir>/<list path without extension>.npy`), so `c/x.avi`, `c/x.mp4` and a frame folder `c/x` share `c/x`."""
    path = video.replace("\\", "/")
    if "//" in path or "/./" in path or path.startswith("./") or path.endswith(("/", "/.")) or path in ("", "."):
        path = PurePosixPath(path).as_posix()  # the rare path that needs normalising (a string op otherwise: 650k
    return os.path.splitext(path)[0]           # PurePosixPath objects cost ~6 s of `prepare` at Kinetics size)


def find_collisions(entries: Iterable[ListEntry]) -> list[list[str]]:
    """The groups of two or more distinct videos whose outputs would share one name (`output_stem`), in list
    order."""
    groups: dict[str, dict[str, None]] = defaultdict(dict)  # stem -> its videos, in order, each once (O(1) each)
    for entry in entries:
        groups[output_stem(entry.path)][entry.path] = None
    return [list(paths) for paths in groups.values() if len(paths) > 1]


def drop_collisions(prepared: Prepared) -> list[tuple[str, str]]:
    """Leaves every video of a colliding group out of `prepared`'s lists, adds a problem line for each and
    returns (video, reason) pairs."""
    lists = [prepared.train, prepared.test] + ([prepared.val] if prepared.val is not None else [])
    groups = find_collisions(e for entries in lists for e in entries)
    dropped: list[tuple[str, str]] = []
    for paths in groups:
        for path in paths:
            others = " and ".join(repr(p) for p in paths if p != path)
            dropped.append((path, f"its flow and feature files would have the name of {others} "
                                  f"('{output_stem(path)}', the path without its extension): rename one to keep both"))
    gone = {video for video, _ in dropped}
    prepared.train = [e for e in prepared.train if e.path not in gone]
    prepared.test = [e for e in prepared.test if e.path not in gone]
    if prepared.val is not None:
        prepared.val = [e for e in prepared.val if e.path not in gone]
    prepared.problems += [f"{video}: left out: {reason}" for video, reason in dropped]
    return dropped


def refuse_collisions(prepared: Prepared) -> None:
    """A UsageError naming the first pair of videos whose outputs would collide, and the fixes."""
    lists = [prepared.train, prepared.test] + ([prepared.val] if prepared.val is not None else [])
    groups = find_collisions(e for entries in lists for e in entries)
    if groups:
        first = groups[0]
        more = f" ({len(groups) - 1} more such groups)" if len(groups) > 1 else ""
        raise UsageError(
            f"videos {' and '.join(repr(p) for p in first)} would share their flow and feature files "
            f"('{output_stem(first[0])}': outputs are named by the path without its extension){more}; rename one of "
            "them, or pass --drop-collisions to leave such videos out (listed in problems.txt, exit 3)"
        )


def _require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise InputNotFoundError(f"{what} '{path}' not found ({fix})")
    return path


def _with_ext(path: str, ext: str | None) -> str:
    """`path` with its extension replaced by `ext` ('' drops it, e.g. for raw-frame folders); None keeps it."""
    return path if ext is None else str(PurePosixPath(path).with_suffix(ext))


def _check_ext(ext: str | None) -> str | None:
    if ext is not None and ext != "" and (not ext.startswith(".") or "/" in ext or len(ext) < 2):
        raise UsageError(f"--ext {ext!r}: give an extension with its dot (e.g. .mp4), or '' for raw-frame folders")
    return ext


def ucf101_group(entry: ListEntry) -> str:
    """UCF101's group `gNN` from `.../v_<Class>_gNN_cMM.avi` (the same gNN across classes is one group, as in
    the official splits, which hold out whole gNN ranges); a name without it is its own group."""
    m = re.search(r"_g(\d+)_c\d+", PurePosixPath(entry.path).name)
    return f"g{int(m.group(1)):02d}" if m else entry.path


# HMDB51 clip names: <source>_<class>_<body part>_<camera motion>_<people>_<viewpoint>_<quality>_<clip number>,
# e.g. April_09_brush_hair_u_nm_np1_ba_goo_0.avi; JHMDB keeps the HMDB names.
_HMDB_TAGS = re.compile(r"_[a-z]+_[a-z]+_np\d+_[a-z]+_[a-z]+_\d+$", re.IGNORECASE)


def hmdb_source(entry: ListEntry) -> str:
    """The source video of an HMDB51/JHMDB clip: its name without the meta tags, the clip number and the class
    name (`April_09_brush_hair_u_nm_np1_ba_goo_0.avi` in `brush_hair/` -> `april_09`). The key is compared across
    classes, so clips of one movie in several classes stay on one side. Names without HMDB tags lose only a
    trailing `_<number>`."""
    path = PurePosixPath(entry.path)
    stem = path.stem if path.suffix.lower() in VIDEO_EXTENSIONS else path.name
    tagged = _HMDB_TAGS.search(stem)
    source = stem[: tagged.start()] if tagged else re.sub(r"_\d+$", "", stem)
    class_name = path.parent.name
    if tagged and class_name and source.lower().endswith("_" + class_name.lower()):
        source = source[: -len(class_name) - 1]
    return source.lower() or stem.lower()


def ntu_performer(entry: ListEntry) -> str:
    m = NTU_NAME.match(PurePosixPath(entry.path).name)
    assert m, entry.path  # only matching names become entries
    return f"P{m.group(3)}"


def _pick_groups(sizes: list[tuple[str, int]], fraction: float, rng: np.random.Generator, keep_one: bool) -> set[str]:
    """Shuffles the (group, size) pairs and returns the prefix whose total is closest to `fraction` of the whole
    (at least one group when `fraction > 0`, never all of them when `keep_one`)."""
    if fraction <= 0 or not sizes:
        return set()
    order = [sizes[i] for i in rng.permutation(len(sizes))]
    total = sum(n for _, n in sizes)
    target = fraction * total
    limit = len(order) - 1 if keep_one else len(order)
    cumulative, best_k, best_err = 0, 0, float("inf")
    for k in range(1, limit + 1):
        cumulative += order[k - 1][1]
        err = abs(cumulative - target)
        if err < best_err:
            best_k, best_err = k, err
        if cumulative >= target:
            break
    return {name for name, _ in order[:best_k]}


def grouped_holdout(
    entries: Sequence[ListEntry], fraction: float, seed: int, group_of: Callable[[ListEntry], str]
) -> tuple[list[ListEntry], list[ListEntry], dict]:
    """Splits `entries` into (kept, held out) with about `fraction` of them held out, in whole groups.

    When every group lies within one class (per-video groups, HMDB sources of one class), the draw is stratified:
    each class holds out about `fraction` of its own videos (at least one group where it has two or more). When
    groups span classes (UCF101 gNN, NTU performers), whole groups are drawn across all classes. Deterministic by
    `seed`; order within each part is the input order. Returns also {"groups", "held_groups", "stratified"}.
    """
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"holdout fraction {fraction}: must be in [0, 1) (0 leaves the held-out list empty)")
    keys = [group_of(e) for e in entries]  # once per video (a regular expression per call)
    groups: dict[str, dict[int, int]] = {}
    for key, e in zip(keys, entries):
        counts = groups.setdefault(key, {})
        counts[e.label] = counts.get(e.label, 0) + 1
    names = sorted(groups)  # sorted first: the draw must not depend on hash or file order
    rng = np.random.default_rng(seed)
    stratified = all(len(groups[g]) == 1 for g in names)
    held: set[str] = set()
    if fraction > 0 and len(names) < 2:
        raise UsageError(
            f"cannot hold out {fraction:.0%} of {len(entries)} videos in whole groups: they form {len(names)} "
            "group(s) (use --val-fraction 0, or name groups with a finer key)"
        )
    if stratified:
        by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for g in names:
            (label, n), = groups[g].items()
            by_class[label].append((g, n))
        for label in sorted(by_class):
            if len(by_class[label]) >= 2:
                held |= _pick_groups(by_class[label], fraction, rng, keep_one=True)
    else:
        held = _pick_groups([(g, sum(groups[g].values())) for g in names], fraction, rng, keep_one=True)
    kept = [e for key, e in zip(keys, entries) if key not in held]
    out = [e for key, e in zip(keys, entries) if key in held]
    return kept, out, {"groups": len(names), "held_groups": len(held), "stratified": stratified}


def missing_under(root: Path, entries: Iterable[ListEntry]) -> list[str]:
    """List paths (files or raw-frame folders) that do not exist under `root`, in list order."""
    if not root.is_dir():
        raise InputNotFoundError(f"--check-root '{root}' is not a folder (give the folder the list paths start from)")
    return [e.path for e in entries if not (root / e.path).exists()]


# --------------------------------------------------------------------------------------------------- parsers
def parse_ucf101(splits_dir: str | os.PathLike, split: int, ext: str | None = None) -> Prepared:
    """UCF101 from `ucfTrainTestlist/`: labels from `classInd.txt` (1-based, in its own order), train lines
    `<Class>/<video>.avi <id>`, test lines `<Class>/<video>.avi` labelled through their folder. Paths are kept
    exactly as written (`HandstandPushups/v_HandStandPushups_g01_c01.avi`)."""
    d = Path(splits_dir)
    fix = "--splits-dir is the ucfTrainTestlist folder with classInd.txt, trainlist0N.txt and testlist0N.txt"
    class_file = _require_file(d / "classInd.txt", "UCF101 class index", fix)
    train_file = _require_file(d / f"trainlist{split:02d}.txt", f"UCF101 split {split} train list", fix)
    test_file = _require_file(d / f"testlist{split:02d}.txt", f"UCF101 split {split} test list", fix)

    ids: dict[int, str] = {}
    for n, line in _read_lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise UsageError(f"{class_file}:{n}: expected '<1-based id> <ClassName>', got {line!r}")
        if int(parts[0]) in ids:
            raise UsageError(f"{class_file}:{n}: class id {parts[0]} appears twice")
        ids[int(parts[0])] = parts[1]
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise UsageError(f"{class_file}: class ids must run 1..{len(ids)} without gaps, got {sorted(ids)[:5]}...")
    classes = [ids[i] for i in range(1, len(ids) + 1)]
    exact = {name: i for i, name in enumerate(classes)}
    folded = {name.lower(): i for i, name in enumerate(classes)}

    def label_of_folder(path: str, where: str) -> int:
        folder = PurePosixPath(path).parts[0] if len(PurePosixPath(path).parts) > 1 else ""
        label = exact.get(folder, folded.get(folder.lower()))
        if label is None:
            raise UsageError(
                f"{where}: video {path!r} is not in a class folder named in {class_file.name} "
                f"(its folder {folder!r} is none of the {len(classes)} classes)"
            )
        return label

    def read(path: Path, with_labels: bool) -> list[ListEntry]:
        entries = []
        for n, line in _read_lines(path):
            parts = line.split()
            where = f"{path}:{n}"
            if len(parts) not in (1, 2) or (with_labels and len(parts) != 2):
                raise UsageError(f"{where}: expected '<Class>/<video> <1-based id>' or '<Class>/<video>', got {line!r}")
            label = label_of_folder(parts[0], where)
            if len(parts) == 2:
                if not parts[1].isdigit() or int(parts[1]) not in ids:
                    raise UsageError(f"{where}: class id {parts[1]!r} is not in {class_file.name} (1..{len(ids)})")
                if int(parts[1]) - 1 != label:
                    raise UsageError(
                        f"{where}: id {parts[1]} is {classes[int(parts[1]) - 1]!r} in {class_file.name}, "
                        f"but the video lies in the folder of {classes[label]!r}"
                    )
            entries.append(ListEntry(_with_ext(parts[0], ext), label))
        return entries

    return Prepared(
        title=f"ucf101 split {split}",
        classes=classes,
        train=read(train_file, with_labels=True),
        test=read(test_file, with_labels=False),
        group_of=ucf101_group,
        group_kind="gNN groups",
    )


def parse_hmdb(splits_dir: str | os.PathLike, split: int, dataset: str = "hmdb51", ext: str | None = None) -> Prepared:
    """HMDB51 / JHMDB from `<class>_test_split<N>.txt` files (lines `<video>.avi <id>`: 1 train, 2 test,
    0 unused); classes in sorted order of their names; list paths `<class>/<video>.avi`."""
    d = Path(splits_dir)
    suffix = f"_test_split{split}.txt"
    files = sorted(p for p in d.glob(f"*{suffix}") if p.is_file()) if d.is_dir() else []
    if not files:
        raise InputNotFoundError(
            f"no '<class>{suffix}' files in '{d}' (--splits-dir is the folder of the official {dataset} split files, "
            "e.g. testTrainMulti_7030_splits/ for HMDB51 or splits/ for JHMDB)"
        )
    classes = sorted(p.name[: -len(suffix)] for p in files)
    train, test, unused = [], [], 0
    for label, name in enumerate(classes):
        path = d / f"{name}{suffix}"
        for n, line in _read_lines(path):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise UsageError(f"{path}:{n}: expected '<video> <0|1|2>' (0 unused, 1 train, 2 test), got {line!r}")
            entry = ListEntry(_with_ext(f"{name}/{parts[0]}", ext), label)
            if parts[1] == "1":
                train.append(entry)
            elif parts[1] == "2":
                test.append(entry)
            else:
                unused += 1
    notes = [f"{unused} videos marked 0 (unused in split {split}) left out"] if unused else []
    return Prepared(
        title=f"{dataset} split {split}",
        classes=classes,
        train=train,
        test=test,
        group_of=hmdb_source,
        group_kind="source videos",
        notes=notes,
    )


def scan_ntu(
    videos: str | os.PathLike, benchmark: str = "ntu60", protocol: str = "cs", suffix: str = "_rgb.avi",
    flag: str = "--videos",
) -> Prepared:
    """NTU RGB+D 60/120 from the names `SsssCcccPpppRrrrAaaa<suffix>` found under `videos` (label A-1).

    cs: the cross-subject training performers train; cv (NTU 60): cameras 2 and 3 train, camera 1 tests;
    cset (NTU 120): even setups train. For ntu60, NTU-120-only files (S018+, A061+) are left out and counted.
    Raw-frame folders with these names are taken too. `flag`: the command's option naming the folder (messages).
    """
    if benchmark not in NTU_BENCHMARKS:
        raise UsageError(f"--benchmark {benchmark!r}: choose ntu60 or ntu120")
    if protocol == "cv" and benchmark != "ntu60":
        raise UsageError("--protocol cv (cross-view) is defined for ntu60; ntu120 uses cs (cross-subject) or cset")
    if protocol == "cset" and benchmark != "ntu120":
        raise UsageError("--protocol cset (cross-setup) is defined for ntu120; ntu60 uses cs or cv")
    if protocol not in ("cs", "cv", "cset"):
        raise UsageError(f"--protocol {protocol!r}: choose cs, cv or cset")
    root = Path(videos)
    if not root.is_dir():
        raise InputNotFoundError(f"{flag} '{root}' is not a folder (give the folder holding the NTU {suffix} files)")
    num_actions, num_setups = NTU_BENCHMARKS[benchmark]
    subjects = NTU60_TRAIN_SUBJECTS if benchmark == "ntu60" else NTU120_TRAIN_SUBJECTS

    found: list[tuple[str, str]] = []  # (relative path, name)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        frame_dirs = [n for n in dirnames if n.endswith(suffix) and NTU_NAME.match(n)] if suffix else []
        dirnames[:] = sorted(n for n in dirnames if n not in frame_dirs and not n.startswith("."))
        for name in sorted(filenames) + frame_dirs:
            if name.endswith(suffix) and not name.startswith("."):
                found.append(((rel_dir / name).as_posix(), name))
    found.sort()
    train, test, problems, other = [], [], [], 0
    for rel, name in found:
        m = NTU_NAME.match(name)
        if not m or len(name) != m.end() + len(suffix):
            problems.append(f"{rel}: name does not follow SsssCcccPpppRrrrAaaa{suffix}")
            continue
        setup, camera, performer, _, action = (int(g) for g in m.groups())
        if action > num_actions or setup > num_setups:
            other += 1  # NTU 120 files in an NTU 60 run
            continue
        if not (1 <= action and 1 <= camera <= 3 and 1 <= setup):
            problems.append(f"{rel}: setup/camera/action out of range for {benchmark}")
            continue
        if protocol == "cs":
            is_train = performer in subjects
        elif protocol == "cv":
            is_train = camera in NTU60_CV_TRAIN_CAMERAS
        else:
            is_train = setup % 2 == 0
        (train if is_train else test).append(ListEntry(rel, action - 1))
    if not train and not test:
        raise InputNotFoundError(
            f"no NTU files named SsssCcccPpppRrrrAaaa{suffix} for {benchmark} under '{root}' "
            + ("(check --videos, and --suffix for files named otherwise; skeleton files: `eleatt prepare "
               "ntu-skeleton`)" if flag == "--videos" else
               f"(check {flag}: the folder holding them, searched recursively)")
        )
    notes = [f"{other} NTU-120-only files (setup > {num_setups} or action > {num_actions}) left out"] if other else []
    return Prepared(
        title=f"{benchmark} {protocol}",
        classes=list(NTU_ACTIONS[:num_actions]),
        train=train,
        test=test,
        group_of=ntu_performer,
        group_kind="performers",
        notes=notes,
        problems=problems,
    )


def _find_csv(d: Path, split: str, required: bool) -> Path | None:
    aliases = {"train": ("train",), "validate": ("validate", "val"), "test": ("test",)}[split]
    for alias in aliases:
        if (d / f"{alias}.csv").is_file():
            return d / f"{alias}.csv"
    candidates = sorted({p for alias in aliases for p in d.glob(f"*[_-]{alias}.csv") if p.is_file()})
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise UsageError(f"several {split} CSVs in '{d}': {[p.name for p in candidates]} (keep one per folder)")
    if required:
        raise InputNotFoundError(f"'{d / (split + '.csv')}' not found (--csv-dir holds the official Kinetics CSVs)")
    return None


def _read_kinetics_csv(path: Path, default_split: str) -> list[tuple[str, str, str | None]]:
    """Rows of one Kinetics CSV as (split folder, file name, label or None), parsed by header names."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        missing = [c for c in ("youtube_id", "time_start", "time_end") if c not in header]
        if missing:
            raise UsageError(
                f"{path}: header {header} lacks {missing} (expected label,youtube_id,time_start,time_end,split)"
            )
        reader.fieldnames = header
        rows = []
        for n, row in enumerate(reader, 2):
            try:
                start, end = (float(row[c]) for c in ("time_start", "time_end"))
                if not (start.is_integer() and end.is_integer()):
                    raise ValueError
            except (TypeError, ValueError):
                raise UsageError(
                    f"{path}:{n}: time_start/time_end {row.get('time_start')!r}/{row.get('time_end')!r} are not "
                    "whole seconds"
                ) from None
            video_id = (row["youtube_id"] or "").strip()
            if not video_id:
                raise UsageError(f"{path}:{n}: empty youtube_id")
            label = (row.get("label") or "").strip() or None
            split = (row.get("split") or "").strip() or default_split
            rows.append((split, f"{video_id}_{int(start):06d}_{int(end):06d}.mp4", label))
    return rows


def parse_kinetics(csv_dir: str | os.PathLike, by_label: bool = False, ext: str | None = None) -> Prepared:
    """Kinetics from `train.csv`, `validate.csv` and `test.csv` (parsed by header names; `label` may be absent
    from the test file). Paths `<split>/<youtube_id>_<start:06d>_<end:06d>.mp4`, or `<split>/<label>/...` with
    `by_label`; unlabeled rows get -1; classes are the labels found, sorted. The official validation set is val."""
    d = Path(csv_dir)
    if not d.is_dir():
        raise InputNotFoundError(f"--csv-dir '{d}' is not a folder (the folder of train.csv, validate.csv, test.csv)")
    files = {s: _find_csv(d, s, required=s != "test") for s in ("train", "validate", "test")}
    rows = {s: _read_kinetics_csv(p, {"validate": "val"}.get(s, s)) if p else [] for s, p in files.items()}
    classes = sorted({label for part in rows.values() for _, _, label in part if label is not None})
    index = {name: i for i, name in enumerate(classes)}

    def entries(part: list[tuple[str, str, str | None]]) -> list[ListEntry]:
        out, seen = [], set()
        for split, name, label in part:
            path = f"{split}/{label}/{name}" if by_label and label is not None else f"{split}/{name}"
            if path not in seen:
                seen.add(path)
                out.append(ListEntry(_with_ext(path, ext), -1 if label is None else index[label]))
        return out

    train, val, test = entries(rows["train"]), entries(rows["validate"]), entries(rows["test"])
    notes = [f"using {', '.join(p.name for p in files.values() if p)} from {d}"]
    if files["test"] is None:
        notes.append("no test CSV found: test.txt is empty")
    elif all(e.label == -1 for e in test):
        notes.append("the test CSV has no labels: test videos are labelled -1")
    if len(classes) < 2:
        raise UsageError(f"{files['train']}: found {len(classes)} class label(s); is the 'label' column filled?")
    return Prepared(title="kinetics", classes=classes, train=train, val=val, test=test, notes=notes)


def scan_folder(
    root: str | os.PathLike,
    test_fraction: float = 0.2,
    seed: int = 0,
    group_regex: str | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Prepared:
    """A folder-per-class tree `<root>/<class>/<video>` (classes sorted by name). Videos are files with one of
    `extensions` and raw-frame folders (sub-folders holding images). `test_fraction` of them go to test, drawn
    by seed in groups: the first capture group (or the match) of `group_regex` on the file name, else each
    video alone."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"--root '{root}' is not a folder (give the folder holding one sub-folder per class)")
    try:
        pattern = re.compile(group_regex) if group_regex else None
    except re.error as err:
        raise UsageError(f"--group-regex {group_regex!r} is not a valid regular expression ({err}); "
                         r"e.g. '_g(\d+)_' names UCF101-style groups") from None
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries, ignored = [], 0
    for label, name in enumerate(classes):
        # os.scandir: the directory's own file types, no stat per video (a stat each costs minutes on a cold
        # network disk at Kinetics size); sorted by name as strings
        with os.scandir(root / name) as it:
            items = sorted((item for item in it if not item.name.startswith(".")), key=lambda item: item.name)
        for item in items:
            if item.is_file() and os.path.splitext(item.name)[1].lower() in exts:
                entries.append(ListEntry(f"{name}/{item.name}", label))
            elif item.is_dir() and any(p.suffix.lower() in FRAME_EXTENSIONS for p in Path(item.path).iterdir()):
                entries.append(ListEntry(f"{name}/{item.name}", label))
            else:
                ignored += 1
    if len(classes) < 2 or not entries:
        raise InputNotFoundError(
            f"'{root}' holds {len(classes)} class folder(s) and {len(entries)} video(s) with extensions "
            f"{' '.join(exts)}; need at least two class folders with videos (or raw-frame folders) in them"
        )

    def group_of(entry: ListEntry) -> str:
        # A named group is shared across classes (like UCF101's gNN); without a match a video is its own group.
        m = pattern.search(PurePosixPath(entry.path).name) if pattern else None
        return (m.group(1) if m.groups() else m.group(0)) if m else entry.path

    train, test, info = grouped_holdout(entries, test_fraction, seed, group_of)
    notes = [f"test: {test_fraction:.0%} of the videos, {info['held_groups']} of {info['groups']} groups, seed {seed}"]
    if ignored:
        notes.append(f"{ignored} other files/folders in the class folders ignored (not {' '.join(exts)})")
    return Prepared(
        title=f"folder {root}",
        classes=classes,
        train=train,
        test=test,
        group_of=group_of,
        group_kind="groups" if pattern else "videos",
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------- writing
def finish(
    prepared: Prepared,
    out: Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    check_root: Path | None = None,
    drop_missing: bool = False,
    collisions: str = "refuse",
) -> int:
    """Holds out validation (when the protocol has none), checks the videos, writes the five files, prints the
    summary. Returns the exit code: 0, or 3 when inputs were skipped or videos are missing (each listed).
    `collisions`: "refuse" two videos whose outputs would share one name (UsageError naming both), or "drop"
    them (listed, exit 3)."""
    p = prepared
    left_out: list[tuple[str, str]] = []  # (video, reason) of the videos left out of the lists
    if collisions == "drop":
        left_out += drop_collisions(p)
    else:
        refuse_collisions(p)
    if p.problems and not p.train and not p.test:  # every input failed: say which and why, not "0 videos"
        print(f"eleatt prepare {p.title}: none of the inputs could be used; nothing written to {out}", file=sys.stderr)
        for line in p.problems[:MAX_LISTED]:
            print(f"  {line}", file=sys.stderr)
        if len(p.problems) > MAX_LISTED:
            print(f"  ... and {len(p.problems) - MAX_LISTED} more", file=sys.stderr)
        return EXIT_INCOMPLETE
    notes = list(p.notes)
    train, val = p.train, p.val
    if val is None:
        assert p.group_of is not None
        train, val, info = grouped_holdout(p.train, val_fraction, seed, p.group_of)
        if val_fraction > 0:
            how = "stratified by class" if info["stratified"] else "across classes"
            notes.append(
                f"val: {val_fraction:.0%} of the training videos, in whole {p.group_kind} "
                f"({info['held_groups']} of {info['groups']} held out, {how}, seed {seed})"
            )
    test = p.test
    problems = list(p.problems)
    if check_root is not None:
        lists = {"train": train, "val": val, "test": test}
        missing = {name: missing_under(check_root, entries) for name, entries in lists.items()}
        for name, paths in missing.items():
            problems += [f"{path}: missing under {check_root} ({name})" for path in paths]
        n_missing = sum(len(paths) for paths in missing.values())
        if n_missing and drop_missing:
            gone = {name: set(paths) for name, paths in missing.items()}
            train, val, test = ([e for e in lists[n] if e.path not in gone[n]] for n in ("train", "val", "test"))
            left_out += [(path, f"missing under {check_root}") for paths in missing.values() for path in paths]
            notes.append(f"{n_missing} missing videos left out of the lists (--drop-missing)")
        elif n_missing:
            notes.append(f"{n_missing} listed videos missing under {check_root} (kept; --drop-missing leaves them out)")

    lists, repeated = _deduplicate({"train": train, "val": val, "test": test})
    problems += repeated
    for name in ("train", "test"):
        if not lists[name]:
            raise UsageError(f"the {p.title} split gives no {name} videos; check the split files (--split, and "
                             "that they list videos of this dataset)")
    ensure_writable_dir(out, "--out")
    for name, entries in lists.items():
        write_list(out / f"{name}.txt", entries)
    everything = _union(lists.values())
    write_list(out / ALL_LIST, everything)
    write_classes(out / "classes.txt", p.classes)

    print(f"eleatt prepare {p.title}: {len(p.classes)} classes")
    for name, entries in lists.items():
        labelled = sum(e.label >= 0 for e in entries)
        extra = "" if labelled == len(entries) else f"  ({len(entries) - labelled} unlabeled, -1)"
        print(f"  {name + '.txt':<12}{len(entries):>8} videos{extra}")
    print(f"  {ALL_LIST:<12}{len(everything):>8} videos  (train, val and test: for flow and extract)")
    print(f"  {'classes.txt':<12}{len(p.classes):>8} names")
    for note in notes:
        print(f"  note: {note}")
    print(f"  written to {out}")
    write_problems(out / PROBLEMS_FILE, [{"video": v, "stage": "prepare", "reason": r} for v, r in left_out])
    report = out / "problems.txt"
    report.unlink(missing_ok=True)  # a stale report from an earlier run would mislead
    if problems:
        report.write_text("".join(f"{line}\n" for line in problems), encoding="utf-8")
        print(f"eleatt prepare: {len(problems)} input(s) skipped or missing:", file=sys.stderr)
        for line in problems[:MAX_LISTED]:
            print(f"  {line}", file=sys.stderr)
        if len(problems) > MAX_LISTED:
            print(f"  ... and {len(problems) - MAX_LISTED} more", file=sys.stderr)
        print(f"  (all {len(problems)} listed in {report})", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


def _union(lists: Iterable[list[ListEntry]]) -> list[ListEntry]:
    """The entries of several lists in order, each video once."""
    seen: dict[str, ListEntry] = {}
    for entries in lists:
        for entry in entries:
            seen.setdefault(entry.path, entry)
    return list(seen.values())


# --------------------------------------------------------------------------------------------------- filtering
def _finished_in(folder: Path) -> tuple[str, set[str], dict[str, str]]:
    """(the stage that makes it: "flow" or "extract <modality>", videos finished, {video: reason} of those that
    failed) of a flow folder or a feature folder."""
    from pipeline.data.features import FeatureFolder
    from pipeline.data.flow_files import FlowFolder

    if not folder.is_dir():
        raise InputNotFoundError(f"folder '{folder}' not found (give the flow and feature folders the lists were "
                                 "processed into: `eleatt flow --out` and `eleatt extract --out`)")
    plain = FeatureFolder(folder)
    settings = plain.settings
    if settings is None:
        raise InputNotFoundError(f"'{folder}' has no settings.json: not a flow folder or a feature folder (made "
                                 "by `eleatt flow` or `eleatt extract`)")
    if settings.modality == "flow" and not settings.backbone:
        stage, store = "flow", FlowFolder(folder)
    else:
        stage, store = f"extract {settings.modality}", plain
    done = store.finished()  # each file checked once: failed() is given it
    return stage, set(done), store.failed(finished=done)


def filter_lists(lists: str | os.PathLike, folders: Sequence[str | os.PathLike], out: str | os.PathLike
                 ) -> list[dict]:
    """Writes into `out` the lists of `lists` (train/val/test.txt, those present, and classes.txt) without the
    videos that some of `folders` (flow folders and feature folders) has not finished, plus all.txt and
    `problems.jsonl`: one {"video", "stage", "folder", "reason"} per video left out (the first folder, in the order
    given, that lacks it: the stage that makes it, "flow" or "extract <modality>", and the recorded reason), after
    the videos `eleatt prepare` left out (the problems.jsonl of `lists`). So every stream trains and is tested on
    the same videos. Returns the problems written."""
    lists, out = Path(lists), Path(out)
    present = [name for name in SPLITS if (lists / f"{name}.txt").is_file()]
    if not present:
        raise InputNotFoundError(f"'{lists}' holds none of {', '.join(n + '.txt' for n in SPLITS)} (the lists "
                                 "`eleatt prepare` writes)")
    if out.resolve() == lists.resolve():
        raise UsageError(f"--out '{out}' is the folder of the lists it reads; write the filtered lists into another "
                         "folder (e.g. a sibling named lists-ok)")
    entries = {name: read_list(lists / f"{name}.txt") for name in present}
    classes = read_classes(lists / "classes.txt") if (lists / "classes.txt").is_file() else None
    states = [(str(folder), *_finished_in(Path(folder))) for folder in folders]
    problems = read_problems(lists / PROBLEMS_FILE)
    left_out = {p["video"] for p in problems}
    for entry in _union(entries.values()):
        if entry.path in left_out:
            continue
        for folder, stage, finished, failed in states:
            if entry.path not in finished:
                reason = failed.get(entry.path) or f"no output in '{folder}' (never processed: rerun that stage)"
                problems.append({"video": entry.path, "stage": stage, "folder": folder, "reason": reason})
                left_out.add(entry.path)
                break
    ensure_writable_dir(out, "--out")
    kept = {name: [e for e in entries[name] if e.path not in left_out] for name in present}
    for name in present:
        write_list(out / f"{name}.txt", kept[name])
    write_list(out / ALL_LIST, _union(kept.values()))
    if classes is not None:
        write_classes(out / "classes.txt", classes)
    write_problems(out / PROBLEMS_FILE, problems, keep_empty=True)
    return problems


def write_problems(path: Path, problems: Sequence[dict], keep_empty: bool = False) -> None:
    """problems.jsonl: one {"video", "stage", "reason"} a line; none: an empty file (`keep_empty`) or no file (a
    stale one removed)."""
    if not problems and not keep_empty:
        path.unlink(missing_ok=True)
        return
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, sort_keys=True) + "\n" for p in problems)


def read_problems(path: str | os.PathLike) -> list[dict]:
    """The records of a problems.jsonl (`filter_lists`); a missing file is no problems."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(read_text_lines(path, "problems file", "one JSON record a line"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{number}: not a JSON record; delete the file and rerun the stage that "
                             "writes it") from None
        if not isinstance(record, dict) or not isinstance(record.get("video"), str):
            raise UsageError(f"{path}:{number}: a record without a video; delete the file and rerun")
        records.append(record)
    return records


def print_problems(problems: Sequence[dict], path: str | os.PathLike, command: str) -> None:
    """On stderr: how many videos were left out, the first MAX_LISTED with stage and reason, and the file."""
    if not problems:
        return
    print(f"{command}: {len(problems)} video(s) left out of every stream (all listed in {path}):", file=sys.stderr)
    for p in problems[:MAX_LISTED]:
        print(f"  {p['video']}: {p.get('stage', '?')}: {p.get('reason', '')}", file=sys.stderr)
    if len(problems) > MAX_LISTED:
        print(f"  ... and {len(problems) - MAX_LISTED} more", file=sys.stderr)
