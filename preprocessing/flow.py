"""`eleatt flow`: dense optical flow of every video of a list, stored losslessly in a flow folder (resumable).

Flow is computed between consecutive decoded frames (frame ``i`` to ``i + 1``, in the frame-accurate decoder's
order), on greyscale frames resized to the short side (RAFT: RGB), quantised to uint8 with the bound and written
one ``.flow.zip`` per video (``pipeline/data/flow_files.py``). Frames are decoded in bounded chunks, so a long or
high-resolution video never sits in memory whole. Each video is done by one worker process; the parent alone
appends manifest records, after the worker has renamed the finished file into place, so a kill at any moment
leaves each video either finished (file and record) or redone on the next run. One run writes a folder at a time:
`--out` (and the `--export-jpg` folder) is locked while it runs, and a second run into it is refused naming the
holder; no output may be one of the run's inputs.

**Several machines** (`--shard I/N`, or the ranks of torchrun / srun): shard I takes the videos at positions
I, I + N, I + 2N, ... of the list (deduplicated, in list order) and skips those finished, so its share depends on the
list alone, never on what other shards did; it appends to its own manifest and failure shards
(``manifest.rank<I>.jsonl``, ``failed.rank<I>.jsonl``; the folder reads all of them as one), writes its temporary
files in a folder of its own and holds its shard's lock (`pipeline.data.features.shard_lock`): shards of one split
run side by side, a second copy of a shard, an unsharded run or a split into another number of shards is refused
while they run. A killed shard leaves only what a killed single run leaves, so a rerun with any number of shards (or
none) does every unfinished video exactly once.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.data.features import FeatureSettings, SettingsMismatchError, folder_lock
from pipeline.data.flow_files import (DEFAULT_BOUND, FlowFolder, FlowOptions, export_jpg, flow_folder_settings,
                                jpg_files, read_jpg_folder)
from pipeline.data import flow_estimation
# The computation lives on the pipeline side (classify computes a new video's flow the same way); re-exported here.
from pipeline.data.flow_estimation import (CONTRIB, DEFAULT_BACKEND, DEFAULT_PRESET, DEFAULT_SHORT_SIDE, METHODS,
                                        PRESETS, OpenCVFlow, RaftFlow, build_raft, make_estimator, target_size,
                                        tvl1_available, video_flow)
from pipeline.data.lists import read_list
from pipeline.data.video import backend_names
from pipeline.paths import check_not_input, ensure_writable_dir
from pipeline.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, InputNotFoundError, UsageError

# Bytes of decoded RGB frames held at once per worker (a module global, so that tests can shrink the chunks).
DECODE_BYTES = flow_estimation.DECODE_BYTES

# Worker-process state: the run's config and its estimator (RAFT loaded once per process; see _estimator).
_STATE: dict = {}


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS): signal 0 probes existence
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except OSError:
            return True


def _watch_parent(pid: int) -> None:
    """Ends this worker when the main process is gone: a pool worker blocked on its task queue would otherwise
    outlive a killed run (and keep its terminal or pipes open)."""
    while _process_alive(pid):
        time.sleep(1.0)
    os._exit(1)


def _init_worker(config: dict, threads: int | None = 1) -> None:
    """A worker's start: its threads, its estimator and the decoder imported, before its first video.

    torch is imported only for RAFT: the OpenCV methods' workers load cv2, numpy and PyAV alone."""
    parent = config.get("parent_pid")
    worker = bool(parent) and parent != os.getpid()
    if worker:
        # Ctrl-C reaches the whole process group: the main process alone handles it (stops handing out videos,
        # lets each worker finish its current one), so a worker never records an interrupted video as failed.
        # A forked worker starts with SIGINT blocked (see _start_pool): ignored from here on, then unblocked.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    import cv2

    import pipeline.data.video  # noqa: F401  (the decoder, imported now rather than on the first video)

    if threads is not None:
        cv2.setNumThreads(threads)  # one video per process: the processes are the parallelism
        if config["method"] == "raft" or "torch" in sys.modules:
            import torch

            torch.set_num_threads(threads)
    _STATE["config"] = config
    _STATE["estimator"] = make_estimator(config)
    if worker:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch-parent").start()


