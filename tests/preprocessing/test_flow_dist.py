"""`eleatt flow` on several machines: shards of the list, per-shard locks and temporaries, settings written once, and
a sharded run killed on one rank and resumed with another number of ranks (every video exactly once, one folder)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.features import FeatureSettings, FolderLockedError, SettingsMismatchError, folder_lock, shard_lock
from pipeline.data.flow_files import FlowFolder, FlowOptions, flow_folder_settings, load_quantized
from preprocessing.flow import main, resolve_shard, share
from preprocessing.synthetic import write_lossless_video

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ which share
@pytest.mark.parametrize("given, environ, expected", [
    ("2/5", {}, (2, 5, "--shard")),
    (" 0/2 ", {"RANK": "1", "WORLD_SIZE": "3"}, (0, 2, "--shard")),  # the option over the launcher
    ("0/1", {"RANK": "1", "WORLD_SIZE": "3"}, None),  # one shard of one: the whole list
    (None, {"RANK": "1", "WORLD_SIZE": "3"}, (1, 3, "RANK/WORLD_SIZE")),
    (None, {"RANK": "0", "WORLD_SIZE": "1", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}, None),
    (None, {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4"},
     (3, 4, "SLURM_PROCID/SLURM_STEP_NUM_TASKS")),
    # the batch script of an allocation of 4 tasks (no srun step): a run of its own, not a quarter of the list
    (None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, None),
    (None, {}, None),
])
def test_the_share_comes_from_the_option_then_torchrun_then_srun(given, environ, expected):
    assert resolve_shard(given, environ) == expected


@pytest.mark.parametrize("given, environ, message", [
    ("3/3", {}, r"--shard 3/3: I must be in 0..N-1 .* got I = 3, N = 3"),
    ("0/0", {}, r"--shard 0/0: I must be in 0..N-1"),
    ("-1/2", {}, r"--shard '-1/2': expected I/N, two whole numbers"),
    ("1", {}, r"--shard '1': expected I/N"),
    ("a/b", {}, r"expected I/N"),
    (None, {"RANK": "x", "WORLD_SIZE": "2"}, r"environment RANK='x' WORLD_SIZE='2': not whole numbers"),
    (None, {"SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "4"}, r"SLURM_PROCID=4 SLURM_STEP_NUM_TASKS=4: the rank "
                                                               r"must be in 0..3"),
])
def test_a_bad_share_is_one_clear_line(given, environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_shard(given, environ)


def test_shares_split_the_list_by_position_whatever_is_finished():
    videos = [f"v{i}" for i in range(8)]
    assert [share(videos, r, 3) for r in range(3)] == [["v0", "v3", "v6"], ["v1", "v4", "v7"], ["v2", "v5"]]
    for world in (1, 2, 3, 5, 9):
        shares = [share(videos, r, world) for r in range(world)]
        assert sorted(v for s in shares for v in s) == videos


def test_a_bad_shard_option_exits_2_before_any_work(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("a.mp4 0\n")
    code = main(["--list", str(tmp_path / "list.txt"), "--root", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--shard", "4/4", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eleatt flow: error: --shard 4/4: I must be in 0..N-1" in err
    assert not (tmp_path / "out").exists()
    assert main(["--out", str(tmp_path / "out"), "--export-jpg", str(tmp_path / "jpg"), "--shard", "0/2"]) == 2
    assert "--import-jpg and --export-jpg run whole" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ locks
def test_shards_of_one_split_coexist_and_refuse_the_rest(tmp_path):
    root = tmp_path / "flow"
    with shard_lock(root, "flow --shard 0/3", 0, 3, "flow folder"):
        with shard_lock(root, "flow --shard 1/3", 1, 3, "flow folder"):  # another shard of the split: runs
            pass
        with pytest.raises(FolderLockedError, match=r"shard 0/3 of flow folder .* is being written by `eleatt flow "
                                                    r"--shard 0/3` \(pid \d+ .*each shard runs once at a time"):
            with shard_lock(root, "flow --shard 0/3", 0, 3, "flow folder"):
                pass
        with pytest.raises(FolderLockedError, match=r"is being written by a run split into 3 shards \(e.g. `eleatt "
                                                    r"flow --shard 0/3`.*run the missing shards as --shard I/3"):
            with shard_lock(root, "flow --shard 1/2", 1, 2, "flow folder"):
                pass
        with pytest.raises(FolderLockedError, match=r"flow folder '.*' is being written by `eleatt flow --shard "
                                                    r"0/3`"):
            with folder_lock(root, "flow", "flow folder"):  # an unsharded run
                pass
    # all released: another split, then an unsharded run
    with shard_lock(root, "flow --shard 1/2", 1, 2):
        pass
    with folder_lock(root, "flow", "flow folder"):
        with pytest.raises(FolderLockedError, match=r"is being written by `eleatt flow` \(pid"):
            with shard_lock(root, "flow --shard 0/2", 0, 2, "flow folder"):
                pass


def test_the_cli_refuses_an_unsharded_run_while_a_shard_runs(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("a.mp4 0\n")
    out = tmp_path / "flow"
    args = ["--list", str(tmp_path / "list.txt"), "--root", str(tmp_path), "--out", str(out), "--no-progress",
            "--workers", "1"]
    with shard_lock(out, "flow --shard 1/2", 1, 2, "flow folder"):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "refused" not in err and "is being written by `eleatt flow --shard 1/2`" in err
        assert main([*args, "--shard", "1/2"]) == 2
        assert "shard 1/2 of flow folder" in capsys.readouterr().err
        assert main([*args, "--shard", "0/3"]) == 2
        assert "split into 2 shards" in capsys.readouterr().err
    assert not list(out.glob("manifest*")) and not list(out.glob("failed*"))


def test_a_shard_removes_stale_temporaries_but_not_a_running_shards(tmp_path):
    root = tmp_path / "flow"
    tmp = root / ".eleatt-tmp"
    for where in ("", "shard-0-of-3", "shard-1-of-3", "shard-2-of-3", "shard-0-of-2"):
        (tmp / where).mkdir(parents=True, exist_ok=True)
        (tmp / where / ".eleatt-tmp.x.part").write_bytes(b"partial")
    mine = FlowFolder(root, 1, 3)
    assert mine.tmp_dir == tmp / "shard-1-of-3"
    with shard_lock(root, "flow --shard 0/3", 0, 3):  # shard 0 runs: its file stays
        with mine.lock("flow --shard 1/3"):
            assert mine.remove_stale_temporaries() == 4
    assert sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*.part")) == ["shard-0-of-3/.eleatt-tmp.x.part"]
    assert sorted(p.name for p in tmp.iterdir()) == ["shard-0-of-3", "shard-1-of-3"]  # the dead shards' folders go
    with FlowFolder(root).lock("flow"):  # unsharded: nobody else runs, everything goes
        assert FlowFolder(root).remove_stale_temporaries() == 1
    assert not list(tmp.rglob("*.part")) and not list(tmp.iterdir())


# ------------------------------------------------------------------------------------------------ settings.json
def _check(root: str, bound: float, start, queue) -> None:
    start.wait()
    try:
        FlowFolder(root).check_settings(flow_folder_settings(FlowOptions(bound=bound)))
        queue.put(("ok", bound))
    except SettingsMismatchError as err:
        queue.put(("refused", str(err)))


@pytest.mark.parametrize("bounds", [(20.0,) * 6, (20.0, 15.0) * 3])
def test_ranks_racing_to_write_the_settings_agree_or_are_refused(tmp_path, bounds):
    ctx = mp.get_context("fork")
    start, queue = ctx.Barrier(len(bounds)), ctx.Queue()
    procs = [ctx.Process(target=_check, args=(str(tmp_path / "flow"), b, start, queue)) for b in bounds]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    stored = FlowOptions.of(FeatureSettings.from_json(json.loads((tmp_path / "flow" / "settings.json").read_text())))
    winners = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == "refused"]
    assert all(bound == stored.bound for _, bound in winners)  # every rank that goes on agrees with the file
    assert len(winners) == bounds.count(stored.bound) and len(refused) == len(bounds) - len(winners)
    assert all("options.bound: stored" in message for _, message in refused)
    assert not [p.name for p in (tmp_path / "flow").iterdir() if p.name.startswith(".settings.")]


# ------------------------------------------------------------------------------------------------ the done-when run
def _translating(frames: int) -> np.ndarray:
    import cv2

    noise = np.random.default_rng(3).random((240, 280, 3)).astype(np.float32)
    tex = (cv2.GaussianBlur(noise, (0, 0), 3) * 255).astype(np.uint8)
    return np.stack([tex[40 + t:104 + t, 40 + 2 * t:120 + 2 * t] for t in range(frames)])


def _copies(root: Path, frames: np.ndarray, count: int) -> list[str]:
    """`count` videos of the same frames (hard links of one file) and `root/list.txt` listing them."""
    write_lossless_video(root / "v000.mp4", frames)
    names = ["v000.mp4"] + [f"v{i:03d}.mp4" for i in range(1, count)]
    for name in names[1:]:
        os.link(root / names[0], root / name)
    (root / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    return names


def _manifest_videos(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for shard in sorted(out.glob("manifest*.jsonl")):
        for line in shard.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by the kill is no record
                continue
            counts[record["video"]] = counts.get(record["video"], 0) + 1
    return counts


def test_three_ranks_one_killed_then_two_ranks_do_every_video_once(tmp_path):
    root, out = tmp_path / "videos", tmp_path / "flow"
    names = _copies(root, _translating(60), 24)  # 24 videos, 8 per rank of 3, 12 per rank of 2
    args = ["--list", str(root / "list.txt"), "--root", str(root), "--out", str(out), "--short-side", "0",
            "--workers", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["PYTHONPATH"] = str(REPO)

    def launch(shard: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "flow", *args, "--shard", shard], cwd=REPO,
                                env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    ranks = [launch(f"{r}/3", tmp_path / f"log{r}.txt") for r in range(3)]
    victim, deadline = ranks[1], time.monotonic() + 180
    try:
        while victim.poll() is None and time.monotonic() < deadline:
            shard = out / "manifest.rank1.jsonl"
            if shard.exists() and len(shard.read_bytes().splitlines()) >= 2:
                break
            time.sleep(0.01)
    finally:
        victim.send_signal(signal.SIGKILL)
    codes = [p.wait(timeout=180) for p in ranks]
    logs = [(tmp_path / f"log{r}.txt").read_text() for r in range(3)]
    assert codes == [0, -signal.SIGKILL, 0], logs
    assert "flow (shard 0/3): 8 done, 0 skipped, 0 failed of 8 videos" in logs[0]
    assert "flow (shard 2/3): 8 done, 0 skipped, 0 failed of 8 videos" in logs[2]
    first = _manifest_videos(out)
    assert 16 + 2 <= len(first) < 24 and set(first.values()) == {1}

    again = [launch(f"{r}/2", tmp_path / f"again{r}.txt") for r in range(2)]
    codes = [p.wait(timeout=180) for p in again]
    logs = [(tmp_path / f"again{r}.txt").read_text() for r in range(2)]
    assert codes == [0, 0], logs
    redone = sum(int(log.split(": ")[1].split(" done")[0]) for log in logs)
    assert redone == 24 - len(first)  # only the killed rank's unfinished videos, each by one of the two ranks

    assert _manifest_videos(out) == {n: 1 for n in names}  # every video once over all the shards
    assert not [p for p in (out / ".eleatt-tmp").rglob("*") if p.is_file()]  # the killed rank's partial file went
    assert not list((out / ".eleatt-tmp").iterdir())  # shards remove their temporary folders (a killed one's too)
    folder = FlowFolder(out)  # one folder, read as a whole
    assert set(folder.finished()) == set(names) and not folder.failed()
    reference = load_quantized(out / "v000.flow.zip")[0]
    assert reference.shape == (59, 2, 64, 80)
    for name in names:
        assert np.array_equal(load_quantized(folder.feature_path(name))[0], reference), name


def test_settings_are_written_once_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    folder = FlowFolder(tmp_path / "flow")
    settings = folder.check_settings(flow_folder_settings(FlowOptions(bound=20.0)))
    assert FlowFolder(tmp_path / "flow").settings == settings
    assert FlowFolder(tmp_path / "flow").check_settings(flow_folder_settings(FlowOptions(bound=20.0))) == settings
    with pytest.raises(SettingsMismatchError, match=r"options.bound: stored 20.0, asked 10.0"):
        FlowFolder(tmp_path / "flow").check_settings(flow_folder_settings(FlowOptions(bound=10.0)))
    assert sorted(p.name for p in (tmp_path / "flow").iterdir()) == ["settings.json"]


def test_settings_being_written_by_another_rank_are_waited_for(tmp_path, monkeypatch):
    import threading

    folder = FlowFolder(tmp_path / "flow")
    wanted = flow_folder_settings(FlowOptions(bound=20.0))
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / "settings.json").write_text('{"format": 1, ')  # half written by another rank
    whole = json.dumps(wanted.to_json())
    timer = threading.Timer(0.3, lambda: (tmp_path / "flow" / "settings.json").write_text(whole))
    timer.start()
    try:
        assert folder.check_settings(wanted) == wanted
    finally:
        timer.join()
    old = tmp_path / "old"
    old.mkdir()
    (old / "settings.json").write_text('{"format": 1, ')
    os.utime(old / "settings.json", (time.time() - 60, time.time() - 60))  # damaged long ago: refused at once
    start = time.monotonic()
    with pytest.raises(ValueError, match="is not valid JSON"):
        FlowFolder(old).check_settings(wanted)
    assert time.monotonic() - start < 0.5


def test_a_shard_writes_its_temporaries_in_its_own_folder(tmp_path, monkeypatch):
    import pipeline.paths as paths

    used: list[Path] = []
    real = paths.atomic_write

    def spy(path, mode="wb", tmp_dir=None, **kw):
        used.append(Path(tmp_dir))
        return real(path, mode, tmp_dir=tmp_dir, **kw)

    monkeypatch.setattr("pipeline.data.flow_files.atomic_write", spy)
    monkeypatch.setattr("pipeline.data.features.atomic_write", spy)
    FlowFolder(tmp_path / "flow", 2, 5).write_quantized("a.mp4", np.zeros((2, 2, 8, 8), np.uint8), 20.0)
    FlowFolder(tmp_path / "flow").write_quantized("b.mp4", np.zeros((2, 2, 8, 8), np.uint8), 20.0)
    from pipeline.data.features import FeatureFolder

    FeatureFolder(tmp_path / "feat", 1, 2).write("c.mp4", np.ones((1, 2), np.float32))
    assert used == [tmp_path / "flow" / ".eleatt-tmp" / "shard-2-of-5", tmp_path / "flow" / ".eleatt-tmp",
                    tmp_path / "feat" / ".eleatt-tmp" / "shard-1-of-2"]
    assert json.loads((tmp_path / "flow" / "manifest.rank2.jsonl").read_text())["video"] == "a.mp4"


def test_a_shards_worker_writes_into_the_shards_folder_and_manifest(tmp_path, monkeypatch, capsys):
    import preprocessing.flow as flowmod

    root = tmp_path / "videos"
    frames = np.random.default_rng(1).integers(0, 255, (4, 32, 40, 3), dtype=np.uint8)
    names = [f"v{i}.mp4" for i in range(5)]
    for name in names:
        write_lossless_video(root / name, frames)
    (root / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    seen: list[tuple] = []
    real = FlowFolder.writer

    def spy(self, video, *a, **k):
        seen.append((video, self.tmp_dir.name, self.manifest_path.name))
        return real(self, video, *a, **k)

    monkeypatch.setattr(FlowFolder, "writer", spy)
    args = ["--list", str(root / "list.txt"), "--root", str(root), "--out", str(tmp_path / "flow"), "--short-side",
            "0", "--workers", "1", "--no-progress"]
    assert flowmod.main([*args, "--shard", "1/2"]) == 0
    assert "flow (shard 1/2): 2 done, 0 skipped, 0 failed of 2 videos" in capsys.readouterr().out
    assert seen == [("v1.mp4", "shard-1-of-2", "manifest.rank1.jsonl"), ("v3.mp4", "shard-1-of-2",
                                                                        "manifest.rank1.jsonl")]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert flowmod.main(args) == 0  # torchrun's rank 0 of 3: v0 and v3, v3 finished by the shard of 2
    assert "flow (shard 0/3 from RANK/WORLD_SIZE): 1 done, 1 skipped, 0 failed of 2 videos" in capsys.readouterr().out
    assert [json.loads(line)["video"] for line in (tmp_path / "flow" / "manifest.rank0.jsonl").read_text()
            .splitlines()] == ["v0.mp4"]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert flowmod.main(args) == 0  # the rest in one process, into the unsharded manifest
    assert "flow: 2 done, 3 skipped, 0 failed of 5 videos" in capsys.readouterr().out
    assert set(FlowFolder(tmp_path / "flow").finished()) == set(names)


def test_without_hard_links_a_rank_that_loses_the_race_compares(tmp_path, monkeypatch):
    root = tmp_path / "flow"
    other = json.dumps(flow_folder_settings(FlowOptions(bound=15.0)).to_json())

    def another_rank_wins(src, dst):  # settings.json appears between the check and the write, then no link
        Path(dst).write_text(other)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", another_rank_wins)
    with pytest.raises(SettingsMismatchError, match=r"options.bound: stored 15.0, asked 20.0"):
        FlowFolder(root).check_settings(flow_folder_settings(FlowOptions(bound=20.0)))
    (root / "settings.json").unlink()
    other = json.dumps(flow_folder_settings(FlowOptions(bound=20.0)).to_json())
    assert FlowOptions.of(FlowFolder(root).check_settings(flow_folder_settings(FlowOptions(bound=20.0)))).bound == 20


def test_a_lock_file_that_is_a_link_or_a_folder_is_one_clear_line(tmp_path):
    root = tmp_path / "flow"
    root.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (root / ".eleatt-lock").symlink_to(precious)  # never followed: writing the holder would truncate it
    with pytest.raises(FolderLockedError, match=r"lock file '.*\.eleatt-lock' cannot be opened .*not a plain file"):
        with folder_lock(root, "flow"):
            pass
    assert precious.read_text() == "keep me"
    (root / ".eleatt-lock").unlink()
    (root / ".eleatt-lock.shard-0-of-2").mkdir()
    with pytest.raises(FolderLockedError, match=r"lock file '.*\.eleatt-lock\.shard-0-of-2' cannot be opened"):
        with shard_lock(root, "flow --shard 0/2", 0, 2):
            pass
    (root / ".eleatt-lock.world-7").mkdir()  # not a lock file: no split of 7 is running
    with shard_lock(root, "flow --shard 1/2", 1, 2):
        pass


def test_a_shards_progress_bar_names_the_shard(tmp_path, monkeypatch):
    import preprocessing.flow as flowmod

    descs: list[str] = []
    real = flowmod.tqdm
    monkeypatch.setattr(flowmod, "tqdm", lambda *a, **k: descs.append(k["desc"]) or real(*a, **{**k, "disable": True}))
    (tmp_path / "list.txt").write_text("")
    for shard in ("2/4", "0/1"):
        assert flowmod.main(["--list", str(tmp_path / "list.txt"), "--root", str(tmp_path), "--out",
                             str(tmp_path / "flow"), "--workers", "1", "--shard", shard]) == 0
    assert descs == ["flow 2/4", "flow"]


def test_the_flow_stream_reads_a_sharded_flow_folder_as_one(tmp_path, capsys):
    from pipeline.data.features import FeatureFolder
    from preprocessing.extract import main as extract_main

    out = tmp_path / "flow"
    rng = np.random.default_rng(4)
    names = [f"c{i % 2}/v{i}.mp4" for i in range(5)]
    for i, name in enumerate(names):  # written by shards i % 3 of 3, one by a plain run
        folder = FlowFolder(out) if i == 4 else FlowFolder(out, i % 3, 3)
        folder.check_settings(flow_folder_settings(FlowOptions()))
        folder.write_quantized(name, rng.integers(0, 256, (4 + i, 2, 32, 32), dtype=np.uint8), 20.0,
                               source_fps=25.0)
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest.jsonl", "manifest.rank0.jsonl",
                                                            "manifest.rank1.jsonl", "manifest.rank2.jsonl"]
    (tmp_path / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    features = tmp_path / "features"
    assert extract_main(["--modality", "flow", "--stack", "2", "--root", str(out), "--list", str(tmp_path / "list.txt"),
                         "--out", str(features), "--backbone", "test_resnet", "--weights", "none", "--device", "cpu",
                         "--workers", "0", "--no-progress"]) == 0
    assert "5 done, 0 skipped, 0 failed of 5 videos" in capsys.readouterr().out
    done = FeatureFolder(features).finished()
    assert {v: r["frames"] for v, r in done.items()} == {n: 4 + i for i, n in enumerate(names)}  # a step per pair


@pytest.mark.parametrize("environ, gpus, device", [
    ({"LOCAL_RANK": "3", "SLURM_LOCALID": "0"}, 4, "cuda:3"),  # torchrun's local rank first
    ({"SLURM_LOCALID": "1"}, 2, "cuda:1"),
    ({"LOCAL_RANK": "5"}, 4, "cuda:1"),  # more processes than GPUs: they share them in turn
    ({"LOCAL_RANK": "2"}, 1, "cuda"),  # one GPU visible (srun --gpus-per-task 1, CUDA_VISIBLE_DEVICES)
    ({}, 2, "cuda"),
    ({"LOCAL_RANK": "x"}, 2, "cuda"),
    ({"LOCAL_RANK": "1"}, 0, "cpu"),
])
def test_raft_takes_the_gpu_of_its_local_rank(environ, gpus, device):
    from pipeline.data.flow_estimation import raft_device

    assert raft_device(environ, gpus) == device
