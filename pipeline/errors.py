"""The project's user errors, the exit codes of the commands (defined once for every command) and the one-line
error text.

Bad input and refused runs raise `UserError` (one base class: `UsageError`, a ValueError, and `InputNotFoundError`,
a FileNotFoundError, and their subclasses such as `VideoReadError`); the message names the file or value, the
reason and the fix. The dispatcher (`pipeline.cli`) and the Lightning CLI (`pipeline.training.cli`) turn a
UserError, or an OSError naming a path the user gave (permissions, a read-only file system), into one line and
EXIT_USAGE, and Ctrl-C into EXIT_INTERRUPTED with what was kept and the command that resumes
(`set_interrupt_note`). Anything else -- a ValueError from inside numpy or torch, say -- is a bug: it keeps its
traceback (exit 1), so that it is seen and fixed.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import shlex
import sys
import threading

EXIT_OK = 0  # all done
EXIT_USAGE = 2  # usage error or refused run; the message gives the reason and the fix
EXIT_SOME_FAILED = 3  # some inputs failed, were missing or did not match; each is listed
EXIT_INTERRUPTED = 130  # Ctrl-C: what was kept and the command that resumes are printed
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (`... | head`): ends quietly, as SIGPIPE would end it

_interrupt_note: str | None = None


class UserError(Exception):
    """Base class of the project's user errors: bad input or a refused run, never a bug. The message says what
    (naming the file or value), why, and the fix."""


class UsageError(UserError, ValueError):
    """A bad value, a bad or damaged input file, or a refused run (a ValueError, so that library callers that
    catch ValueError keep working)."""


class InputNotFoundError(UserError, FileNotFoundError):
    """An input the user named (a file, a folder, weights) does not exist."""


def set_interrupt_note(note: str | None) -> None:
    """What a long command keeps if interrupted now and how to resume it (said once per phase, e.g.
    "finished videos are kept in out/; resume with: eleatt extract ..."). None: the generic note."""
    global _interrupt_note
    _interrupt_note = note


class InterruptWatch:
    """Whether Ctrl-C was pressed while `watch_interrupts()` was active, even if a library caught the
    KeyboardInterrupt and exited on its own (Lightning's loops catch it, tear down and call sys.exit(1))."""

    happened = False


@contextlib.contextmanager
def watch_interrupts():
    """`with watch_interrupts() as watch:` ... `watch.happened`. SIGINT still raises KeyboardInterrupt as usual; the
    previous handler is restored afterwards (Lightning leaves Ctrl-C ignored after catching one)."""
    watch = InterruptWatch()
    if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
        yield watch
        return

    def handler(signum, frame):
        watch.happened = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield watch
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def interrupt_message(command: str, argv: list[str]) -> str:
    """The one line printed on Ctrl-C: the command's own note, or "rerun the same command" (our long commands
    resume: finished work is written atomically and skipped on a rerun)."""
    note = _interrupt_note or (
        f"finished work is kept (written whole, never half); resume with: eleatt {shlex.join([command, *argv])}"
    )
    return f"eleatt {command}: interrupted (Ctrl-C); {note}"


def one_line(err: BaseException) -> str:
    """An error's message as one line. An error re-raised from a DataLoader worker carries the worker's traceback
    ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."): its last line holds our message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(err).__name__
        for prefix in (f"{type(err).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                last = last[len(prefix):]
        text = last.strip()
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"cannot use '{err.filename}': {err.strerror}"
    return text


def is_user_error(err: BaseException) -> bool:
    """Whether an exception is about the user's input, to be shown as one line with EXIT_USAGE: one of the
    project's `UserError`s (their messages name the file and the fix), or an OSError naming a path the user gave
    (permissions, a read-only file system, a file where a folder should be). Everything else is a bug and keeps
    its traceback: a plain ValueError raised inside numpy or torch is not the user's fault. (An error re-raised
    from a DataLoader worker keeps its type.)"""
    if isinstance(err, UserError):
        return True
    return isinstance(err, OSError) and err.filename is not None


def usage_error(command: str, err: BaseException) -> int:
    """Prints `eleatt <command>: error: <one line>` on stderr and returns EXIT_USAGE (see `is_user_error`)."""
    print(f"eleatt {command}: error: {one_line(err)}", file=sys.stderr)
    return EXIT_USAGE


def quiet_broken_pipe(main):
    """Decorator of a command's main: when the reader of stdout goes away (`eleatt ... | head`), end quietly with
    EXIT_BROKEN_PIPE instead of a BrokenPipeError traceback (stdout is pointed at /dev/null, so that Python's
    final flush cannot fail again)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):  # stdout without a file descriptor (captured)
                pass
            return EXIT_BROKEN_PIPE

    return wrapper


def load_failure(err: BaseException) -> str:
    """The first line of why a file could not be loaded, for a one-line message. numpy (allow_pickle=False) reads
    any file that is not .npy/.npz as a pickle and advises unpickling it, and torch (weights_only=True) advises
    `weights_only=False`: that advice is not ours to give (a file from elsewhere is never unpickled)."""
    if "allow_pickle" in str(err):
        return "not a NumPy .npy/.npz file"
    if "Weights only load failed" in str(err) or "weights_only=False" in str(err):  # torch's and timm's advice
        return "not a PyTorch file of tensors, or one holding arbitrary Python objects (never unpickled)"
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