def _estimator():
    """This process's estimator: RAFT is loaded once; OpenCV's are made afresh for each video, because a DIS object
    reused across videos gave slightly different flow (a few levels on 0.2% of the pixels) than a fresh one, and a
    video's flow must not depend on which videos its worker did before."""
    if _STATE["config"]["method"] == "raft":
        return _STATE["estimator"]
    return make_estimator(_STATE["config"])


def _work(video: str) -> tuple[str, dict | None, str | None]:
    """Computes and commits one video's flow file in this process; (video, extra record fields, error)."""
    config = _STATE["config"]
    folder = FlowFolder(config["out"], config.get("rank"), config.get("world"))  # a shard's own temporary folder
    start = time.perf_counter()
    try:
        from pipeline.data.video import probe

        src = Path(config["root"]) / video
        folder.feature_path(video)  # raises ValueError for a path leaving the root
        info = probe(src)
        with folder.writer(video, config["bound"], fps=info.fps) as writer:
            for q in video_flow(src, _estimator(), config["short_side"], config["bound"], config["backend"],
                                decode_bytes=DECODE_BYTES):
                writer.add(q)
        return video, {"source_frames": int(info.num_frames), "source_fps": float(info.fps),
                       "seconds": round(time.perf_counter() - start, 3)}, None
    except Exception as err:  # a bad video fails alone; the parent records the reason
        return video, None, f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def _rank_from(environ, rank_key: str, world_key: str) -> tuple[int, int] | None:
    """(rank, world) from two environment variables; None when the world is absent or 1; UsageError when not counts."""
    rank, world = environ.get(rank_key), environ.get(world_key)
    if world is None or rank is None:
        return None
    try:
        rank_i, world_i = int(rank), int(world)
    except ValueError:
        raise UsageError(f"environment {rank_key}={rank!r} {world_key}={world!r}: not whole numbers; unset them, or "
                         "pass --shard I/N") from None
    if world_i == 1 and rank_i == 0:
        return None
    if not 0 <= rank_i < world_i:
        raise UsageError(f"environment {rank_key}={rank} {world_key}={world}: the rank must be in 0..{world_i - 1}; "
                         "fix the launcher's variables, or pass --shard I/N")
    return rank_i, world_i


def resolve_shard(shard: str | None = None, environ=None) -> tuple[int, int, str] | None:
    """This process's share of a sharded run: (I, N, where it came from), or None for a run of its own.

    `--shard I/N` first (job arrays: `--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`; 0 <= I < N); else
    torchrun's RANK/WORLD_SIZE; else srun's SLURM_PROCID/SLURM_STEP_NUM_TASKS (set for the tasks of an srun step,
    not in the batch script itself, whose SLURM_NTASKS would otherwise split a plain run). N = 1 is a run of its own.
    """
    environ = os.environ if environ is None else environ
    if shard is not None:
        text = str(shard).strip()
        rank, sep, world = text.partition("/")
        if not (sep and rank.isdigit() and world.isdigit() and rank.isascii() and world.isascii()):
            raise UsageError(f"--shard {shard!r}: expected I/N, two whole numbers with 0 <= I < N (e.g. --shard 0/4 "
                             "for the first of 4 shards)")
        rank_i, world_i = int(rank), int(world)
        if not 0 <= rank_i < world_i:
            raise UsageError(f"--shard {shard}: I must be in 0..N-1 (0 <= I < N, shards are counted from 0), got "
                             f"I = {rank_i}, N = {world_i}")
        return None if world_i == 1 else (rank_i, world_i, "--shard")
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        found = _rank_from(environ, rank_key, world_key)
        if found is not None:
            return (*found, f"{rank_key}/{world_key}")
        if environ.get(world_key) is not None and environ.get(rank_key) is not None:
            return None  # a world of one from this launcher
    return None


