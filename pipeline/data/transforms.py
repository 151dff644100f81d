"""Clip transforms: pure functions on ``(T, C, H, W)`` tensors (whole clips at once) plus thin module wrappers.

Decoded frames arrive as uint8 ``(T, H, W, 3)`` RGB (``pipeline.data.video.load_frames``) and are converted once
with :func:`to_tchw` (a view; no copy). Spatial ops take any leading dimensions (``(..., C, H, W)``) and apply the
same geometry to every frame, so a clip keeps one crop. Resizing runs on uint8 with antialiasing (torchvision's
kernels, which follow PIL), and the only float conversion is the final, fused ``/255`` + normalisation.
``C`` is 3 for RGB and ``2L`` for optical-flow stacks laid out ``x1, y1, x2, y2, ...``.

Sizes, mean, std, crop fraction, crop mode and interpolation come from the backbone's timm data config, a plain
dict as ``timm.data.resolve_data_config(model=...)`` returns::

    {"input_size": (3, H, W), "mean": (...), "std": (...), "crop_pct": 0.875,
     "interpolation": "bicubic", "crop_mode": "center"}

:func:`eval_views` reproduces ``timm.data.create_transform(**data_config, is_training=False)`` for the centre view
(up to the ±1 uint8 difference between torch's and PIL's antialiased resize kernels).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from pipeline.data.sampling import VIEW_COUNTS
from pipeline.errors import UsageError

__all__ = [
    "DEFAULT_CROP_PCT",
    "TSN_SCALES",
    "VIEW_COUNTS",
    "to_tchw",
    "resize",
    "resize_short",
    "crop",
    "center_crop",
    "three_crop",
    "ten_crop",
    "hflip",
    "random_resized_crop",
    "random_resized_crop_params",
    "multi_scale_crop",
    "multi_scale_crop_params",
    "normalize",
    "eval_resize",
    "eval_views",
    "train_clip_transform",
    "ResizeShort",
    "CenterCrop",
    "RandomHFlip",
    "Normalize",
    "EvalViews",
    "TrainClipTransform",
]

DEFAULT_CROP_PCT = 0.875  # timm's default when a config has no crop_pct
TSN_SCALES: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)  # TSN's multi-scale crop scales (of the short side)
Views = Literal["center", "three", "ten"]
Size = int | Sequence[int]

# timm's interpolation names -> tensor kernels. PIL's NEAREST samples pixel centres, which is torch's
# "nearest-exact" (torch's "nearest" floors and shifts the image by half a pixel).
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST_EXACT,
    "nearest-exact": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _interp(name: str | InterpolationMode) -> InterpolationMode:
    if isinstance(name, InterpolationMode):
        return name
    mode = _INTERPOLATIONS.get(str(name).lower())
    if mode is None:
        raise UsageError(
            f"interpolation {name!r} is not supported on tensors; use one of {sorted(_INTERPOLATIONS)} "
            "(set data_config['interpolation'], e.g. to 'bicubic')"
        )
    return mode


def _pair(size: Size, name: str = "size") -> tuple[int, int]:
    """``size`` as ``(h, w)``: an int means a square."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    elif isinstance(size, Sequence) and len(size) == 1:
        h = w = int(size[0])
    elif isinstance(size, Sequence) and len(size) == 2:
        h, w = int(size[0]), int(size[1])
    else:
        raise UsageError(f"{name} must be an int or (height, width), got {size!r}")
    if h < 1 or w < 1:
        raise UsageError(f"{name} must be positive, got {size!r}")
    return h, w


