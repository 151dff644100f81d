"""Where the project writes, and how: output folders checked before any work, atomic writes that honour the umask,
and temporary names no user file can be mistaken for.

Every command calls `ensure_writable_dir` on its output locations (--out, the run folder, a checkpoint's folder),
so an existing file, a folder without write permission or a read-only file system is one clear line (exit 2), not a
traceback halfway through the work. Every file written goes through `atomic_write`: a temporary file in the target's
folder whose name starts with `TMP_PREFIX`, given the permissions the user's umask asks for (mkstemp creates 0600),
then renamed into place; an interrupted write leaves the old file (or none), never half a file. Writers that need a
path rather than a file object (torch's and ONNX's exporters) get one from `atomic_path`. No command overwrites one
of its own inputs: each passes its outputs and inputs to `check_not_input` before any work.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterable, Iterator

from pipeline.errors import UsageError

# Temporary files and folders of the project start with this: a leading dot and a name no dataset uses, so cleaning
# up never touches a user's file that merely looks like one of ours (a video named `.clip.tmp.avi`, say).
TMP_PREFIX = ".eleatt-tmp"

_umask_lock = threading.Lock()


class OutputLocationError(UsageError):
    """An output location that cannot be written: an existing file, no permission, a read-only file system."""


class OutputIsInputError(UsageError):
    """An output path that is one of the command's inputs (writing it would destroy the input)."""


def file_mode() -> int:
    """The permission bits a plain `open(path, "w")` would give a new file under the current umask (e.g. 0o644)."""
    with _umask_lock:  # reading the umask means setting it: keep the window closed to other threads
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder", create: bool = False) -> Path:
    """Checks, before any work, that `path` is a folder files can be written in, or can become one.

    A folder that does not exist yet is not created (a refused run leaves nothing behind) unless `create`; its
    nearest existing parent must then be a writable folder. Raises OutputLocationError (a ValueError: one line,
    exit 2 in every command) naming `what` and `path` when it is an existing file, lies under a file, or is not
    writable (permissions or a read-only mount).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputLocationError(f"{what} '{path}' is an existing file, not a folder; choose a folder path")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputLocationError(f"{what} '{path}' cannot be created: a parent of it ('{existing}') is a file; "
                                  "choose another path")
    try:  # os.access misreads ACLs and some network mounts: create a file to be sure
        fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == path else f" (its parent '{existing}' does not accept new files)"
        raise OutputLocationError(f"{what} '{path}' is not writable{where}: {err.strerror}; choose a writable "
                                  "location or fix its permissions") from None
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Checks, before any work, that `path` can be written as a file: not an existing folder, and its folder is
    (or can become) a writable folder (`ensure_writable_dir`). Raises OutputLocationError naming `what`."""
    path = Path(path)
    if path.is_dir():
        raise OutputLocationError(f"{what} '{path}' is an existing folder, not a file; give a file path")
    ensure_writable_dir(path.parent, f"folder of {what}")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", tmp_dir: str | os.PathLike | None = None,
                 encoding: str | None = None, newline: str | None = None) -> Iterator[IO]:
    """`with atomic_write(path) as f: ...` writes `path` whole or not at all.

    The data goes to a temporary file (in `tmp_dir`, default the target's folder: it must be on the same file
    system), gets the umask's permissions, and replaces `path` when the block ends without an exception.
    """
    path = Path(path)
    if path.is_dir():  # refused before writing: the rename would fail naming our temporary file instead
        raise OutputLocationError(f"'{path}' is an existing folder, not a file; give a file path")
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}.", suffix=".part", dir=folder)
    try:
        os.fchmod(fd, file_mode())
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding=encoding or "utf-8", newline=newline)
        with f:
            yield f
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder: equal once links are resolved, or the same inode (a hard
    link, or a path spelled through another mount of the same folder)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same
        return False


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child != parent and parent in child.parents


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "--out",
                    nested: bool = False) -> None:
    """Refuses, before any work, an output path that is one of the command's inputs.

    `output` is refused when it names the same file or folder as an input (after resolving symbolic links, or the
    same inode: a hard link); with `nested`, also when one of them lies inside the other (for output folders whose
    writing would mix files into an input folder, or an input folder that the output would fill). `None` inputs
    (options not given) are skipped. Raises OutputIsInputError naming `what`, the path and the fix (exit 2).
    """
    out = Path(output)
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if _same(out, source):
            kind = "folders" if source.is_dir() else "files"
            raise OutputIsInputError(f"{what} '{out}' is one of the input {kind} ('{source}'): writing it would "
                                     "destroy that input; choose another output path")
        if nested and (_inside(out, source) or _inside(source, out)):
            where = "inside the input" if _inside(out, source) else "a folder holding the input"
            raise OutputIsInputError(f"{what} '{out}' is {where} '{source}': choose an output folder outside it")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_path(out) as tmp: save(tmp)` for writers that take a path, not a file object (torch.export,
    ONNX): `tmp` is a fresh name in `out`'s folder with `out`'s suffix (some writers check it); when the block ends
    without an exception the file written there gets the umask's permissions and replaces `out`; otherwise it is
    removed and `out` is untouched. Raises OutputLocationError when `out` is an existing folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputLocationError(f"'{path}' is an existing folder, not a file; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}.", suffix=f".part{''.join(path.suffixes[-1:])}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