def share(videos: list[str], rank: int, world: int) -> list[str]:
    """Shard `rank` of `world`'s videos: those at list positions rank, rank + world, ... (every video in exactly
    one share for a given `world`, whatever is finished)."""
    return videos[rank::world]


@dataclass
class Summary:
    total: int = 0
    done: int = 0  # finished in this run
    skipped: int = 0  # finished before this run
    failed: dict[str, str] = field(default_factory=dict)
    pairs: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    shard: tuple[int, int, str] | None = None  # (I, N, where from) of a sharded run: the counts are its share's

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.failed else EXIT_OK


def make_settings(method: str, preset: str, short_side: int | None, bound: float, raft_variant: str | None = None,
                  weights: str | None = None) -> FeatureSettings:
    """The flow folder's settings (a rerun with other settings into the same folder is refused)."""
    return flow_folder_settings(FlowOptions(
        method=method, preset=preset, short_side=short_side or None, bound=float(bound),
        raft=raft_variant if method == "raft" else None,
        weights=(Path(weights).name if weights else None) if method == "raft" else None))


def _start_method() -> str:
    """fork where it is safe: a parent with one thread and no torch loaded (`eleatt flow` with an OpenCV method:
    the parent has imported nothing a child could trip on, and a fork starts in milliseconds, with every module the
    parent loaded). Otherwise (torch loaded, as for RAFT or inside a program that uses it; other threads) a
    forkserver, whose children start from a clean server process that imports the decoder once."""
    methods = mp.get_all_start_methods()
    if "fork" in methods and "torch" not in sys.modules and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _start_pool(workers: int, config: dict) -> ProcessPoolExecutor:
    """The run's one pool of ``workers`` processes, started now: forked workers begin importing OpenCV and the
    decoder and making their estimator while the parent still reads the list and the folder."""
    ctx = mp.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        # The server imports the decoder (and torch, for RAFT) once; each worker is then a cheap fork of it.
        ctx.set_forkserver_preload(["preprocessing.flow", "pipeline.data.video"])
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(config,))
    if ctx.get_start_method() == "fork":
        # A no-op task: a fork pool launches all its processes on the first one. SIGINT is blocked meanwhile, so
        # that a Ctrl-C cannot reach a child before its initializer ignores it (the parent gets it once unblocked).
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            pool.submit(int)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)
    return pool


def _run_pool(pool: ProcessPoolExecutor, workers: int, videos: list[str], handle, summary: Summary) -> None:
    """Runs ``_work`` over ``videos`` in ``pool``, at most ``workers`` at a time, calling
    ``handle(video, extra, error)`` for each.

    At most one video per worker is handed out at a time, so that on Ctrl-C only the videos being computed remain:
    they are finished and recorded (a second Ctrl-C abandons them; their temporary files are removed by the next
    run) and ``summary.interrupted`` is set.
    """
    queue = iter(videos)
    pending: dict = {}
    abandon = False

    def top_up() -> None:
        while len(pending) < workers:
            video = next(queue, None)
            if video is None:
                return
            pending[pool.submit(_work, video)] = video

    def collect(futures) -> None:
        for fut in futures:
            video = pending.pop(fut)
            try:
                result = fut.result()
            except Exception as err:  # a worker that died (killed, out of memory)
                result = (video, None, f"{type(err).__name__}: worker process failed: {err}")
            handle(*result)

    try:
        top_up()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            collect(done)
            top_up()
    except KeyboardInterrupt:
        summary.interrupted = True
        print(f"interrupted: finishing the {len(pending)} video(s) in progress (Ctrl-C again to abandon them)",
              file=sys.stderr)
        try:
            done, _ = wait(pending)
            collect(done)
        except KeyboardInterrupt:
            abandon = True
    finally:
        pool.shutdown(wait=not abandon, cancel_futures=True)


