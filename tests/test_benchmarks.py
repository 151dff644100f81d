"""The benchmarks' own arithmetic (flow, start-up, training; the recurrent one is in tests/nn/test_kernel.py, the
GPU check in tests/test_gpu_check.py): figures computed from known inputs, and the flow benchmark's quick run."""
from __future__ import annotations

import pytest


def test_flow_steady_rate_is_pairs_over_the_workers_share_of_the_summed_video_seconds():
    from pipeline.benchmarks.flow import steady_rate

    records = [{"video": "a.mp4", "pairs": 10, "seconds": 1.5}, {"video": "b.mp4", "pairs": 30, "seconds": 2.5}]
    assert steady_rate(records, workers=2) == pytest.approx(40 / (4.0 / 2))
    assert steady_rate(records, workers=1) == pytest.approx(10.0)


def test_flow_benchmark_quick_puts_whole_process_and_steady_side_by_side(capsys):
    from pipeline.benchmarks import flow

    assert flow.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "2 clips x 12 frames of a generated 340x256 video" in out and "22 frame pairs per run" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["whole", "process"])
    whole, in_run, steady, in_process = (float(v) for v in lines[head + 1].split()[:4])
    assert 0 < whole < in_run  # the command's whole process includes its start-up: a lower rate than its run's
    assert steady > 0 and in_process > 0
    assert any(line.startswith("dis fast") for line in lines) and "bytes per frame pair" in out


def test_flow_benchmark_refuses_a_missing_video(tmp_path, capsys, monkeypatch):
    from pipeline.benchmarks import flow

    monkeypatch.setenv("ELEATT_BENCH_VIDEO", str(tmp_path / "missing.mp4"))
    assert flow.main(["--quick"]) == 2
    assert "missing.mp4' not found (--video or $ELEATT_BENCH_VIDEO)" in capsys.readouterr().err


def test_startup_table_ratios_are_medians_over_the_bare_interpreters():
    from pipeline.benchmarks.startup import format_table

    table = format_table({"python -c pass (reference)": [0.05, 0.04, 0.06], "eleatt --help": [0.3, 0.1, 0.2]})
    rows = [line.split() for line in table.splitlines()[1:]]
    assert rows[0][-4:] == ["0.050", "0.040", "0.060", "1.0"]
    assert rows[1][-4:] == ["0.200", "0.100", "0.300", "4.0"]


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("cuda", "gpu"), ("cuda:1", "gpu"), ("mps", "mps")])
def test_training_benchmark_device_to_lightning_accelerator(device, expected):
    from pipeline.benchmarks.train import accelerator

    assert accelerator(device) == expected


def test_flow_whole_process_rate_is_pairs_over_the_commands_wall_time(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    from pipeline.benchmarks import flow

    records = {"a.mp4": {"pairs": 30, "seconds": 0.1}, "b.mp4": {"pairs": 10, "seconds": 0.1}}
    monkeypatch.setattr(flow, "FlowFolder", lambda out: SimpleNamespace(finished=lambda: records))
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        time.sleep(0.4)
        return subprocess.CompletedProcess(command, 0, "flow: 2 done, 0 skipped, 0 failed of 2 videos -> /o; "
                                                       "123 frame pairs/s\n", "")

    monkeypatch.setattr(flow.subprocess, "run", fake_run)
    whole, in_run, steady = flow.whole_process(tmp_path / "list.txt", tmp_path, tmp_path / "out", 2)
    assert 40 / 1.0 < whole <= 40 / 0.4  # 40 pairs over the command's ~0.4 s
    assert in_run == 123.0  # the rate the command printed
    assert steady == pytest.approx(40 / (0.2 / 2))
    assert seen["command"][:4] == [sys.executable, "-m", "pipeline", "flow"]
    assert seen["command"][seen["command"].index("--workers") + 1] == "2"
