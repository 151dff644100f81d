"""`make gpu-check` (pipeline/benchmarks/gpu_check.py): its dry run on a machine without a GPU, what it writes, and
how it reports a failing step, a spent time budget and a bad output folder. (CI runs the whole dry run.)"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from pipeline.benchmarks import gpu_check


def _report(out):
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_dry_run_measures_the_recurrent_rows_and_says_it_is_dry(tmp_path, capsys):
    assert gpu_check.main(["--dry", "--out", str(tmp_path), "--steps", "recurrent"]) == 0
    report, table = _report(tmp_path)
    assert report["environment"]["dry"] is True and report["environment"]["device"] == "cpu"
    [step] = report["steps"]
    assert step["name"] == "recurrent" and step["status"] == "ok"
    names = [f["what"].split(",")[0].split(" ") for f in step["figures"]]
    assert names == [[m, k] for m in ("nn.LSTM", "EleAttLSTM", "nn.GRU", "EleAttGRU") for k in ("fwd", "fwd+bwd")]
    for f in step["figures"]:
        assert f["value"] > 0 and f["unit"] == "ms"
        ours = f["what"].startswith("EleAtt")
        assert (f["ratio"] is not None) == ours and (f["target"] == "<= 2.5x") == ours
    lstm = {f["what"]: f["value"] for f in step["figures"]}
    ratio = next(f["ratio"] for f in step["figures"] if f["what"].startswith("EleAttGRU fwd+bwd"))
    assert ratio == pytest.approx(lstm[next(k for k in lstm if k.startswith("EleAttGRU fwd+bwd"))]
                                  / lstm[next(k for k in lstm if k.startswith("nn.GRU fwd+bwd"))])
    assert "DRY RUN" in table and "measure nothing on a GPU" in table
    assert "| recurrent | ok |" in table
    assert "DRY RUN" in capsys.readouterr().out


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def boom(ctx, step):
        raise RuntimeError("cuda kernel exploded\nsecond line")

    monkeypatch.setitem(gpu_check.RUNNERS, "extraction", boom)
    monkeypatch.setitem(gpu_check.RUNNERS, "raft", lambda ctx, step: step.figures.append(
        gpu_check.Figure("pairs", 3.0, "pairs/s")))
    assert gpu_check.main(["--dry", "--out", str(tmp_path), "--steps", "extraction", "raft"]) == 1
    report, table = _report(tmp_path)
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("extraction", "failed"), ("raft", "ok")]
    assert report["steps"][0]["note"] == "RuntimeError: cuda kernel exploded"
    assert "| extraction | failed |" in table and "RuntimeError: cuda kernel exploded" in table
    assert "| raft | ok |" in table and "3 pairs/s" in table


def test_a_spent_time_budget_skips_the_remaining_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.RUNNERS, "recurrent", lambda ctx, step: time.sleep(0.3))
    monkeypatch.setitem(gpu_check.RUNNERS, "raft", lambda ctx, step: None)
    assert gpu_check.main(["--dry", "--out", str(tmp_path), "--steps", "recurrent", "raft", "--budget", "0.2"]) == 1
    report, _ = _report(tmp_path)
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("recurrent", "ok"), ("raft", "skipped")]
    assert "time budget of 0 s spent" in report["steps"][1]["note"]


def test_an_output_path_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert gpu_check.main(["--dry", "--out", str(tmp_path / "file"), "--steps", "raft"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an existing file" in err and "Traceback" not in err


@pytest.mark.parametrize("stdout, code, status, counts", [
    ("..s.\n3 passed, 1 skipped in 2.01s\n", 0, "ok", {"passed": 3.0, "skipped": 1.0}),
    ("F.\nFAILED tests/test_gpu.py::test_x - AssertionError\n1 failed, 1 passed in 1.00s\n", 1, "failed",
     {"passed": 1.0, "failed": 1.0}),
    ("ssss\n4 skipped in 0.10s\n", 0, "failed", {"passed": 0.0, "skipped": 4.0}),  # nothing ran: not a pass
])
def test_the_tests_step_reads_pytests_summary(tmp_path, monkeypatch, stdout, code, status, counts):
    seen = {}

    def fake_run(command, **kwargs):
        seen.update(command=command, env=kwargs["env"])
        return subprocess.CompletedProcess(command, code, stdout, "")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    assert gpu_check.main(["--dry", "--out", str(tmp_path), "--steps", "tests"]) == (0 if status == "ok" else 1)
    [step] = _report(tmp_path)[0]["steps"]
    assert step["status"] == status
    assert {f["what"].split()[1]: f["value"] for f in step["figures"]} == counts
    assert seen["command"][-3:] == ["-m", "gpu", str(gpu_check.REPO / "tests" / "test_gpu.py")]
    assert seen["env"]["ELEATT_GPU_TESTS_DEVICE"] == "cpu"  # the dry run runs the GPU tests on the CPU
    if status == "failed" and code:
        assert "FAILED tests/test_gpu.py::test_x" in step["note"]


def test_without_a_cuda_device_it_runs_dry_by_itself_and_says_why(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(gpu_check.RUNNERS, "raft", lambda ctx, step: seen.update(device=ctx.device, dry=ctx.dry))
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "raft"]) == 0
    assert seen == {"device": "cpu", "dry": True}
    report, table = _report(tmp_path)
    assert report["environment"]["dry"] is True and report["environment"]["cuda_available"] is False
    assert "DRY RUN on the CPU: no CUDA device found" in table
    assert "DRY RUN (no CUDA device found)" in capsys.readouterr().out
