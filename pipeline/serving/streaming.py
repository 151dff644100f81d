"""Online recognition: class probabilities while a video plays (`pipeline.StreamingClassifier`,
`eleatt classify --stream`).

A recurrent model carries its state, so each new sampled frame costs one backbone call and one recurrent step, and
the prediction at any moment reflects everything seen so far (clip models re-run a whole window instead). Frames
go through exactly what `eleatt classify` does with them (`VideoClassifier.encode`: the checkpoint's views,
backbone, precision and float16 round trip; its normaliser); the stack steps with its own `hx`
(`SequenceClassifier.stream`), so:

- after every sampled frame, the probabilities equal those `classify` gives for the video cut at that frame, for
  chunks of frames of any size -- when the checkpoint sees every step of a video (trained with `num_steps: 0`);
  with `num_steps: N`, `classify` looks at N evenly spaced steps of the whole video, which a stream cannot know
  in advance, so streaming runs over every sampled step instead (and warns);
- frames are sampled at the rate the checkpoint's features were extracted at (`extract --fps F`), with the rule
  `classify` uses (`Sampling.indices`: `pipeline.data.sampling.fps_indices`), counted from the first frame pushed after `reset()`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from pipeline.data.sampling import fps_frames
from pipeline.devices import inference_mode
from pipeline.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, UsageError
from pipeline.serving.classify import Prediction, VideoClassifier
from pipeline.paths import check_not_input, ensure_writable_file

if TYPE_CHECKING:  # loaded with the checkpoint (VideoClassifier), not for --help
    import torch

# Steps/s for a checkpoint trained on segment sampling (a fixed number of frames per video, whatever its length):
# a stream has no length to spread segments over, so it samples at a typical rate (override with sample_fps).
DEFAULT_SEGMENT_FPS = 4.0


@dataclass
class StreamOutput:
    """What one `push` produced: one row per frame that was sampled (possibly none).

    probs: float32 (n, C) class probabilities after each sampled frame (views averaged).
    frames: int64 (n,) the sampled frames' numbers, counted from the first frame pushed after `reset()`.
    times: float64 (n,) their times in seconds from the stream's start.
    """

    probs: np.ndarray
    frames: np.ndarray
    times: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)


class StreamingClassifier:
    """A checkpoint ready for online recognition: `push` frames as they arrive, read the probabilities.

    Args:
        ckpt: an `eleatt fit` checkpoint (as for `eleatt classify`).
        weights: backbone weights instead of the recorded ones ("imagenet", "none" or a local file).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        sample_fps: steps per second of video. Default: the rate the checkpoint's features were extracted at
            (`extract --fps`); every frame for a checkpoint trained on every frame; `DEFAULT_SEGMENT_FPS` for one
            trained on segment sampling (with a warning). Setting it for an fps-sampled checkpoint is refused
            unless it is the recorded rate: the model learnt that step length.
        batch_size: images (frames x views) per backbone call.

    >>> stream = StreamingClassifier("checkpoints/run/best.ckpt")          # doctest: +SKIP
    >>> out = stream.push(frames, fps=30.0)   # uint8 (t, H, W, 3) RGB      # doctest: +SKIP
    >>> out.probs[-1]                          # (C,) after the last sampled frame, if any
    """

    def __init__(self, ckpt: str | os.PathLike, weights: str | None = None, device: str = "auto",
                 sample_fps: float | None = None, batch_size: int = 64) -> None:
        self.video = VideoClassifier(ckpt, weights=weights, device=device, batch_size=batch_size)
        self.class_names = self.video.class_names
        self.device = self.video.device
        self.net = self.video.net
        sampling = self.video.settings.sampling  # pipeline.data.sampling.Sampling
        mode = sampling.mode
        if sample_fps is not None and not (math.isfinite(sample_fps) and sample_fps > 0):
            raise UsageError(f"sample_fps={sample_fps!r} must be a positive number of steps per second")
        if mode == "fps":
            recorded = float(sampling.fps)
            if sample_fps is not None and abs(sample_fps - recorded) > 1e-9:
                raise UsageError(f"checkpoint '{ckpt}' was trained on features sampled at {recorded:g} frames/s; "
                                 f"sample_fps={sample_fps:g} would change the step length the model learnt (leave "
                                 "sample_fps unset)")
            self.sample_fps: float | None = recorded
        elif mode == "all":
            self.sample_fps = sample_fps  # None: every frame, as trained
        elif mode == "segments":
            self.sample_fps = sample_fps or DEFAULT_SEGMENT_FPS
            warnings.warn(
                f"checkpoint '{ckpt}' was trained on {sampling.num_segments} segments per video (steps spread "
                f"over whole videos); streaming samples {self.sample_fps:g} frames/s instead, so its predictions "
                "early in a stream are less reliable (train on features extracted with `eleatt extract --fps F` for "
                "online use)", stacklevel=2)
        else:
            raise UsageError(f"checkpoint '{ckpt}' records sampling mode {mode!r}; expected fps, all or segments")
        if self.video.num_steps:
            warnings.warn(
                f"checkpoint '{ckpt}' was trained on {self.video.num_steps} steps per video spread evenly "
                "(data.num_steps); a stream runs over every sampled step, so it matches `eleatt classify` only for "
                "checkpoints trained with data.num_steps 0 (all steps)", stacklevel=2)
        self.src_fps: float | None = None
        self.reset()

    @property
    def steps(self) -> int:
        """Sampled frames (recurrent steps) since the last `reset()`."""
        return 0 if self._state is None else self._state.steps

    def reset(self) -> None:
        """Starts a new stream: zero recurrent state, frame count and clock (the source rate is kept)."""
        self._state = None  # SequenceClassifier.stream's StreamState
        self._seen = 0  # frames pushed since reset
        self._next_k = 0  # the next step k: due at time k / sample_fps
        self._t0: float | None = None  # first timestamp pushed (timestamp mode)
        self._prev_t: float | None = None
        self._last_stamp: float | None = None  # the latest timestamp pushed, as given

    # -- sampling ----------------------------------------------------------------------------------------------
    def _select(self, count: int, timestamps: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The positions (within the `count` new frames) of the frames to sample, and their times (s)."""
        first = self._seen
        if timestamps is None:
            if self.sample_fps is not None and self.src_fps is None:
                raise UsageError("push(frames) needs the source's frame rate once (fps=...) or per-frame timestamps "
                                 f"to sample {self.sample_fps:g} frames/s as the checkpoint was trained")
            numbers = np.arange(first, first + count, dtype=np.int64)
            times = numbers / self.src_fps if self.src_fps else np.full(count, np.nan)
            if self.sample_fps is None:
                return np.arange(count), times
            # fps_indices' rule, continued from the next step: step k takes frame floor(k * src / target)
            taken = fps_frames(first + count, self.src_fps, self.sample_fps, first_step=self._next_k)
            self._next_k += len(taken)
            picks_arr = taken - first
            return picks_arr, times[picks_arr]
        # timestamp mode: frame i shows from t_i for dt (1 / fps, else the gap since the previous frame); it is
        # sampled when a step time k / sample_fps falls in that span
        if self._t0 is None and count:
            self._t0 = float(timestamps[0])
        rel = timestamps - (self._t0 or 0.0)
        if self.sample_fps is None:
            self._prev_t = float(rel[-1]) if count else self._prev_t
            return np.arange(count), rel
        picks = []
        for i, t in enumerate(rel.tolist()):
            dt = 1.0 / self.src_fps if self.src_fps else (t - self._prev_t if self._prev_t is not None else 0.0)
            self._prev_t = t
            due = self._next_k / self.sample_fps
            if due < t + dt - 1e-9 or (dt <= 0 and due <= t + 1e-9):
                picks.append(i)
                self._next_k = max(self._next_k + 1, math.ceil((t + dt) * self.sample_fps - 1e-9))
        picks_arr = np.asarray(picks, dtype=np.int64)
        return picks_arr, rel[picks_arr]

    # -- the stream ----------------------------------------------------------------------------------------------
    @inference_mode
    def push(self, frames: np.ndarray | torch.Tensor, fps: float | None = None,
             timestamps: Sequence[float] | np.ndarray | None = None) -> StreamOutput:
        """Feeds the next frames of the stream; returns the probabilities after each frame that was sampled.

        frames: uint8 (t, H, W, 3) RGB, t >= 0, consecutive frames of the source.
        fps: the source's frame rate (needed once, unless `timestamps` are given; later values must agree until
            `reset()`, after which a new source may give another).
            Frames are numbered from the first one pushed after `reset()` and sampled as `classify` samples a file.
        timestamps: (t,) presentation times in seconds, for sources without a steady rate (a camera dropping
            frames); the steps then fall at times k / sample_fps from the first timestamp.
        """
        import torch

        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise UsageError(f"frames must be uint8 (t, H, W, 3) RGB, got {frames.dtype} {tuple(frames.shape)}")
        count = frames.shape[0]
        if fps is not None:
            if not (math.isfinite(fps) and fps > 0):
                raise UsageError(f"fps={fps!r}: the source's frame rate must be a positive number")
            # within a stream the rate is fixed; after reset() (nothing pushed yet) a new source may set another
            if self._seen and self.src_fps is not None and abs(fps - self.src_fps) > 1e-6 * self.src_fps:
                raise UsageError(f"fps={fps:g} differs from the rate given earlier ({self.src_fps:g}); call "
                                 "reset() and set the rate again for a new source")
            self.src_fps = float(fps)
        stamps = None
        if timestamps is not None:
            stamps = np.asarray(timestamps, dtype=np.float64).reshape(-1)
            if len(stamps) != count:
                raise UsageError(f"{len(stamps)} timestamps for {count} frames; give one per frame")
            # NaN compares false with every step time: the stream would sample nothing and say nothing
            previous = np.concatenate([[self._last_stamp], stamps]) if self._last_stamp is not None else stamps
            if not np.isfinite(stamps).all() or (np.diff(previous) < 0).any():
                raise UsageError(f"timestamps must be finite seconds that never go back, got {stamps.tolist()[:8]}; "
                                 "for a source without frame times pass its rate (fps=...) instead")
            if count:
                self._last_stamp = float(stamps[-1])
        picks, times = self._select(count, stamps)
        numbers = self._seen + picks
        self._seen += count
        if len(picks) == 0:
            return StreamOutput(np.zeros((0, len(self.class_names)), np.float32), numbers, times)
        feats = self.video.encode(frames[torch.from_numpy(picks)])  # (V, n, D), as classify stores them
        feats = self.video.normalizer(feats).to(self.device)
        logits, self._state = self.net.stream(feats, self._state)  # (V, n, C)
        probs = logits.float().softmax(-1).mean(0).cpu().numpy()  # (n, C): views averaged as `test` does
        return StreamOutput(probs, numbers, times)


