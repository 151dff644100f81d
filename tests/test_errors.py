"""pipeline.errors: which exceptions are the user's (one line, exit 2) and how that line reads."""
from __future__ import annotations

import errno

import pytest

from pipeline.errors import EXIT_USAGE, InputNotFoundError, UsageError, UserError, is_user_error, usage_error


def test_bad_input_and_paths_the_user_gave_are_user_errors():
    assert is_user_error(UsageError("bad --x"))
    assert is_user_error(InputNotFoundError("scores file 'a.npz' not found"))
    assert is_user_error(PermissionError(errno.EACCES, "Permission denied", "/out/x"))
    # our errors stay what library callers catch
    assert isinstance(UsageError("x"), ValueError) and isinstance(InputNotFoundError("x"), FileNotFoundError)
    assert issubclass(UsageError, UserError) and issubclass(InputNotFoundError, UserError)
    # a ValueError or FileNotFoundError raised inside numpy, torch or our own code by mistake is a bug
    assert not is_user_error(ValueError("operands could not be broadcast together"))
    assert not is_user_error(FileNotFoundError("no such file"))
    # an OSError about no path (a broken pipe, a device) is a real failure: it keeps its traceback
    assert not is_user_error(OSError(errno.EPIPE, "Broken pipe"))
    assert not is_user_error(RuntimeError("CUDA error"))


def test_usage_error_prints_one_line_naming_the_path(capsys):
    assert usage_error("fuse", PermissionError(errno.EACCES, "Permission denied", "/out/fused.npz")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "eleatt fuse: error: cannot use '/out/fused.npz': Permission denied\n"


def test_a_closed_pipe_ends_quietly_with_141():
    """`... | head`: the reader goes away after the first line; the command ends without a traceback, exit 141."""
    import subprocess

    import os
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.benchmarks.rnn", "--quick", "--repeats", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_quiet_broken_pipe_passes_the_exit_code_through():
    from pipeline.errors import quiet_broken_pipe

    assert quiet_broken_pipe(lambda: 3)() == 3


def _raises(err):
    def main(argv):
        raise err
    return main


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(monkeypatch, capsys):
    """The dispatcher: our error -> one line, exit 2; a plain ValueError from a library -> the traceback (a bug)."""
    from pipeline import cli

    monkeypatch.setitem(cli.COMMANDS, "boom", ("tests.test_errors", "BOOM", "raises"))
    monkeypatch.setattr("tests.test_errors.BOOM", _raises(UsageError("list 'x.txt' line 3: no label; add one")),
                        raising=False)
    assert cli.main(["boom"]) == EXIT_USAGE
    assert capsys.readouterr().err == "eleatt boom: error: list 'x.txt' line 3: no label; add one\n"
    monkeypatch.setattr("tests.test_errors.BOOM", _raises(ValueError("operands could not be broadcast")))
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["boom"])