def _wanted_pool(workers: int, config: dict) -> ProcessPoolExecutor | None:
    """The pool started before the list is read: only where workers start cheaply (fork); with a forkserver the
    pool waits until the number of videos to do is known (none: no server started)."""
    if workers > 1 and _start_method() == "fork":
        return _start_pool(workers, config)
    return None


def compute(list_path: str | os.PathLike, root: str | os.PathLike, out: str | os.PathLike, method: str = "dis",
            preset: str = DEFAULT_PRESET, short_side: int | None = DEFAULT_SHORT_SIDE, bound: float = DEFAULT_BOUND,
            workers: int = 1, weights: str | None = None, backend: str = DEFAULT_BACKEND,
            progress: bool | None = None, shard: str | None = None) -> Summary:
    """Computes the flow of every video of ``list_path`` not yet in ``out``; see ``eleatt flow --help``.

    ``shard``: ``"I/N"`` computes shard I of N only (see the module's "Several machines"); without it, the ranks of
    torchrun or srun where they are set (`resolve_shard`)."""
    sharded = resolve_shard(shard)
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if short_side is not None and short_side < 0:
        raise UsageError(f"--short-side {short_side}: must be >= 0 (0 keeps the decoded size)")
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be >= 1")
    if not (bound > 0):
        raise UsageError(f"--bound {bound}: must be a positive number of pixels (default {DEFAULT_BOUND})")
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"video root '{root}' is not a folder (--root)")
    check_not_input(out, [root, list_path], "--out flow folder")
    variant = None
    if method == "raft":
        variant, _ = build_raft(weights)  # checks the file before any work; workers load it again
    elif method == "tvl1":
        OpenCVFlow("tvl1")  # the clear message when contrib is missing
    config = {"method": method, "preset": preset, "short_side": short_side or None, "bound": float(bound),
              "weights_path": str(weights) if weights else None, "root": str(root), "out": str(out),
              "backend": backend, "parent_pid": os.getpid(),
              "rank": sharded[0] if sharded else None, "world": sharded[1] if sharded else None}
    pool = _wanted_pool(workers, config)
    try:
        return _compute(list_path, out, method, preset, short_side, bound, workers, weights, variant, config, pool,
                        progress, sharded)
    finally:
        if pool is not None:  # a no-op after a run (already shut down); after an error, idle workers are told to end
            pool.shutdown(wait=False, cancel_futures=True)


def _compute(list_path, out, method: str, preset: str, short_side: int | None, bound: float, workers: int,
             weights: str | None, variant: str | None, config: dict, pool: ProcessPoolExecutor | None,
             progress: bool | None, sharded: tuple[int, int, str] | None = None) -> Summary:
    """`compute` once the options are checked and (with fork) the workers are starting."""
    videos = list(dict.fromkeys(e.path for e in read_list(list_path)))  # list order, each once
    folder = FlowFolder(out, *sharded[:2]) if sharded else FlowFolder(out)
    owners: dict[Path, str] = {}
    for video in videos:  # a path leaving the root, or two videos sharing one flow file, is a usage error
        other = owners.setdefault(folder.feature_path(video), video)
        if other != video:
            raise UsageError(f"'{other}' and '{video}' in {list_path} would both be stored as "
                             f"'{folder.feature_path(video)}' (the extension is dropped); rename one of them")
    # One writer per flow folder (per shard of a sharded run): a second run would delete this one's files in progress
    # and redo its videos.
    if sharded:
        videos = share(videos, *sharded[:2])  # the list's share, before anything is skipped (see the docstring)
    with folder.lock(f"flow --shard {sharded[0]}/{sharded[1]}" if sharded else "flow"):
        summary = _compute_locked(folder, videos, method, preset, short_side, bound, workers, weights, variant,
                                  config, pool, progress)
        if sharded:  # a shard's temporary folder goes when it ends empty (not after a second Ctrl-C abandoned work)
            with contextlib.suppress(OSError):
                folder.tmp_dir.rmdir()
    summary.shard = sharded
    return summary