# ----------------------------------------------------------------------------------------------------------------
# Sources and the command line
# ----------------------------------------------------------------------------------------------------------------

class SourceError(UsageError):
    """A stream source that cannot be opened or read; the message names it, the reason and the fix."""


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


class FileSource:
    """A video file as a stream source: read through `pipeline.data.video` (the decoding process with its deadline,
    the display rotation, exact frames) in blocks of `block` frames; each frame's time from the file's index (its
    own time for a variable-frame-rate file, which then streams by timestamps)."""

    def __init__(self, path: str, block: int = 32, backend: str = "auto") -> None:
        from pipeline.data.video import VideoReadError, probe

        self.name = path
        self.block = block
        self.backend = backend
        try:
            self.info = probe(path)
        except VideoReadError as err:
            reason = str(err).split(": ", 1)[-1]
            raise SourceError(f"stream source '{path}' cannot be opened ({reason})") from None
        info = self.info
        self.fps = None if info.times is not None or not info.fps else float(info.fps)
        self.times = (info.times if info.times is not None else
                      np.arange(info.num_frames) / info.fps if info.fps else np.full(info.num_frames, np.nan))

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
        """(frames uint8 (t, H, W, 3), times (t,), decode seconds) for consecutive blocks of frames."""
        from pipeline.data.video import VideoReadError, read_frames

        n = self.info.num_frames
        for start in range(0, n, self.block):
            stop = min(start + self.block, n)
            began = time.perf_counter()
            try:
                frames = read_frames(self.name, np.arange(start, stop), self.backend)
            except VideoReadError as err:
                raise SourceError(f"stream source '{self.name}': decoding failed after {start} frames "
                                  f"({str(err).split(': ', 1)[-1]})") from None
            yield frames, self.times[start:stop], time.perf_counter() - began

    def close(self) -> None:
        """Stops this process's decoding process (the next read would start one again)."""
        from pipeline.data.video import close_readers

        close_readers()


