"""The scale benchmark (`python -m pipeline.benchmarks.scale`): its table from hand-made figures, and one tiny run."""
from __future__ import annotations

from pipeline.benchmarks import scale


def test_table_puts_sizes_side_by_side_with_ratios_to_the_previous_size():
    rows = [("resume", {1000: 0.5, 10_000: 4.0, 100_000: 50.0}, scale.seconds),
            ("peak", {1000: 2**20, 10_000: 10 * 2**20}, scale.megabytes),
            ("reads", {1000: 0, 10_000: 0, 100_000: 0}, scale.count, False),
            ("zero first", {1000: 0.0, 10_000: 3.0, 100_000: 6.0}, scale.seconds),
            ("gap", {1000: 1.0, 100_000: 100.0, 1_000_000: 1000.0}, scale.seconds)]
    lines = scale.format_table(rows, [1000, 10_000, 100_000, 1_000_000])
    cells = [line.split("  ") for line in lines]
    cells = [[c.strip() for c in row if c.strip()] for row in cells]
    assert cells[0] == ["videos", "1k", "10k", "100k", "1M"]
    assert cells[1] == ["resume", "0.5 s", "4 s (x8.0)", "50 s (x12.5)", "-"]
    assert cells[2] == ["peak", "1 MB", "10 MB (x10.0)", "-", "-"]
    assert cells[3] == ["reads", "0", "0", "0", "-"]  # no ratios on this row
    assert cells[4] == ["zero first", "0 ms", "3 s", "6 s (x2.0)", "-"]  # no ratio after a zero
    assert cells[5] == ["gap", "1 s", "-", "100 s", "1e+03 s (x10.0)"]  # nor after a missing size
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_a_tiny_run_prints_every_row(tmp_path, capsys):
    assert scale.main(["--sizes", "50", "--fuse-sizes", "50", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["videos", "50"] and len(out) == 12
    table = {line[:32].strip(): line[32:].split() for line in out[2:]}
    assert table["files read in full before it"] == ["0"]
    assert float(table["search / one fuse"][0]) > 0


def test_the_generated_flow_folder_resumes_as_a_run_written_one(tmp_path, monkeypatch):
    """Its records note each copy's size and time as `eleatt flow` writes them: a resume opens no zip (the row would
    otherwise time the full check of files recorded before that)."""
    import zipfile

    from pipeline.data.flow_files import FlowFolder

    root = scale.make_flow_folder(tmp_path, 5)
    opened = []
    real = zipfile.ZipFile
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    assert len(FlowFolder(root).finished()) == 5
    assert opened == []


def test_a_work_folder_that_is_a_file_is_one_line_and_kept(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert scale.main(["--quick", "--work", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert err == (f"scale benchmark: --work folder '{tmp_path / 'notes.txt'}' is an existing file, not a folder; "
                   "choose a folder path\n")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