def _compute_locked(folder: FlowFolder, videos: list[str], method: str, preset: str, short_side: int | None,
                    bound: float, workers: int, weights: str | None, variant: str | None, config: dict,
                    pool: ProcessPoolExecutor | None, progress: bool | None) -> Summary:
    """`compute` once it holds the folder's lock."""
    folder.check_settings(make_settings(method, preset, short_side, bound, variant, weights))
    folder.remove_stale_temporaries()
    finished = folder.finished()
    remaining = [v for v in videos if v not in finished]
    summary = Summary(total=len(videos), skipped=len(videos) - len(remaining))
    shard = f" {config['rank']}/{config['world']}" if config.get("world") else ""  # a shard's bar says which
    bar = tqdm(total=len(remaining), unit="video", desc=f"flow{shard}", file=sys.stderr,
               disable=True if progress is False else None)
    start = time.perf_counter()

    def handle(video: str, extra: dict | None, error: str | None) -> None:
        if error is None:
            try:
                record = folder.record(video, **extra)
                summary.done += 1
                summary.pairs += record["pairs"]
            except (ValueError, FileNotFoundError) as err:
                error = f"{type(err).__name__}: {err}"
        if error is not None:
            folder.record_failure(video, error)
            summary.failed[video] = error
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(pairs_s=f"{summary.pairs / elapsed:.0f}", failed=len(summary.failed), refresh=False)

    try:
        if not remaining:
            pass
        elif workers == 1:
            import cv2

            torch = sys.modules.get("torch")  # loaded by the caller (or for RAFT): its threads are restored too
            saved = cv2.getNumThreads(), torch.get_num_threads() if torch is not None else None
            try:
                # One process: OpenCV single-threaded as in the workers (same speed per video, comparable figures);
                # RAFT on a CPU keeps torch's threads, the only parallelism it has here.
                _init_worker(config, threads=None if method == "raft" else 1)
                for video in remaining:
                    handle(*_work(video))
            finally:
                cv2.setNumThreads(saved[0])
                if saved[1] is not None:
                    sys.modules["torch"].set_num_threads(saved[1])
                _STATE.clear()
        else:
            active = min(workers, len(remaining))
            _run_pool(pool or _start_pool(active, config), active, remaining, handle, summary)
        if summary.interrupted:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        from pipeline.data.video import close_readers

        close_readers()  # this process's decoding processes (pool workers stop their own)
    # Videos that failed before this run and were not retried (none: every unfinished one is retried) stay listed.
    return summary


def import_jpg(src: str | os.PathLike, out: str | os.PathLike, bound: float = DEFAULT_BOUND,
               progress: bool | None = None) -> Summary:
    """Imports mmaction2/denseflow JPEG folders under ``src`` (or ``src`` itself) into the flow folder ``out``.

    Each folder holding ``x_*.jpg``/``y_*.jpg`` (or ``flow_x_``/``flow_y_``) becomes the video named by its path
    relative to ``src`` (``src``'s own name when it holds the JPEGs itself); levels are stored exactly as decoded.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputNotFoundError(f"JPEG flow folder '{src}' not found (--import-jpg)")
    folders = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        if any(n.lower().endswith((".jpg", ".jpeg")) and ("x_" in n or "y_" in n) for n in filenames):
            folders.append(Path(dirpath))
    if not folders:
        raise UsageError(f"'{src}' holds no flow JPEG folders (x_00001.jpg/y_00001.jpg or flow_x_/flow_y_ names)")
    check_not_input(out, [src], "--out flow folder")
    folder = FlowFolder(out)
    with folder.lock("flow --import-jpg"):
        return _import_locked(folder, src, folders, bound, progress)


def _import_locked(folder: FlowFolder, src: Path, folders: list[Path], bound: float,
                   progress: bool | None) -> Summary:
    """`import_jpg` once it holds the folder's lock."""
    folder.check_settings(make_settings("jpg", "none", None, bound))
    folder.remove_stale_temporaries()
    names = {d: (d.relative_to(src).as_posix() if d != src else src.name) for d in folders}
    finished = folder.finished()
    summary = Summary(total=len(folders))
    for d in tqdm(folders, unit="video", desc="import", file=sys.stderr, disable=True if progress is False else None):
        video = names[d]
        if video in finished:
            summary.skipped += 1
            continue
        try:
            jpg_files(d)
            record = folder.write_quantized(video, read_jpg_folder(d), bound, source=str(d))
            summary.done += 1
            summary.pairs += record["pairs"]
        except (ValueError, OSError) as err:
            folder.record_failure(video, f"{type(err).__name__}: {err}")
            summary.failed[video] = f"{type(err).__name__}: {err}"
    return summary