def open_stream(source: str, input_format: str | None = None, timeout: float = 10.0):
    """Opens a file (a `FileSource`: decoded under the deadline of `pipeline.data.decode_guard`, in display
    orientation), a camera (/dev/videoN: FFmpeg's v4l2 input) or a URL (rtsp://, http://, file:, pipe:, ...) with
    PyAV (the container). Raises SourceError with the reason and the fix."""
    import av

    is_url = "://" in source or source.startswith(("pipe:", "file:"))
    if input_format is None and source.startswith("/dev/video"):
        input_format = "v4l2"
    if not is_url and input_format is None:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"stream source '{source}': no such file or device; pass a video file, a camera "
                              "(/dev/video0) or a URL (rtsp://..., http://..., file:...)")
        if path.is_dir():
            raise SourceError(f"stream source '{source}' is a folder; pass a video file, a camera or a URL")
        if path.is_file():
            return FileSource(source)
    try:
        container = av.open(source, mode="r", format=input_format, timeout=timeout if is_url else None)
    except (av.FFmpegError, OSError) as err:
        hint = ("check that the camera exists and is free (v4l2-ctl --list-devices)" if input_format == "v4l2"
                else "check the address and that the server is up" if is_url
                else "check that it is a complete video file")
        raise SourceError(f"stream source '{source}' cannot be opened ({_reason(err)}); {hint}") from None
    if not container.streams.video:
        container.close()
        raise SourceError(f"stream source '{source}' has no video stream; pass a video, not audio or another file")
    return container


