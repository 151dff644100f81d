"""Dense optical flow computation: frames -> flow between consecutive frames, quantised (the pipeline side).

`eleatt flow` (``preprocessing/flow.py``) stores what this computes for every video of a list; `classify` with a
flow-stream checkpoint computes a new video's flow here with the settings the checkpoint records
(``FlowOptions``), so both see the same uint8 levels. Estimators: OpenCV DIS (default), Farneback, TV-L1 (contrib)
on greyscale frames resized to the short side, and torchvision RAFT from a local weights file.

Bounds for any input: frames are scaled up at most to a long side of ``UPSCALE_LONG_SIDE`` x the short side
(``target_size``), decoded and resized frames are held in chunks of ``DECODE_BYTES`` each, a frame larger than a
flow file holds (``MAX_FLOW_PIXELS``) or smaller than DIS handles (``DIS_MIN_SIDE``, below which OpenCV fails or
crashes) is refused with one line naming the video, and an OpenCV error on a video's frames becomes one line naming
the video (`UsageError`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data.flow_files import MAX_FLOW_PIXELS, MAX_FLOW_SIDE, FlowOptions, quantize
from pipeline.errors import InputNotFoundError, UsageError, load_failure

METHODS = ("dis", "farneback", "tvl1", "raft")
PRESETS = ("fast", "medium")
# The default preset: DIS fast (~800 pairs/s flow alone at 340x256 on one core) keeps end to end (decode + flow
# + quantise + write) above 100 pairs/s with 2 workers on a loaded 2-core machine; medium (~140-180) does not.
DEFAULT_PRESET = "fast"
DEFAULT_SHORT_SIDE = 256
# Bytes of decoded RGB frames held at once per worker, and of resized frames: bounds the memory of a long or 4K video.
DECODE_BYTES = 128 * 2**20
# Scaling a frame up stops at a long side of this many times the short side asked for (1024 px at 256): a video of
# 4000x16 is not blown up to 64000x256.
UPSCALE_LONG_SIDE = 4
# OpenCV's DIS needs frames of at least 12 px a side and crashes (segfault) on frames under 32 px high and a few
# times wider (measured with opencv-python 5.1 over 12..64 px short sides and 1..64:1 aspect ratios): both sides >= 32.
DIS_MIN_SIDE = 32
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
    """(H, W) after resizing the short side to ``short_side`` (None or 0: unchanged).

    Scaling up stops where the long side reaches ``UPSCALE_LONG_SIDE * short_side`` (or at the decoded size, when
    that is already longer): an elongated video keeps its frames within the memory of a 4:1 frame at the short
    side instead of growing without bound (4000x16 at 256: 4000x16, not 64000x256). Scaling down is never capped.
    """
    if not short_side or min(height, width) == short_side:
        return height, width
    s = short_side / min(height, width)
    if s > 1:
        s = max(1.0, min(s, UPSCALE_LONG_SIDE * short_side / max(height, width)))
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
        self.min_side = DIS_MIN_SIDE if method == "dis" else 1
        if method == "dis":
            self.dis = cv2.DISOpticalFlow_create(
                {"fast": cv2.DISOPTICAL_FLOW_PRESET_FAST, "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[preset])
        elif method == "tvl1":
            if not tvl1_available():
                raise UsageError(f"--method tvl1 needs OpenCV's contrib module (cv2.optflow), which is not installed; "
                                 f"replace opencv-python-headless by {CONTRIB} (pip uninstall opencv-python-headless "
                                 f"&& pip install {CONTRIB}; never both), or use --method dis")
            self.tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        elif method == "farneback":
            self.params = _FARNEBACK[preset]
        else:
            raise UsageError(f"--method {method!r}: expected one of {', '.join(METHODS)}")

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
        raise UsageError("--method raft needs --weights PATH: a torchvision RAFT state dict (raft_large or raft_small, "
                         "e.g. Raft_Large_Weights.C_T_SKHT_V2 saved with torch.save(model.state_dict(), PATH)); "
                         "nothing is downloaded")
    path = Path(weights)
    if not path.is_file():
        raise InputNotFoundError(f"RAFT weights '{path}' not found (--weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle, zip or safetensors error: any damaged or foreign file
        raise UsageError(f"RAFT weights '{path}' cannot be read ({load_failure(err)}); save them with "
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
    raise UsageError(f"'{path}' is not a torchvision raft_large or raft_small state dict (keys do not match)")


def raft_device(environ=None, cuda_count: int | None = None) -> str:
    """Where RAFT runs by default: the CPU without CUDA; on a node with several visible GPUs, the one of this process's
    local rank when it is one of several (torchrun's ``LOCAL_RANK``, else srun's ``SLURM_LOCALID``; modulo the GPUs
    visible), so that the shards of one node share its GPUs; else the current GPU (``cuda``)."""
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_count < 1:
        return "cpu"
    environ = os.environ if environ is None else environ
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = str(environ.get(key, "")).strip()
        if value.isdigit():
            return f"cuda:{int(value) % cuda_count}" if cuda_count > 1 else "cuda"
    return "cuda"


class RaftFlow:
    """torchvision RAFT on RGB frames, in batches of pairs, padded to a multiple of 8."""

    def __init__(self, weights: str | os.PathLike, preset: str = DEFAULT_PRESET, device: str | None = None):
        import torch

        self.torch = torch
        self.device = device or raft_device()
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
               backend: str = DEFAULT_BACKEND, decode_bytes: int = DECODE_BYTES) -> Iterator[np.ndarray]:
    """Quantised pairs uint8 (2, h, w) of a video, frame i -> i + 1, decoded in bounded chunks.

    Raises ValueError (``VideoReadError``) for an unreadable video and for one with fewer than 2 frames, and
    UsageError naming the video for frames outside the sizes flow is computed at (see the module's bounds) and for
    an OpenCV error on its frames.
    """
    import cv2

    from pipeline.data.video import probe, read_frames

    path = Path(path)
    info = probe(path)
    if info.num_frames < 2:
        raise UsageError(f"'{path}' has {info.num_frames} frame(s): no frame pairs, so no optical flow "
                         "(drop it from the list)")
    size = target_size(info.height, info.width, short_side)
    at = f"{size[1]}x{size[0]}" + (f" (decoded {info.width}x{info.height}, short side {short_side})"
                                   if size != (info.height, info.width) else "")
    if max(size) > MAX_FLOW_SIDE or size[0] * size[1] > MAX_FLOW_PIXELS:
        raise UsageError(f"'{path}': its frames are {at}, larger than a flow file holds ({MAX_FLOW_PIXELS} pixels, "
                         f"{MAX_FLOW_SIDE} a side); compute the flow at a smaller --short-side (e.g. 256)")
    min_side = getattr(estimator, "min_side", 1)
    if min(size) < min_side:
        raise UsageError(f"'{path}': its frames are {at}; {getattr(estimator, 'method', 'the method')} needs at least "
                         f"{min_side}x{min_side} (a frame is scaled up at most to a long side of {UPSCALE_LONG_SIDE} x "
                         "the short side); use --method farneback for such a video, or drop it from the list")
    # Both the decoded chunk and its resized images (RAFT: RGB at the target size) stay within decode_bytes.
    chunk = max(2, decode_bytes // (3 * max(info.height * info.width, size[0] * size[1])))
    previous = None  # the last prepared image of the previous chunk, paired with this chunk's first
    for start in range(0, info.num_frames, chunk):
        frames = read_frames(path, np.arange(start, min(start + chunk, info.num_frames)), backend=backend)
        try:
            images = estimator.prepare(frames, size)
            del frames
            if previous is not None:
                images.insert(0, previous)
            for flow in estimator.flows(images):  # (h, w, 2)
                yield quantize(flow.transpose(2, 0, 1), bound)  # (2, h, w) x, y
        except cv2.error as err:  # OpenCV's multi-line text: its last line says what went wrong
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            raise UsageError(f"'{path}': OpenCV failed on its {at} frames ({(lines or ['?'])[-1][:200]}); drop the "
                             "video from the list, or try another --method") from None
        previous = images[-1]


def estimator_for(options: FlowOptions, weights_path: str | os.PathLike | None = None):
    """A fresh estimator for the flow settings ``options`` (RAFT needs the local weights file ``weights_path``)."""
    if options.method == "raft":
        if weights_path is None:
            raise UsageError(f"the flow was computed with RAFT ({options.raft}, weights file {options.weights!r}); "
                             "pass the path of that weights file (flow_weights=PATH) to compute it again")
        return RaftFlow(weights_path, options.preset)
    if options.method not in METHODS:
        raise UsageError(f"flow method {options.method!r} cannot be computed here (flow imported from JPEG "
                         "folders has no recorded method); compute flow with `eleatt flow --method dis` instead")
    return OpenCVFlow(options.method, options.preset)
