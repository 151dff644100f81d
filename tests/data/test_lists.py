"""The list format: parsing (CRLF, comments, spaces in paths), errors naming file:line, atomic round trips."""
from pathlib import Path

import pytest

from pipeline.data.lists import ListEntry, classes_path_for, read_classes, read_list, write_classes, write_list


def test_read_list_tolerates_crlf_comments_blank_lines_and_spaces(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"# header\r\nApplyEyeMakeup/v_a.avi 0\r\n\r\nmy videos/clip 1.mp4 3\r\nraw/folder_7 -1\r\n")
    assert read_list(path) == [
        ListEntry("ApplyEyeMakeup/v_a.avi", 0),
        ListEntry("my videos/clip 1.mp4", 3),
        ListEntry("raw/folder_7", -1),
    ]


@pytest.mark.parametrize("line, needle", [("only_a_path.avi", "expected"), ("a.avi x", "not an integer"),
                                          ("a.avi -2", "negative")])
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    path = tmp_path / "bad.txt"
    path.write_text(f"ok.avi 1\n{line}\n")
    with pytest.raises(ValueError, match=needle) as info:
        read_list(path)
    assert f"{path}:2" in str(info.value)


def test_missing_list_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_list(tmp_path / "nope.txt")


def test_round_trip_and_classes(tmp_path):
    entries = [ListEntry("a b/c.mp4", 2), ListEntry("d.avi", -1)]
    write_list(tmp_path / "l" / "test.txt", entries)
    assert read_list(tmp_path / "l" / "test.txt") == entries
    write_list(tmp_path / "pairs.txt", [("x.mp4", 0)])
    assert read_list(tmp_path / "pairs.txt") == [ListEntry("x.mp4", 0)]
    write_classes(classes_path_for(tmp_path / "l" / "test.txt"), ["HammerThrow", "Hammering"])
    assert read_classes(tmp_path / "l" / "classes.txt") == ["HammerThrow", "Hammering"]
    assert not list(Path(tmp_path / "l").glob("*.tmp"))


def test_write_refuses_unwritable_paths(tmp_path):
    with pytest.raises(ValueError):
        write_list(tmp_path / "x.txt", [(" lead.mp4", 0)])
    with pytest.raises(ValueError):
        write_classes(tmp_path / "classes.txt", ["ok", ""])


def test_byte_order_mark_is_not_part_of_the_first_path(tmp_path):
    """Lists and class files saved by Windows editors start with a UTF-8 BOM; it must not end up in a path."""
    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbfa/first.avi 0\r\nb.avi 1\r\n")
    assert read_list(path) == [ListEntry("a/first.avi", 0), ListEntry("b.avi", 1)]
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"\xef\xbb\xbfApplyEyeMakeup\r\nArchery\r\n")
    assert read_classes(classes) == ["ApplyEyeMakeup", "Archery"]


@pytest.mark.parametrize("encoding, says", [("utf-16", "UTF-16 or UTF-32"), ("latin-1", "not UTF-8 (byte 0xe9 on line 2")])
def test_a_list_in_another_encoding_names_the_file_and_the_fix(tmp_path, encoding, says):
    path = tmp_path / "train.txt"
    path.write_bytes("a/one.mp4 0\nb/café.mp4 1\n".encode(encoding))
    with pytest.raises(ValueError) as err:
        read_list(path)
    text = str(err.value)
    assert f"list file '{path}' is {says}" in text and "expected UTF-8 lines of '<relative path> <label>'" in text
    assert "iconv" in text