def decode_frames(container, chunk: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, float | None, float]]:
    """Decodes the first video stream incrementally: yields (frames uint8 (t, H, W, 3) RGB, timestamps (t,) s,
    the stream's frame rate or None, decode seconds) for up to `chunk` frames at a time."""
    if isinstance(container, FileSource):
        for frames, stamps, spent in container.blocks():
            for s in range(0, len(frames), chunk):
                yield frames[s:s + chunk], stamps[s:s + chunk], container.fps, spent if s == 0 else 0.0
        return
    import av

    stream = container.streams.video[0]
    stream.thread_type = "SLICE"  # frame threads would buffer frames: latency
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None
    buf: list[np.ndarray] = []
    stamps: list[float] = []
    spent = 0.0
    start = time.perf_counter()
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            break
        except av.FFmpegError as err:
            raise SourceError(f"stream source '{container.name}': decoding failed after some frames "
                              f"({_reason(err)}); the stream is damaged or was cut") from None
        buf.append(frame.to_ndarray(format="rgb24"))
        stamps.append(float(frame.time) if frame.time is not None else float("nan"))
        if len(buf) >= chunk:
            spent += time.perf_counter() - start
            yield np.stack(buf), np.asarray(stamps), fps, spent
            buf, stamps, spent = [], [], 0.0
            start = time.perf_counter()
    if buf:
        spent += time.perf_counter() - start
        yield np.stack(buf), np.asarray(stamps), fps, spent


