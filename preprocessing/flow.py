"""`eleatt flow`: dense optical flow of every video of a list, stored losslessly in a flow folder (resumable).

Flow is computed between consecutive decoded frames (frame ``i`` to ``i + 1``, in the frame-accurate decoder's
order), on greyscale frames resized to the short side (RAFT: RGB), quantised to uint8 with the bound and written
one ``.flow.zip`` per video (``pipeline/data/flow.py``). Frames are decoded in bounded chunks, so a long or
high-resolution video never sits in memory whole. Each video is done by one worker process; the parent alone
appends manifest records, after the worker has renamed the finished file into place, so a kill at any moment
leaves each video either finished (file and record) or redone on the next run.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pipeline.data.features import SettingsMismatchError
from pipeline.data.flow import (DEFAULT_BOUND, FLOW_NORM, FORMAT, FlowFolder, FlowWriter, export_jpg, jpg_files,
                                quantize, read_jpg_folder)
from pipeline.data.lists import read_list
from pipeline.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE

METHODS = ("dis", "farneback", "tvl1", "raft")
PRESETS = ("fast", "medium")
# The default preset: DIS fast (~800 pairs/s flow alone at 340x256 on one core) keeps end to end (decode + flow
# + quantise + write) above 100 pairs/s with 2 workers on a loaded 2-core machine; medium (~140-180) does not.
DEFAULT_PRESET = "fast"
DEFAULT_SHORT_SIDE = 256
# Bytes of decoded RGB frames held at once per worker: bounds the memory of a long or 4K video.
DECODE_BYTES = 128 * 2**20
# Flow reads every frame in order, which PyAV does exactly and about as fast as decord; "auto" would first verify
# decord on each file (~0.2 s a file under load), which cost up to 3x on 24-frame clips (benchmarks/flow.py --quick).
DEFAULT_BACKEND = "pyav"
RAFT_BATCH = 8  # frame pairs per RAFT forward pass
RAFT_MIN_SIDE = 128
# Farneback parameters (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma): "fast" is OpenCV's sample.
_FARNEBACK = {"fast": (0.5, 3, 15, 3, 5, 1.2), "medium": (0.5, 5, 15, 5, 7, 1.5)}
_RAFT_UPDATES = {"fast": 12, "medium": 20}
CONTRIB = "opencv-contrib-python-headless"


# --------------------------------------------------------------------------------------------------------------
# Estimators: prepared frames in, flow (H, W, 2) float32 pixels out
# --------------------------------------------------------------------------------------------------------------
def target_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(H, W) after resizing the short side to ``short_side`` (None or 0: unchanged)."""
    if not short_side or min(height, width) == short_side:
        return height, width
    s = short_side / min(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def tvl1_available() -> bool:
    import cv2

    return hasattr(cv2, "optflow") and hasattr(cv2.optflow, "DualTVL1OpticalFlow_create")


class OpenCVFlow:
    """DIS, Farneback or TV-L1 on greyscale frames."""

    def __init__(self, method: str, preset: str = DEFAULT_PRESET):
        import cv2

        self.cv2 = cv2
        self.method = method
        if method == "dis":
            self.dis = cv2.DISOpticalFlow_create(
                {"fast": cv2.DISOPTICAL_FLOW_PRESET_FAST, "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[preset])
        elif method == "tvl1":
            if not tvl1_available():
                raise ValueError(f"--method tvl1 needs OpenCV's contrib module (cv2.optflow), which is not installed; "
                                 f"replace opencv-python-headless by {CONTRIB} (pip uninstall opencv-python-headless "
                                 f"&& pip install {CONTRIB}; never both), or use --method dis")
            self.tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        elif method == "farneback":
            self.params = _FARNEBACK[preset]
        else:
            raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")

    def prepare(self, frames: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
        """uint8 (t, H, W, 3) RGB -> t greyscale uint8 (h, w) images at ``size``."""
        cv2 = self.cv2
        out = []
        for frame in frames:
            grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            if grey.shape != size:
                shrink = size[0] < grey.shape[0]
                grey = cv2.resize(grey, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            out.append(grey)
        return out

    def flows(self, images: list) -> Iterator[np.ndarray]:
        """(h, w, 2) float32 flow from each image to the next (len(images) - 1 of them)."""
        for a, b in zip(images[:-1], images[1:]):
            if self.method == "dis":
                yield self.dis.calc(a, b, None)
            elif self.method == "tvl1":
                yield self.tvl1.calc(a, b, None)
            else:
                yield self.cv2.calcOpticalFlowFarneback(a, b, None, *self.params, 0)


def build_raft(weights: str | os.PathLike | None, device: str = "cpu"):
    """A torchvision RAFT (large or small, told apart by the state dict) from a local weights file; None: random."""
    import torch
    from torchvision.models.optical_flow import raft_large, raft_small

    if weights is None:
        raise ValueError("--method raft needs --weights PATH: a torchvision RAFT state dict (raft_large or raft_small, "
                         "e.g. Raft_Large_Weights.C_T_SKHT_V2 saved with torch.save(model.state_dict(), PATH)); "
                         "nothing is downloaded")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"RAFT weights '{path}' not found (--weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"RAFT weights '{path}' cannot be read ({type(err).__name__}: {err}); save them with "
                         "torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    for name, make in (("large", raft_large), ("small", raft_small)):
        model = make(weights=None)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError):
            continue
        return name, model.eval().to(device)
    raise ValueError(f"'{path}' is not a torchvision raft_large or raft_small state dict (keys do not match)")


class RaftFlow:
    """torchvision RAFT on RGB frames, in batches of pairs, padded to a multiple of 8."""

    def __init__(self, weights: str | os.PathLike, preset: str = DEFAULT_PRESET, device: str | None = None):
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.variant, self.model = build_raft(weights, self.device)
        self.updates = _RAFT_UPDATES[preset]

    def prepare(self, frames: np.ndarray, size: tuple[int, int]):
        import cv2

        out = []
        for frame in frames:
            if frame.shape[:2] != size:
                frame = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            out.append(frame)
        return out

    def flows(self, images: list) -> Iterator[np.ndarray]:
        torch = self.torch
        F = torch.nn.functional
        h, w = images[0].shape[:2]
        # RAFT needs sides that are multiples of 8 and at least 128 (its correlation pyramid); pad, then crop back.
        ph, pw = max(RAFT_MIN_SIDE, h + (-h) % 8) - h, max(RAFT_MIN_SIDE, w + (-w) % 8) - w
        x = torch.from_numpy(np.stack(images))  # (t, h, w, 3) uint8
        for s in range(0, len(images) - 1, RAFT_BATCH):
            a = x[s:s + RAFT_BATCH + 1].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (b+1, 3, h, w)
            if ph or pw:
                a = F.pad(a, (0, pw, 0, ph), mode="replicate")
            with torch.inference_mode():
                flow = self.model(a[:-1], a[1:], num_flow_updates=self.updates)[-1]  # (b, 2, h+ph, w+pw)
            flow = flow[:, :, :h, :w].permute(0, 2, 3, 1).float().cpu().numpy()  # (b, h, w, 2)
            yield from flow


def make_estimator(config: dict):
    if config["method"] == "raft":
        return RaftFlow(config["weights_path"], config["preset"])
    return OpenCVFlow(config["method"], config["preset"])


# --------------------------------------------------------------------------------------------------------------
# One video
# --------------------------------------------------------------------------------------------------------------
def video_flow(path: str | os.PathLike, estimator, short_side: int | None, bound: float,
               backend: str = DEFAULT_BACKEND) -> Iterator[np.ndarray]:
    """Quantised pairs uint8 (2, h, w) of a video, frame i -> i + 1, decoded in bounded chunks.

    Raises ValueError (``VideoReadError``) for an unreadable video and for one with fewer than 2 frames.
    """
    from pipeline.data.video import load_frames, probe

    path = Path(path)
    info = probe(path)
    if info.num_frames < 2:
        raise ValueError(f"'{path}' has {info.num_frames} frame(s): no frame pairs, so no optical flow "
                         "(drop it from the list)")
    size = target_size(info.height, info.width, short_side)
    chunk = max(2, DECODE_BYTES // (info.height * info.width * 3))
    previous = None  # the last prepared image of the previous chunk, paired with this chunk's first
    for start in range(0, info.num_frames, chunk):
        frames = load_frames(path, np.arange(start, min(start + chunk, info.num_frames)), backend=backend).numpy()
        images = estimator.prepare(frames, size)
        del frames
        if previous is not None:
            images.insert(0, previous)
        for flow in estimator.flows(images):  # (h, w, 2)
            yield quantize(flow.transpose(2, 0, 1), bound)  # (2, h, w) x, y
        previous = images[-1]


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
    import cv2

    if threads is not None:
        cv2.setNumThreads(threads)  # one video per process: the processes are the parallelism
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # pragma: no cover
            pass
    _STATE["config"] = config
    _STATE["estimator"] = make_estimator(config)
    parent = config.get("parent_pid")
    if parent and parent != os.getpid():
        # Ctrl-C reaches the whole process group: the main process alone handles it (stops handing out videos,
        # lets each worker finish its current one), so a worker never records an interrupted video as failed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    folder = FlowFolder(config["out"])
    start = time.perf_counter()
    tmp = None
    try:
        from pipeline.data.video import probe

        src = Path(config["root"]) / video
        folder.feature_path(video)  # raises ValueError for a path leaving the root
        info = probe(src)
        tmp = folder.temporary(video)
        with FlowWriter(tmp, config["bound"]) as writer:
            for q in video_flow(src, _estimator(), config["short_side"], config["bound"], config["backend"]):
                writer.add(q)
        folder.commit(video, tmp)
        tmp = None
        return video, {"source_frames": int(info.num_frames), "source_fps": float(info.fps),
                       "seconds": round(time.perf_counter() - start, 3)}, None
    except Exception as err:  # a bad video fails alone; the parent records the reason
        return video, None, f"{type(err).__name__}: {err}"
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    total: int = 0
    done: int = 0  # finished in this run
    skipped: int = 0  # finished before this run
    failed: dict[str, str] = field(default_factory=dict)
    pairs: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.failed else EXIT_OK


def make_settings(method: str, preset: str, short_side: int | None, bound: float, raft_variant: str | None = None,
                  weights: str | None = None) -> dict:
    """The flow folder's settings (a rerun with other settings into the same folder is refused)."""
    settings = {"modality": "flow", "method": method, "preset": preset, "short_side": short_side or None,
                "bound": float(bound), "format": FORMAT, "flow_norm": FLOW_NORM, "dtype": "float16"}
    if method == "raft":
        settings["raft"] = raft_variant
        settings["weights"] = Path(weights).name if weights else None
    return settings


def _start_method() -> str:
    methods = mp.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _run_pool(ctx, workers: int, config: dict, videos: list[str], handle, summary: Summary) -> None:
    """Runs ``_work`` over ``videos`` in ``workers`` processes, calling ``handle(video, extra, error)`` for each.

    At most one video per worker is handed out at a time, so that on Ctrl-C only the videos being computed remain:
    they are finished and recorded (a second Ctrl-C abandons them; their temporary files are removed by the next
    run) and ``summary.interrupted`` is set.
    """
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(config,))
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


def compute(list_path: str | os.PathLike, root: str | os.PathLike, out: str | os.PathLike, method: str = "dis",
            preset: str = DEFAULT_PRESET, short_side: int | None = DEFAULT_SHORT_SIDE, bound: float = DEFAULT_BOUND,
            workers: int = 1, weights: str | None = None, backend: str = DEFAULT_BACKEND,
            progress: bool | None = None) -> Summary:
    """Computes the flow of every video of ``list_path`` not yet in ``out``; see ``eleatt flow --help``."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if short_side is not None and short_side < 0:
        raise ValueError(f"--short-side {short_side}: must be >= 0 (0 keeps the decoded size)")
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    if not (bound > 0):
        raise ValueError(f"--bound {bound}: must be a positive number of pixels (default {DEFAULT_BOUND})")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video root '{root}' is not a folder (--root)")
    variant = None
    if method == "raft":
        variant, _ = build_raft(weights)  # checks the file before any work; workers load it again
    elif method == "tvl1":
        OpenCVFlow("tvl1")  # the clear message when contrib is missing
    videos = list(dict.fromkeys(e.path for e in read_list(list_path)))  # list order, each once
    folder = FlowFolder(out)
    owners: dict[Path, str] = {}
    for video in videos:  # a path leaving the root, or two videos sharing one flow file, is a usage error
        other = owners.setdefault(folder.feature_path(video), video)
        if other != video:
            raise ValueError(f"'{other}' and '{video}' in {list_path} would both be stored as "
                             f"'{folder.feature_path(video)}' (the extension is dropped); rename one of them")
    folder.check_settings(make_settings(method, preset, short_side, bound, variant, weights))
    folder.remove_stale_temporaries()
    finished = folder.finished()
    remaining = [v for v in videos if v not in finished]
    summary = Summary(total=len(videos), skipped=len(videos) - len(remaining))
    config = {"method": method, "preset": preset, "short_side": short_side or None, "bound": float(bound),
              "weights_path": str(weights) if weights else None, "root": str(root), "out": str(out),
              "backend": backend, "parent_pid": os.getpid()}
    bar = tqdm(total=len(remaining), unit="video", desc="flow", file=sys.stderr,
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
            import torch

            saved = cv2.getNumThreads(), torch.get_num_threads()
            try:
                # One process: OpenCV single-threaded as in the workers (same speed per video, comparable figures);
                # RAFT on a CPU keeps torch's threads, the only parallelism it has here.
                _init_worker(config, threads=None if method == "raft" else 1)
                for video in remaining:
                    handle(*_work(video))
            finally:
                cv2.setNumThreads(saved[0])
                torch.set_num_threads(saved[1])
                _STATE.clear()
        else:
            ctx = mp.get_context(_start_method())
            if ctx.get_start_method() == "forkserver":
                # The server imports the decoder (and torch) once; each worker is then a cheap fork of it.
                ctx.set_forkserver_preload(["preprocessing.flow", "pipeline.data.video"])
            _run_pool(ctx, min(workers, len(remaining)), config, remaining, handle, summary)
        if summary.interrupted:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
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
        raise FileNotFoundError(f"JPEG flow folder '{src}' not found (--import-jpg)")
    folders = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        if any(n.lower().endswith((".jpg", ".jpeg")) and ("x_" in n or "y_" in n) for n in filenames):
            folders.append(Path(dirpath))
    if not folders:
        raise ValueError(f"'{src}' holds no flow JPEG folders (x_00001.jpg/y_00001.jpg or flow_x_/flow_y_ names)")
    folder = FlowFolder(out)
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
    """Writes every finished video of the flow folder ``out`` as JPEGs under ``dest/<video without extension>/``."""
    folder = FlowFolder(out)
    if folder.settings is None:
        raise FileNotFoundError(f"'{out}' is not a flow folder (no settings.json); make one with `eleatt flow`")
    records = folder.finished()
    summary = Summary(total=len(records))
    dest = Path(dest)
    for video, record in tqdm(records.items(), unit="video", desc="export", file=sys.stderr,
                              disable=True if progress is False else None):
        stem = record["feature"][:-len(folder.suffix)]
        try:
            summary.pairs += export_jpg(folder.root / record["feature"], dest / stem, prefix=prefix)
            summary.done += 1
        except (ValueError, OSError) as err:
            summary.failed[video] = f"{type(err).__name__}: {err}"
    return summary


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--weights", help="--method raft: a local torchvision raft_large/raft_small state dict")
    p.add_argument("--backend", choices=("auto", "decord", "pyav"), default=DEFAULT_BACKEND,
                   help="video decoder (default pyav: exact frames, no per-file decord check)")
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
            raise ValueError("--import-jpg and --export-jpg exclude each other; run them one at a time")
        if args.import_jpg:
            summary, what = import_jpg(args.import_jpg, args.out, args.bound, progress), "imported"
        elif args.export_jpg:
            summary, what = export_folder(args.out, args.export_jpg, args.jpg_prefix, progress), "exported"
        else:
            if not args.list or not args.root:
                raise ValueError("--list and --root are required to compute flow (or pass --import-jpg / "
                                 "--export-jpg)")
            summary = compute(args.list, args.root, args.out, args.method, args.preset, args.short_side, args.bound,
                              args.workers, args.weights, args.backend, progress)
            what = "done"
    except (ValueError, FileNotFoundError) as err:
        kind = "refused" if isinstance(err, SettingsMismatchError) else "error"
        print(f"eleatt flow: {kind}: {err}", file=sys.stderr)
        return EXIT_USAGE
    rate = f"; {summary.pairs / summary.seconds:.0f} frame pairs/s" if summary.seconds > 0 and summary.pairs else ""
    print(f"flow: {summary.done} {what}, {summary.skipped} skipped, {len(summary.failed)} failed of {summary.total} "
          f"videos -> {args.export_jpg or args.out}{rate}")
    for video, error in summary.failed.items():
        print(f"  failed: {video}: {error}")
    if summary.interrupted:
        print("interrupted: finished videos are kept; rerun the same command to resume", file=sys.stderr)
    elif summary.failed:
        print("rerun the same command to retry them (finished videos are skipped)")
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
