"""The list format shared by every stage: one video a line, `<relative path> <label>`, and `classes.txt` beside it.

The path is everything before the last whitespace (so it may contain spaces) and is relative to the root given to
the command; it may name a raw-frame folder. Labels are 0-based, `-1` when unknown. `#` comments and blank lines
are ignored; CRLF line ends and a UTF-8 byte-order mark (lists saved by Windows editors) are tolerated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.paths import atomic_write
from pipeline.errors import InputNotFoundError, UsageError


@dataclass(frozen=True)
class ListEntry:
    """One line of a list: `path` relative to the video/feature root, 0-based `label` (-1 = unknown)."""

    path: str
    label: int = -1


def read_text_lines(path: str | os.PathLike, what: str, expected: str) -> list[str]:
    """The lines of a text file the project reads (lists, classes.txt, official split files), decoded as UTF-8.

    CRLF and a UTF-8 byte-order mark are tolerated. Another encoding (UTF-16 from a Windows editor, latin-1 with
    accents) raises ValueError naming the file, what it is (`what`), the line format `expected` and the fix, instead
    of a UnicodeDecodeError traceback or paths with NUL characters in them.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        encoding, source = "UTF-16 or UTF-32", "UTF-16"
    else:
        try:
            # universal newlines: CRLF tolerated; utf-8-sig: a BOM would otherwise become part of the first path
            return data.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            encoding, source = f"not UTF-8 (byte 0x{data[err.start]:02x} on line {line}; latin-1?)", "LATIN1"
    raise UsageError(
        f"{what} '{path}' is {encoding} text; expected UTF-8 lines of {expected}: save it as UTF-8 "
        f"(e.g. `iconv -f {source} -t UTF-8 FILE > NEW`)"
    )


def read_list(path: str | os.PathLike) -> list[ListEntry]:
    """Reads a list file; raises ValueError naming `file:line` on a malformed line or a non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"list file '{path}' not found (write one with `eleatt prepare ...`)")
    entries = []
    for number, raw in enumerate(read_text_lines(path, "list file", "'<relative path> <label>'"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UsageError(
                f"{path}:{number}: expected '<relative path> <label>', got {line!r} "
                "(use -1 as the label of a video whose class is unknown)"
            )
        video, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise UsageError(
                f"{path}:{number}: label {label_text!r} is not an integer "
                "(labels are 0-based class indices into classes.txt, -1 when unknown)"
            ) from None
        if label < -1:
            raise UsageError(f"{path}:{number}: label {label} is negative (only -1, 'unknown', is allowed)")
        entries.append(ListEntry(video, label))
    return entries


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:  # whole or not at all, umask permissions
        f.write(text)


def write_list(path: str | os.PathLike, entries: Iterable[ListEntry | tuple[str, int]]) -> None:
    """Writes a list file atomically (a temporary file, then a rename)."""
    lines = []
    for entry in entries:
        video, label = (entry.path, entry.label) if isinstance(entry, ListEntry) else entry
        if not video or "\n" in video or video != video.strip():
            raise UsageError(f"cannot write video path {video!r} to a list: empty, or leading/trailing whitespace")
        lines.append(f"{video} {int(label)}\n")
    _atomic_write_text(Path(path), "".join(lines))


def read_classes(path: str | os.PathLike) -> list[str]:
    """Reads `classes.txt`: one class name a line, in label order."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"class file '{path}' not found (it is written beside the lists by `eleatt prepare`)")
    names = [line.strip() for line in read_text_lines(path, "class file", "one class name a line")]
    while names and not names[-1]:
        names.pop()
    if any(not name for name in names):
        raise UsageError(f"{path}: blank line among the class names (one name a line, in label order)")
    return names


def write_classes(path: str | os.PathLike, names: Iterable[str]) -> None:
    """Writes `classes.txt` atomically."""
    names = list(names)
    if any(not n.strip() or "\n" in n for n in names):
        raise UsageError(f"class names must be non-empty single lines, got {names!r}")
    _atomic_write_text(Path(path), "".join(f"{n.strip()}\n" for n in names))


def classes_path_for(list_path: str | os.PathLike) -> Path:
    """`classes.txt` beside a list file."""
    return Path(list_path).with_name("classes.txt")