def plot_stream(times: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                max_classes: int = 8, title: str = "") -> Path:
    """Saves the class probabilities over time as a PNG: times (n,) s, probs (n, C); the `max_classes` classes
    that ever score highest are drawn, the top-1 class of each moment as a band along the bottom."""
    from pipeline.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    if len(times):
        shown = np.argsort(-probs.max(0), kind="stable")[:max_classes]
        colours = {int(c): plt.cm.tab10(i % 10) for i, c in enumerate(shown)}
        for c in shown:
            ax.plot(times, probs[:, c], color=colours[int(c)], label=class_names[c], linewidth=1.6)
        top = probs.argmax(1)
        edges = np.append(times, times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1.0))
        for i, c in enumerate(top):  # a strip showing the top-1 class
            ax.axvspan(edges[i], edges[i + 1], ymin=0, ymax=0.03, color=colours.get(int(c), "grey"), linewidth=0)
        ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "class probabilities while the video plays")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser

    parser = command_parser(
        prog="eleatt classify",
        description="Online recognition: decode a video file, a camera or a network stream as it plays and print "
                    "the class probabilities of a checkpoint as they evolve (one recurrent step per sampled frame, "
                    "state carried).",
        epilog="exit status: 0 the stream ended; 3 the source could not be opened or read; 2 usage error; "
               "130 interrupted (Ctrl-C; the summary and the plot are still written)",
    )
    parser.add_argument("--stream", required=True, metavar="SOURCE",
                        help="a video file, a camera (/dev/video0) or a URL PyAV/FFmpeg reads (rtsp://, http://, "
                             "file:, pipe:)")
    parser.add_argument("--ckpt", required=True, help="checkpoint of `eleatt fit` (checkpoints/<run>/best.ckpt)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights instead of the recorded ones: a local file, 'imagenet' or 'none'")
    parser.add_argument("--topk", type=int, default=3, help="classes per line (default 3)")
    parser.add_argument("--every", type=float, default=1.0, help="seconds of video between printed lines (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw the class probabilities over time here")
    parser.add_argument("--sample-fps", type=float, default=None,
                        help="steps per second for checkpoints trained without fps sampling (default: as trained)")
    parser.add_argument("--format", default=None, dest="input_format",
                        help="FFmpeg input format (default: v4l2 for /dev/video*, else guessed)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--realtime", action="store_true",
                        help="pace a file at its frame rate, as a live source would arrive")
    parser.add_argument("videos", nargs="*", help=argparse.SUPPRESS)  # refused: one stream at a time
    return parser


