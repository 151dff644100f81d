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
from pipeline.paths import (OutputIsInputError, OutputLocationError, atomic_path, atomic_write, check_not_input,
                            ensure_writable_dir, ensure_writable_file)
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


def test_an_output_that_is_an_input_is_refused_however_it_is_spelled(tmp_path):
    """Outputs never replace inputs: the same path, another spelling of it, a symbolic link to it, a hard link."""
    ckpt = tmp_path / "run" / "best.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    (tmp_path / "link.ckpt").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.ckpt")
    for out in (ckpt, tmp_path / "run" / ".." / "run" / "best.ckpt", tmp_path / "link.ckpt", tmp_path / "hard.ckpt"):
        with pytest.raises(OutputIsInputError, match=r"^--out '.*' is one of the input files \('.*best.ckpt'\): "
                                                     "writing it would destroy that input; choose another output"):
            check_not_input(out, [tmp_path / "other.npz", ckpt], "--out")
    check_not_input(tmp_path / "run" / "model.onnx", [ckpt, None], "--out")  # another file; None: option not given
    check_not_input(tmp_path / "run" / "sub", [tmp_path / "run"], "--out")  # nested, but not asked about
    with pytest.raises(OutputIsInputError, match="is inside the input"):
        check_not_input(tmp_path / "run" / "sub", [tmp_path / "run"], "--export-jpg folder", nested=True)
    with pytest.raises(OutputIsInputError, match="is a folder holding the input"):
        check_not_input(tmp_path, [tmp_path / "run"], "--export-jpg folder", nested=True)
    with pytest.raises(OutputIsInputError, match="one of the input folders"):
        check_not_input(tmp_path / "run", [tmp_path / "run"], "--out")
    assert ckpt.read_bytes() == b"weights"


def test_a_file_output_that_is_a_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "dir").mkdir()
    for check in (lambda p: ensure_writable_file(p, "--out"), lambda p: atomic_write(p).__enter__(),
                  lambda p: atomic_path(p).__enter__()):
        with pytest.raises(OutputLocationError, match=r"'.*dir' is an existing folder, not a file; give a file path"):
            check(tmp_path / "dir")
    assert ensure_writable_file(tmp_path / "new" / "f.npz") == tmp_path / "new" / "f.npz"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dir"]  # nothing written, no temporary left


def test_atomic_path_replaces_the_file_only_when_the_writer_finished(tmp_path, umask):
    umask(0o027)
    out = tmp_path / "model.pt2"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".pt2") and tmp.name.startswith(".eleatt-tmp")
            tmp.write_bytes(b"half")
            raise RuntimeError("exporter failed")
    assert out.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [out]
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [out]
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


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