def _check_image(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise UsageError(f"{fn} expects a tensor (..., C, H, W) (e.g. a clip (T, C, H, W) from to_tchw), got {shape}")


def _need_rng(rng: np.random.Generator | None, fn: str) -> np.random.Generator:
    if rng is None:
        raise UsageError(f"{fn} is random: pass rng=np.random.default_rng(seed)")
    return rng


def _torch_seeded_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's global RNG (which DataLoader seeds differently in every worker)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


# ----------------------------------------------------------------------------------------------------------------
# layout and geometry

def to_tchw(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Decoded frames ``(T, H, W, C)`` (uint8 RGB, tensor or array) -> ``(T, C, H, W)``.

    A permuted view (channels-last in memory, which is what torch's fast uint8 resize kernels want); no copy.
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise UsageError(f"to_tchw expects frames (T, H, W, C) as load_frames returns, got {shape}")
    return frames.permute(0, 3, 1, 2)


def resize(x: torch.Tensor, size: Size, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``(..., C, H, W)`` to exactly ``size`` = ``(h, w)`` (or a square int), antialiased. Dtype is kept.

    Flow stacks are resized like images: values are not rescaled with the image (as in TSN / mmaction2).
    """
    _check_image(x, "resize")
    h, w = _pair(size)
    return TF.resize(x, [h, w], interpolation=_interp(interpolation), antialias=True)


def resize_short(x: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``(..., C, H, W)`` so the short side is ``size``; the long side becomes ``int(size * long / short)``
    (torchvision's ``Resize(int)`` rule, which timm's eval transform uses). Antialiased; dtype is kept."""
    _check_image(x, "resize_short")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise UsageError(f"resize_short size must be a positive int (the short side), got {size!r}")
    return TF.resize(x, [int(size)], interpolation=_interp(interpolation), antialias=True)


def crop(x: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """The box ``[top, top + height) x [left, left + width)`` of ``(..., C, H, W)`` (a view), which must fit."""
    _check_image(x, "crop")
    H, W = x.shape[-2:]
    if top < 0 or left < 0 or height < 1 or width < 1 or top + height > H or left + width > W:
        raise UsageError(
            f"crop box (top={top}, left={left}, height={height}, width={width}) does not fit an image of {H}x{W} "
            "(resize the short side to at least the crop size first)"
        )
    return x[..., top:top + height, left:left + width]


def center_crop(x: torch.Tensor, size: Size, fill: float | Sequence[float] = 0) -> torch.Tensor:
    """Centre ``size`` crop of ``(..., C, H, W)`` at torchvision's offsets ``round((H - h) / 2)``.

    An image smaller than the crop is first padded symmetrically with ``fill`` (a value or one per channel),
    as torchvision's ``CenterCrop`` (fill 0) and timm's ``CenterCropOrPad`` do.
    """
    _check_image(x, "center_crop")
    h, w = _pair(size)
    H, W = x.shape[-2:]
    if h > H or w > W:
        pad_top, pad_left = max(h - H, 0) // 2, max(w - W, 0) // 2
        Hp, Wp = max(H, h), max(W, w)
        fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        canvas = fill_t.expand(*x.shape[:-2], Hp, Wp).clone()
        canvas[..., pad_top:pad_top + H, pad_left:pad_left + W] = x
        x, H, W = canvas, Hp, Wp
    top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    return x[..., top:top + h, left:left + w]


def three_crop(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Three ``size`` crops along the long side of ``(..., C, H, W)``: start, centre, end (left/centre/right for
    landscape or square frames, top/centre/bottom for portrait), centred on the short side.

    The middle view equals :func:`center_crop`. Returns ``(3, ..., C, h, w)``.
    """
    _check_image(x, "three_crop")
    h, w = _pair(size)
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise UsageError(f"three_crop size {h}x{w} is larger than the {H}x{W} image (resize the short side first)")
    top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    if H > W:
        boxes = [(0, left), (top, left), (H - h, left)]
    else:
        boxes = [(top, 0), (top, left), (top, W - w)]
    return torch.stack([crop(x, t, l, h, w) for t, l in boxes])


def ten_crop(x: torch.Tensor, size: Size, flow: bool = False) -> torch.Tensor:
    """Ten ``size`` views of ``(..., C, H, W)``: top-left, top-right, bottom-left, bottom-right, centre, then the
    horizontal flip of each of those five in the same order (view ``k + 5`` = ``hflip(view k)``).

    ``flow=True`` flips flow stacks the flow way (see :func:`hflip`). Returns ``(10, ..., C, h, w)``.
    """
    _check_image(x, "ten_crop")
    h, w = _pair(size)
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise UsageError(f"ten_crop size {h}x{w} is larger than the {H}x{W} image (resize the short side first)")
    five = torch.stack([
        crop(x, 0, 0, h, w),
        crop(x, 0, W - w, h, w),
        crop(x, H - h, 0, h, w),
        crop(x, H - h, W - w, h, w),
        center_crop(x, (h, w)),
    ])
    return torch.cat([five, hflip(five, flow=flow)])


def hflip(x: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """Mirror ``(..., C, H, W)`` left-right (a new tensor).

    ``flow=True``: ``x`` is an optical-flow stack with channels ``x1, y1, x2, y2, ...``; mirroring the image also
    reverses horizontal motion, so the x channels (0, 2, 4, ...) are negated (float flow in pixels centred at 0)
    or mapped ``q -> 255 - q`` (uint8 flow quantised around 127.5, as mmaction2 stores it). y is unchanged.
    """
    _check_image(x, "hflip")
    out = x.flip(-1)
    if flow:
        if x.shape[-3] % 2:
            raise UsageError(f"hflip(flow=True) needs an even channel count (x1, y1, x2, y2, ...), got C={x.shape[-3]}")
        xs = out[..., 0::2, :, :]
        if out.dtype == torch.uint8:
            xs.bitwise_not_()  # 255 - q for uint8
        elif out.dtype.is_floating_point or out.dtype.is_signed:
            xs.neg_()
        else:
            raise UsageError(f"hflip(flow=True) supports float (pixels) or uint8 (quantised) flow, got {out.dtype}")
    return out


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` on a numpy generator: ``(top, left, h, w)``.

    Ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio (w / h) in ``ratio``; then a
    centre crop clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    x: torch.Tensor,
    size: Size,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Inception-style random-resized crop of ``(..., C, H, W)``: one box (area fraction in ``scale``, aspect in
    ``ratio``) for every frame, resized to ``size``. Returns ``(..., C, h, w)``, dtype kept."""
    _check_image(x, "random_resized_crop")
    if not (0 < scale[0] <= scale[1] <= 1.0) or not (0 < ratio[0] <= ratio[1]):
        raise UsageError(f"random_resized_crop needs 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                         f"got scale={scale}, ratio={ratio}")
    top, left, h, w = random_resized_crop_params(*x.shape[-2:], scale, ratio, _need_rng(rng, "random_resized_crop"))
    return resize(crop(x, top, left, h, w), size, interpolation)


def multi_scale_crop_params(
    height: int,
    width: int,
    size: Size,
    rng: np.random.Generator,
    scales: Sequence[float] = TSN_SCALES,
    max_distort: int = 1,
    fix_crop: bool = True,
    more_fix_crop: bool = True,
) -> tuple[int, int, int, int]:
    """TSN's ``GroupMultiScaleCrop`` box ``(top, left, h, w)`` for a ``height x width`` image.

    Crop sides are ``int(short_side * s)`` for ``s`` in ``scales`` (snapped to the output side when within 3 px);
    a (height, width) pair is drawn among scale pairs at most ``max_distort`` apart in the list. With
    ``fix_crop`` the box sits at one of 5 (``more_fix_crop``: 13) fixed positions on a quarter grid (corners,
    centre, edge centres, quarter points), else anywhere.
    """
    out_h, out_w = _pair(size)
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    crop_hs = [out_h if abs(s - out_h) < 3 else s for s in sides]
    crop_ws = [out_w if abs(s - out_w) < 3 else s for s in sides]
    pairs = [(ch, cw) for i, ch in enumerate(crop_hs) for j, cw in enumerate(crop_ws) if abs(i - j) <= max_distort]
    ch, cw = pairs[int(rng.integers(len(pairs)))]
    ch, cw = max(1, min(ch, height)), max(1, min(cw, width))
    if not fix_crop:
        return int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1)), ch, cw
    hs, ws = (height - ch) // 4, (width - cw) // 4
    grid = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]  # (row, col) in quarter steps
    if more_fix_crop:
        grid += [(2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1), (3, 3)]
    r, c = grid[int(rng.integers(len(grid)))]
    return r * hs, c * ws, ch, cw


def multi_scale_crop(
    x: torch.Tensor,
    size: Size,
    scales: Sequence[float] = TSN_SCALES,
    max_distort: int = 1,
    fix_crop: bool = True,
    more_fix_crop: bool = True,
    rng: np.random.Generator | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """TSN multi-scale crop of ``(..., C, H, W)``: one box from :func:`multi_scale_crop_params` for every frame,
    resized to ``size``. TSN first resizes the short side to 256 for a 224 output (see
    :func:`train_clip_transform`). Returns ``(..., C, h, w)``, dtype kept."""
    _check_image(x, "multi_scale_crop")
    if not scales or any(not 0 < s <= 1 for s in scales):
        raise UsageError(f"multi_scale_crop scales must be fractions in (0, 1], got {tuple(scales)}")
    rng = _need_rng(rng, "multi_scale_crop")
    top, left, h, w = multi_scale_crop_params(*x.shape[-2:], size, rng, scales, max_distort, fix_crop, more_fix_crop)
    return resize(crop(x, top, left, h, w), size, interpolation)


# ----------------------------------------------------------------------------------------------------------------
# values

def _norm_stats(
    mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(-1)
    for name, t in (("mean", mean_t), ("std", std_t)):
        if t.numel() not in (1, channels):
            raise UsageError(
                f"normalize {name} has {t.numel()} values for {channels} channels; give one value or one per "
                "channel (flow stacks with an RGB data config: use e.g. mean=(0.5,), std=(mean of the RGB std,))"
            )
    if bool((std_t <= 0).any()):
        raise UsageError(f"normalize std must be positive, got {std_t.tolist()}")
    return mean_t.reshape(-1, 1, 1), std_t.reshape(-1, 1, 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``(..., C, H, W)``; x float in [0, 1] (uint8 is read as ``x / 255``).

    ``mean`` and ``std`` hold one value or one per channel. Returns float32 (or x's float dtype), contiguous.
    """
    _check_image(x, "normalize")
    mean_t, std_t = _norm_stats(mean, std, x.shape[-3], x.device)
    if x.dtype == torch.uint8:
        # One fused pass: x / 255 / std - mean / std.
        return torch.addcmul(-mean_t / std_t, x.to(torch.float32, memory_format=torch.contiguous_format),
                             1.0 / (255.0 * std_t))
    if not x.dtype.is_floating_point:
        raise UsageError(f"normalize expects float in [0, 1] or uint8, got {x.dtype}")
    return ((x - mean_t.to(x.dtype)) / std_t.to(x.dtype)).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# data config -> whole pipelines

def _config(data_config: Mapping) -> dict:
    """Validated fields of a timm data config (missing crop_pct / crop_mode take timm's defaults)."""
    if not isinstance(data_config, Mapping):
        raise UsageError(f"data_config must be a dict like timm.data.resolve_data_config's, got {type(data_config)}")
    missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
    if missing:
        raise UsageError(f"data_config lacks {missing}; pass the backbone's data config "
                         "(FrameEncoder.data_config or timm.data.resolve_data_config(model=...))")
    input_size = tuple(int(v) for v in data_config["input_size"])
    if len(input_size) != 3:
        raise UsageError(f"data_config['input_size'] must be (C, H, W), got {data_config['input_size']!r}")
    crop_pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
    if not 0 < crop_pct:
        raise UsageError(f"data_config['crop_pct'] must be positive, got {crop_pct!r}")
    crop_mode = data_config.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash", "border"):
        raise UsageError(f"data_config['crop_mode'] must be 'center', 'squash' or 'border', got {crop_mode!r}")
    interpolation = data_config.get("interpolation") or "bilinear"
    _interp(interpolation)  # fail early on unsupported names
    return {
        "channels": input_size[0],
        "size": input_size[1:],
        "mean": tuple(float(v) for v in data_config["mean"]),
        "std": tuple(float(v) for v in data_config["std"]),
        "crop_pct": float(crop_pct),
        "crop_mode": crop_mode,
        "interpolation": interpolation,
    }


def _frames_tchw(frames: torch.Tensor | np.ndarray, channels: int, fn: str) -> torch.Tensor:
    x = to_tchw(frames)
    if x.shape[1] != channels:
        raise UsageError(f"{fn} expects frames (T, H, W, {channels}) as load_frames returns (data config "
                         f"input_size has {channels} channels), got {tuple(frames.shape)}")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise UsageError(f"{fn} expects uint8 frames (or float in [0, 1]), got {x.dtype}")
    return x


def eval_resize(x: torch.Tensor, data_config: Mapping) -> torch.Tensor:
    """timm's eval resize of ``(..., C, H, W)`` (``scale = floor(input / crop_pct)`` per side), before cropping.

    ``crop_mode`` ``"center"``: short side to ``scale`` (square inputs; the long side follows torchvision's
    ``int()`` rule) or the smallest aspect-keeping size covering ``scale`` (non-square inputs, timm's
    ``ResizeKeepRatio``); ``"squash"``: exactly ``scale``; ``"border"``: the long side fits ``scale``.
    """
    cfg = _config(data_config)
    out_h, out_w = cfg["size"]
    scale_h, scale_w = math.floor(out_h / cfg["crop_pct"]), math.floor(out_w / cfg["crop_pct"])
    interp = cfg["interpolation"]
    if cfg["crop_mode"] == "squash":
        return resize(x, (scale_h, scale_w), interp)
    if cfg["crop_mode"] == "center" and scale_h == scale_w:
        return resize_short(x, scale_h, interp)
    H, W = x.shape[-2:]
    ratios = (H / scale_h, W / scale_w)
    r = max(ratios) if cfg["crop_mode"] == "border" else min(ratios)
    return resize(x, (round(H / r), round(W / r)), interp)


def eval_views(
    frames: torch.Tensor | np.ndarray, data_config: Mapping, views: Views = "center", flow: bool = False
) -> torch.Tensor:
    """Test-time views of a clip, normalised and ready for the backbone.

    ``flow=True``: the channels are flow stacks ``x1, y1, ...`` (uint8 levels): the ten views' mirrored crops
    negate x (:func:`hflip`); every view crops all channels alike.

    ``frames`` uint8 ``(T, H, W, C)`` RGB (or float in [0, 1]) -> :func:`eval_resize` -> ``views``:
    ``"center"`` (timm's eval transform), ``"three"`` (:func:`three_crop`, centre in the middle) or ``"ten"``
    (:func:`ten_crop`, centre at index 4) -> normalise with the config's mean/std.

    Returns:
        float32 ``(V, T, C, H_in, W_in)`` with V = 1, 3 or 10, contiguous, on the frames' device.
    """
    cfg = _config(data_config)
    if views not in VIEW_COUNTS:
        raise UsageError(f"views must be one of {tuple(VIEW_COUNTS)}, got {views!r}")
    x = eval_resize(_frames_tchw(frames, cfg["channels"], "eval_views"), data_config)  # (T, C, h', w')
    if views != "center" and (x.shape[-2] < cfg["size"][0] or x.shape[-1] < cfg["size"][1]):
        raise UsageError(
            f"views={views!r} needs the resized frames ({x.shape[-2]}x{x.shape[-1]}) to cover the input size "
            f"{cfg['size'][0]}x{cfg['size'][1]}, but crop_mode={cfg['crop_mode']!r} with crop_pct={cfg['crop_pct']} "
            "shrinks them below it (use views='center', or crop_mode 'center' with crop_pct <= 1)"
        )
    if views == "center":
        fill = [round(255 * m) for m in cfg["mean"]] if x.dtype == torch.uint8 else list(cfg["mean"])
        out = center_crop(x, cfg["size"], fill=fill if cfg["crop_mode"] == "border" else 0)[None]
    elif views == "three":
        out = three_crop(x, cfg["size"])
    else:
        out = ten_crop(x, cfg["size"], flow=flow)
    return normalize(out, cfg["mean"], cfg["std"])  # (V, T, C, H, W)


def train_clip_transform(
    frames: torch.Tensor | np.ndarray,
    data_config: Mapping,
    rng: np.random.Generator,
    augment: Literal["multi_scale", "random_resized"] = "multi_scale",
    scales: Sequence[float] = TSN_SCALES,
    max_distort: int = 1,
    area: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Training augmentation for an RGB clip: one random crop and one flip decision for all frames.

    ``frames`` uint8 ``(T, H, W, C)`` RGB. ``augment="multi_scale"``: TSN's multi-scale corner crop (``scales``,
    ``max_distort``) of the frames as if resized to a short side of ``floor(min(H_in, W_in) / crop_pct)``
    (256 for 224 inputs), the box mapped back so each frame is resized only once; ``augment="random_resized"``:
    Inception/timm random-resized crop (``area``, ``ratio``). Then a horizontal flip with probability 0.5
    (``flip``) and normalisation with the config's mean/std.

    Returns:
        float32 ``(T, C, H_in, W_in)``, contiguous.
    """
    cfg = _config(data_config)
    rng = _need_rng(rng, "train_clip_transform")
    x = _frames_tchw(frames, cfg["channels"], "train_clip_transform")  # (T, C, H, W)
    H, W = x.shape[-2:]
    if augment == "multi_scale":
        short = math.floor(min(cfg["size"]) / cfg["crop_pct"])
        s = short / min(H, W)  # the virtual resize factor
        vh, vw = max(1, round(H * s)), max(1, round(W * s))
        top, left, h, w = multi_scale_crop_params(vh, vw, cfg["size"], rng, scales, max_distort)
        top, left = min(round(top / s), H - 1), min(round(left / s), W - 1)
        h, w = max(1, min(round(h / s), H - top)), max(1, min(round(w / s), W - left))
    elif augment == "random_resized":
        top, left, h, w = random_resized_crop_params(H, W, area, ratio, rng)
    else:
        raise UsageError(f"augment must be 'multi_scale' or 'random_resized', got {augment!r}")
    x = resize(crop(x, top, left, h, w), cfg["size"], cfg["interpolation"])
    if flip and rng.random() < 0.5:
        x = hflip(x)
    return normalize(x, cfg["mean"], cfg["std"])


# ----------------------------------------------------------------------------------------------------------------
# thin module wrappers (for nn.Sequential-style composition; random ones take an optional rng)

class ResizeShort(nn.Module):
    """:func:`resize_short` as a module."""

    def __init__(self, size: int, interpolation: str = "bilinear"):
        super().__init__()
        _interp(interpolation)
        self.size, self.interpolation = size, interpolation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_short(x, self.size, self.interpolation)

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.interpolation!r}"


class CenterCrop(nn.Module):
    """:func:`center_crop` as a module."""

    def __init__(self, size: Size):
        super().__init__()
        self.size = _pair(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return center_crop(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class RandomHFlip(nn.Module):
    """:func:`hflip` with probability ``p`` (one decision per call, so per clip). Without an ``rng`` argument the
    draw comes from torch's global RNG, which DataLoader seeds per worker."""

    def __init__(self, p: float = 0.5, flow: bool = False):
        super().__init__()
        self.p, self.flow = p, flow

    def forward(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng if rng is not None else _torch_seeded_rng()
        return hflip(x, flow=self.flow) if rng.random() < self.p else x

    def extra_repr(self) -> str:
        return f"p={self.p}, flow={self.flow}"


class Normalize(nn.Module):
    """:func:`normalize` as a module (mean/std as buffers, so ``.to(device)`` moves them)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


class EvalViews(nn.Module):
    """:func:`eval_views` for a fixed data config: uint8 ``(T, H, W, C)`` -> float32 ``(V, T, C, H_in, W_in)``."""

    def __init__(self, data_config: Mapping, views: Views = "center"):
        super().__init__()
        _config(data_config)
        if views not in VIEW_COUNTS:
            raise UsageError(f"views must be one of {tuple(VIEW_COUNTS)}, got {views!r}")
        self.data_config, self.views = dict(data_config), views

    def forward(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        return eval_views(frames, self.data_config, self.views)

    def extra_repr(self) -> str:
        return f"views={self.views!r}, input_size={tuple(self.data_config['input_size'])}"


class TrainClipTransform(nn.Module):
    """:func:`train_clip_transform` for a fixed data config: uint8 ``(T, H, W, C)`` -> float32 ``(T, C, H, W)``.

    ``forward(frames, rng=None)``: without an rng the draw comes from torch's global RNG (seeded per worker)."""

    def __init__(self, data_config: Mapping, augment: Literal["multi_scale", "random_resized"] = "multi_scale",
                 scales: Sequence[float] = TSN_SCALES, max_distort: int = 1,
                 area: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: bool = True):
        super().__init__()
        _config(data_config)
        if augment not in ("multi_scale", "random_resized"):
            raise UsageError(f"augment must be 'multi_scale' or 'random_resized', got {augment!r}")
        self.data_config = dict(data_config)
        self.kwargs = dict(augment=augment, scales=tuple(scales), max_distort=max_distort, area=tuple(area),
                           ratio=tuple(ratio), flip=flip)

    def forward(self, frames: torch.Tensor | np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng if rng is not None else _torch_seeded_rng()
        return train_clip_transform(frames, self.data_config, rng, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