def _topk(probs: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, int, float]]:
    pred = Prediction.from_scores("", probs, names, k)
    return list(zip(pred.names, pred.labels, pred.probs))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.videos:
        print(f"eleatt classify --stream: error: one source at a time; got also {' '.join(args.videos)} (classify "
              "files as a batch without --stream)", file=sys.stderr)
        return EXIT_USAGE
    if args.topk < 1 or not args.every > 0:
        print("eleatt classify --stream: error: --topk must be >= 1 and --every > 0", file=sys.stderr)
        return EXIT_USAGE
    if args.plot:  # before the stream, not after it (raises OutputLocationError: one line, exit 2)
        check_not_input(args.plot, [args.stream, args.ckpt, args.weights], "--plot")
        ensure_writable_file(args.plot, "--plot")
    try:
        container = open_stream(args.stream, args.input_format)
    except SourceError as err:
        print(f"eleatt classify --stream: {err}", file=sys.stderr)
        return EXIT_SOME_FAILED
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = StreamingClassifier(args.ckpt, weights=args.weights, device=args.device,
                                        sample_fps=args.sample_fps)
        except BaseException:
            container.close()
            raise
    for w in caught:
        print(f"eleatt classify --stream: warning: {w.message}", file=sys.stderr)
    names = model.class_names
    k = min(args.topk, len(names))
    times: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    decoded = 0
    spent = {"decode": 0.0, "model": 0.0}
    next_print = 0.0
    code = EXIT_OK
    source_fps = None
    wall = time.perf_counter()

    def emit(t: float, frame: int, p: np.ndarray) -> None:
        top = _topk(p, names, k)
        if args.json:
            print(json.dumps({"time": round(t, 3), "frame": frame,
                              "topk": [{"class": n, "label": l, "prob": round(q, 6)} for n, l, q in top]}), flush=True)
        else:
            print(f"{t:8.2f} s  " + "  ".join(f"{n} {q:6.1%}" for n, _, q in top), flush=True)

    try:
        use_stamps = None
        for frames, stamps, fps, decode_s in decode_frames(container):
            source_fps = fps
            spent["decode"] += decode_s
            decoded += len(frames)
            if use_stamps is None:  # a steady rate: count frames (exactly as classify samples a file)
                use_stamps = fps is None
            start = time.perf_counter()
            out = model.push(frames, fps=fps if not use_stamps else None,
                             timestamps=stamps if use_stamps else None)
            spent["model"] += time.perf_counter() - start
            for t, f, p in zip(out.times, out.frames, out.probs):
                times.append(t)
                probs.append(p)
                if t + 1e-9 >= next_print:
                    emit(float(t), int(f), p)
                    next_print = (math.floor(t / args.every + 1e-9) + 1) * args.every
            if args.realtime and fps:
                ahead = decoded / fps - (time.perf_counter() - wall)
                if ahead > 0:
                    time.sleep(ahead)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except SourceError as err:
        print(f"eleatt classify --stream: {err}", file=sys.stderr)
        code = EXIT_SOME_FAILED
    finally:
        container.close()
    elapsed = time.perf_counter() - wall
    times_arr = np.asarray(times, dtype=np.float64)
    probs_arr = np.stack(probs) if probs else np.zeros((0, len(names)), np.float32)
    # seconds of video decoded (the frames' count at the source's rate; else up to the last step)
    video_s = decoded / source_fps if source_fps else float(times_arr[-1]) if len(times_arr) else 0.0
    summary = {"source": args.stream, "frames": decoded, "steps": len(times_arr), "video_s": round(video_s, 3),
               "compute_s": round(spent["decode"] + spent["model"], 3), "decode_s": round(spent["decode"], 3),
               "model_s": round(spent["model"], 3), "interrupted": code == EXIT_INTERRUPTED}
    if len(probs_arr):
        summary["final"] = [{"class": n, "label": l, "prob": round(q, 6)} for n, l, q in _topk(probs_arr[-1], names, k)]
    if args.plot and len(probs_arr):
        summary["plot"] = str(plot_stream(times_arr, probs_arr, names, args.plot, title=Path(args.stream).name))
    if args.json:
        print(json.dumps({"summary": summary}), flush=True)
    else:
        state = "interrupted" if code == EXIT_INTERRUPTED else "ended"
        rate = (f", real-time factor {video_s / summary['compute_s']:.1f}" if summary["compute_s"] > 0 and video_s
                else "")
        print(f"stream {state}: {decoded} frames decoded, {len(times_arr)} steps over {video_s:.2f} s of video in "
              f"{elapsed:.2f} s{rate}")
        if len(probs_arr):
            print("final: " + "  ".join(f"{n} {q:.1%}" for n, _, q in _topk(probs_arr[-1], names, k)))
        if "plot" in summary:
            print(f"plot: {summary['plot']}")
    if code == EXIT_OK and decoded == 0:
        print(f"eleatt classify --stream: stream source '{args.stream}' yielded no frames", file=sys.stderr)
        code = EXIT_SOME_FAILED
    return code