def export_folder(out: str | os.PathLike, dest: str | os.PathLike, prefix: str = "",
                  progress: bool | None = None) -> Summary:
    """Writes every finished video of the flow folder ``out`` as JPEGs under ``dest/<video without extension>/``.

    Only the files of valid manifest records are read (each inside ``out``, named by its video: a record naming
    another path is not finished), and JPEGs are written only under ``dest``, which is locked meanwhile."""
    folder = FlowFolder(out)
    if folder.settings is None:
        raise InputNotFoundError(f"'{out}' is not a flow folder (no settings.json); make one with `eleatt flow`")
    check_not_input(dest, [out], "--export-jpg folder", nested=True)
    records = folder.finished()
    unusable = [v for v in folder.manifest_records() if v not in records]
    summary = Summary(total=len(records) + len(unusable))
    for video in unusable:  # listed, never read: a damaged file, or a record naming a path outside the folder
        summary.failed[video] = ("not exported: its flow file is missing or damaged, or its manifest record names "
                                 "another path than its own (outside the folder, say); rerun `eleatt flow` with it")
    dest = Path(dest)
    with folder_lock(dest, "flow --export-jpg", "JPEG export folder", "--export-jpg"):
        for video, record in tqdm(records.items(), unit="video", desc="export", file=sys.stderr,
                                  disable=True if progress is False else None):
            path = folder.record_path(record)  # inside `out`: `finished` kept only such records
            stem = folder.relative(path)[:-len(folder.suffix)]
            try:
                summary.pairs += export_jpg(path, dest / stem, prefix=prefix)
                summary.done += 1
            except (ValueError, OSError) as err:
                summary.failed[video] = f"{type(err).__name__}: {err}"
    return summary


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser

    p = command_parser(
        prog="eleatt flow",
        description="Dense optical flow between consecutive frames of every video of a list, quantised to uint8 "
                    "(+-bound px) and stored losslessly, one .flow.zip per video, in a flow folder (resumable: a "
                    "rerun does only the videos not finished; other settings into the same folder are refused). "
                    "Also imports/exports mmaction2/denseflow JPEG flow folders.",
        epilog="exit codes: 0 all done, 3 some videos failed (listed, in failed.jsonl; a rerun retries them), "
               "2 usage error or refused run, 130 interrupted (rerun the same command to resume)")
    p.add_argument("--list", help="list file (<relative path> <label> per line); required to compute flow")
    p.add_argument("--root", help="folder the list's paths are relative to; required to compute flow")
    p.add_argument("--out", required=True, help="the flow folder (written; read by --export-jpg)")
    p.add_argument("--method", choices=METHODS, default="dis",
                   help="dis (default; OpenCV DIS), farneback, tvl1 (needs opencv-contrib-python-headless), raft "
                        "(torchvision RAFT from --weights; uses a GPU when there is one)")
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                   help="speed/quality: DIS/Farneback parameters, RAFT iterations 12/20 (default fast)")
    p.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE,
                   help="resize frames so that the short side is this many pixels before the flow (default 256; "
                        "0 keeps the decoded size); flow is stored and measured in pixels at this size")
    p.add_argument("--bound", type=float, default=DEFAULT_BOUND,
                   help="quantisation bound in pixels: flow is clipped to +-bound and stored as 0..255 (default 20)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes computing flow, one video each at a time (default min(2, CPUs))")
    p.add_argument("--shard", metavar="I/N",
                   help="compute shard I of N (0 <= I < N): the videos at list positions I, I+N, ... (job arrays: "
                        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); shards run side by side into one "
                        "folder and a rerun with any N resumes. Default: the ranks of torchrun (RANK/WORLD_SIZE) or "
                        "srun (SLURM_PROCID/SLURM_STEP_NUM_TASKS) where set, else the whole list")
    p.add_argument("--weights", help="--method raft: a local torchvision raft_large/raft_small state dict")
    p.add_argument("--backend", choices=[b for b in backend_names() if b != "rawframes"], default=DEFAULT_BACKEND,
                   help="video decoder (default pyav: exact frames, no per-file check); a read that does not finish "
                        "within its deadline fails that video (floor: ELEATT_DECODE_TIMEOUT seconds, default 60)")
    p.add_argument("--import-jpg", metavar="DIR", help="import the JPEG flow folders under DIR into --out "
                                                       "(x_00001.jpg/y_00001.jpg or flow_x_/flow_y_; --bound is theirs)")
    p.add_argument("--export-jpg", metavar="DIR", help="export every video of the flow folder --out as JPEGs "
                                                       "(quality 95) into DIR/<video>/")
    p.add_argument("--jpg-prefix", choices=("", "flow_"), default="",
                   help="--export-jpg names: '' -> x_00001.jpg (default), 'flow_' -> flow_x_00001.jpg")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = False if args.no_progress else None
    try:
        if args.import_jpg and args.export_jpg:
            raise UsageError("--import-jpg and --export-jpg exclude each other; run them one at a time")
        if args.shard is not None and (args.import_jpg or args.export_jpg):
            raise UsageError("--shard splits the list of a flow computation; --import-jpg and --export-jpg run "
                             "whole (drop --shard)")
        if args.export_jpg:
            ensure_writable_dir(args.export_jpg, "--export-jpg folder")
        else:
            ensure_writable_dir(args.out, "--out flow folder")  # before any work: one line, exit 2
        if args.import_jpg:
            summary, what = import_jpg(args.import_jpg, args.out, args.bound, progress), "imported"
        elif args.export_jpg:
            summary, what = export_folder(args.out, args.export_jpg, args.jpg_prefix, progress), "exported"
        else:
            if not args.list or not args.root:
                raise UsageError("--list and --root are required to compute flow (or pass --import-jpg / "
                                 "--export-jpg)")
            summary = compute(args.list, args.root, args.out, args.method, args.preset, args.short_side, args.bound,
                              args.workers, args.weights, args.backend, progress, shard=args.shard)
            what = "done"
    except (ValueError, FileNotFoundError) as err:
        kind = "refused" if isinstance(err, SettingsMismatchError) else "error"
        print(f"eleatt flow: {kind}: {err}", file=sys.stderr)
        return EXIT_USAGE
    rate = f"; {summary.pairs / summary.seconds:.0f} frame pairs/s" if summary.seconds > 0 and summary.pairs else ""
    part = ""
    if summary.shard:  # the counts are the shard's share of the list
        rank, world, where = summary.shard
        part = f" (shard {rank}/{world}{'' if where == '--shard' else ' from ' + where})"
    print(f"flow{part}: {summary.done} {what}, {summary.skipped} skipped, {len(summary.failed)} failed of "
          f"{summary.total} videos -> {args.export_jpg or args.out}{rate}")
    for video, error in summary.failed.items():
        print(f"  failed: {video}: {error}")
    if summary.interrupted:
        print("interrupted: finished videos are kept; rerun the same command to resume", file=sys.stderr)
    elif summary.failed:
        print("rerun the same command to retry them (finished videos are skipped)")
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
