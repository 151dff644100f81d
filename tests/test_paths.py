"""Output locations, atomic writes with the user's umask, and what the dispatcher makes of errors and Ctrl-C."""
from __future__ import annotations

import os
import stat
import sys
import types

import numpy as np
import pytest

from pipeline import cli
from pipeline.data.lists import ListEntry, write_list
from pipeline.paths import OutputLocationError, atomic_write, ensure_writable_dir
from pipeline.evaluation.scores import write_scores


@pytest.fixture
def umask():
    """Sets a umask for one test and restores the old one."""
    old = os.umask(0o022)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def test_files_we_write_get_the_umask_permissions(tmp_path, umask):
    for mask in (0o022, 0o002):
        umask(mask)
        write_list(tmp_path / f"list{mask}.txt", [ListEntry("a.mp4", 0)])
        write_scores(tmp_path / f"scores{mask}.npz", ["a"], np.ones((1, 2)), np.zeros(1, np.int64), None)
        for name in (f"list{mask}.txt", f"scores{mask}.npz"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list18.txt", "list2.txt", "scores18.npz", "scores2.npz"]


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_output_locations_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputLocationError, match=r"--out '.*file' is an existing file"):
        ensure_writable_dir(tmp_path / "file", "--out")
    with pytest.raises(OutputLocationError, match="a parent of it .* is a file"):
        ensure_writable_dir(tmp_path / "file" / "sub", "--out")
    assert not ensure_writable_dir(tmp_path / "new" / "sub").exists()  # checked, not created: nothing left behind
    assert ensure_writable_dir(tmp_path / "new" / "sub", create=True).is_dir()
    assert list(tmp_path.rglob("*")) == [tmp_path / "file", tmp_path / "new", tmp_path / "new" / "sub"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    with pytest.raises(OutputLocationError, match="is not writable"):
        ensure_writable_dir(locked, "run folder")


@pytest.mark.parametrize("command, flag", [("prepare", ["synthetic", "--out"]), ("demo", ["--quick", "--out"])])
def test_commands_refuse_an_output_that_is_a_file(tmp_path, capsys, command, flag):
    (tmp_path / "taken").write_text("x")
    assert cli.main([command, *flag, str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{tmp_path / 'taken'}' is an existing file" in err


def _fake_command(monkeypatch, body):
    module = types.ModuleType("fake_long_command")
    module.main = body
    monkeypatch.setitem(sys.modules, "fake_long_command", module)
    monkeypatch.setitem(cli.COMMANDS, "long", ("fake_long_command", "main", "a long command"))


def test_ctrl_c_in_any_command_exits_130_with_the_resume_command(monkeypatch, capsys):
    def body(argv):
        raise KeyboardInterrupt

    _fake_command(monkeypatch, body)
    assert cli.main(["long", "--out", "my dir"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted (Ctrl-C)" in err and "eleatt long --out 'my dir'" in err

    def noted(argv):
        from pipeline.errors import set_interrupt_note

        set_interrupt_note("kept 3 of 5 videos in out/; resume with: eleatt long")
        raise KeyboardInterrupt

    _fake_command(monkeypatch, noted)
    assert cli.main(["long"]) == 130
    assert "kept 3 of 5 videos in out/" in capsys.readouterr().err


def test_an_os_error_naming_a_file_is_one_line(monkeypatch, capsys):
    def body(argv):
        raise PermissionError(13, "Permission denied", "/data/out/x.npy")

    _fake_command(monkeypatch, body)
    assert cli.main(["long"]) == 2
    assert capsys.readouterr().err == "eleatt long: error: cannot use '/data/out/x.npy': Permission denied\n"


def test_ctrl_c_caught_by_a_library_that_exits_still_gives_130(monkeypatch, capsys):
    import signal
    import time

    def body(argv):  # what Lightning's loops do with a KeyboardInterrupt: tear down, then sys.exit(1)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            sys.exit(1)

    _fake_command(monkeypatch, body)
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["long", "--out", "x"]) == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is not left ignored
