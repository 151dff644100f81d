"""A generated action dataset whose classes differ only in temporal order, for the tests and the demo.

Classes come in pairs: the second class of a pair is the first one played backwards (grow / shrink, move right /
move left, rotate clockwise / counter-clockwise, brighten / darken, hue rising / falling). Each video draws its own
random parameters (position, size, colours, speed, background texture and noise) from the same distribution for both
classes of a pair, so the set of frames carries no class information: a model that ignores frame order (averaged
frame features) cannot beat chance within a pair. The hue pair moves nothing, so optical flow cannot see it either.

Videos are real H.264 files encoded losslessly (libx264rgb, qp 0, rgb24 -> gbrp), so decoding returns exactly the
generated frames and no frame carries a compression trace of its position in the stream.
"""
from __future__ import annotations

import argparse
import os
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.data.lists import ListEntry, write_classes, write_list
from pipeline.errors import UsageError

Frames = np.ndarray  # uint8 (T, H, W, 3) RGB

# (forward class, backward class); the backward class is the forward process played in reverse.
PAIRS: tuple[tuple[str, str], ...] = (
    ("grow", "shrink"),
    ("move_right", "move_left"),
    ("rotate_cw", "rotate_ccw"),
    ("brighten", "darken"),
    ("hue_forward", "hue_backward"),
)
CLASSES: tuple[str, ...] = tuple(name for pair in PAIRS for name in pair)

DESCRIPTIONS: dict[str, str] = {
    "grow": "a square grows from small to large",
    "shrink": "a square shrinks from large to small",
    "move_right": "a disc moves from left to right",
    "move_left": "a disc moves from right to left",
    "rotate_cw": "a clock hand turns clockwise",
    "rotate_ccw": "a clock hand turns counter-clockwise",
    "brighten": "the whole scene brightens",
    "darken": "the whole scene darkens",
    "hue_forward": "a still square's hue rises: red -> yellow -> green -> blue (random start)",
    "hue_backward": "a still square's hue falls: red -> blue -> green -> yellow (random start)",
}

MIN_FRAMES, MIN_SIZE, MIN_VIDEOS_PER_CLASS = 4, 16, 3


# --------------------------------------------------------------------------------------------------- rendering
def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    """h (...,) in turns (any real; taken mod 1), s and v in [0, 1] -> float32 (..., 3) RGB in [0, 255]."""
    h = np.asarray(h, dtype=np.float32)[..., None]
    n = np.array([5.0, 3.0, 1.0], dtype=np.float32)  # R, G, B
    k = (n + h * 6.0) % 6.0
    rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (rgb * 255.0).astype(np.float32)


def _background(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    """float32 (T, S, S, 3): a dark random colour, a static per-pixel texture and a little noise per frame."""
    base = rng.uniform(10, 90, size=3).astype(np.float32)
    texture = rng.normal(0.0, rng.uniform(2.0, 10.0), size=(1, size, size, 3)).astype(np.float32)
    noise = rng.normal(0.0, rng.uniform(0.3, 1.0), size=(t, size, size, 3)).astype(np.float32)
    return base + texture + noise


def _object_colour(rng: np.random.Generator) -> np.ndarray:
    """float32 (3,): a bright saturated colour, so objects stand out from the dark background."""
    return _hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, float32 (1, S, 1) rows and (1, 1, S) columns for broadcasting against (T, 1, 1)."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :, None], c[None, None, :]


def _soft(edge_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance to the edge (positive inside), so sub-pixel motion shows."""
    return np.clip(edge_distance + 0.5, 0.0, 1.0)


def _compose(bg: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """bg (T, S, S, 3), alpha (T, S, S) in [0, 1], colour (3,) or (T, 3) -> float32 (T, S, S, 3)."""
    colour = np.asarray(colour, dtype=np.float32).reshape(-1, 1, 1, 3)  # (1|T, 1, 1, 3)
    a = alpha[..., None]
    return bg * (1.0 - a) + colour * a


def _ramp(t: int, start: float, end: float) -> np.ndarray:
    """float32 (T, 1, 1): linear from start (first frame) to end (last frame)."""
    return np.linspace(start, end, t, dtype=np.float32)[:, None, None]


def _grow(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    r0, r1 = rng.uniform(0.06, 0.12) * size, rng.uniform(0.28, 0.40) * size
    cy, cx = rng.uniform(r1, size - r1, size=2)
    colour, bg = _object_colour(rng), _background(rng, t, size)
    y, x = _grid(size)
    half = _ramp(t, r0, r1)  # (T, 1, 1) half side
    inside = half - np.maximum(np.abs(y - cy), np.abs(x - cx))  # (T, S, S) distance to the square's edge
    return _compose(bg, _soft(inside), colour)


def _move_right(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    r = rng.uniform(0.08, 0.14) * size
    x0, x1 = rng.uniform(r, 0.4 * size), rng.uniform(0.6 * size, size - r)
    cy = rng.uniform(r, size - r)
    colour, bg = _object_colour(rng), _background(rng, t, size)
    y, x = _grid(size)
    cx = _ramp(t, x0, x1)
    inside = r - np.sqrt((y - cy) ** 2 + (x - cx) ** 2)  # (T, S, S)
    return _compose(bg, _soft(inside), colour)


def _rotate_cw(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    length, half_width = rng.uniform(0.30, 0.42) * size, rng.uniform(0.025, 0.05) * size
    cy, cx = rng.uniform(0.45, 0.55, size=2) * size
    theta0, sweep = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.6 * np.pi, 1.2 * np.pi)
    colour, bg = _object_colour(rng), _background(rng, t, size)
    y, x = _grid(size)
    # Image rows grow downwards, so a growing angle (cos, sin) -> (x, y) turns clockwise on screen.
    theta = _ramp(t, theta0, theta0 + sweep)
    along = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)  # (T, S, S) distance along the hand
    across = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
    inside = np.minimum(half_width - np.abs(across), np.minimum(along, length - along))
    hub = half_width * 1.8 - np.sqrt((y - cy) ** 2 + (x - cx) ** 2)  # a round hub marks the pivot
    return _compose(bg, _soft(np.maximum(inside, hub)), colour)


def _brighten(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    r = rng.uniform(0.12, 0.25) * size
    cy, cx = rng.uniform(r, size - r, size=2)
    colour, bg = _object_colour(rng), _background(rng, t, size)
    y, x = _grid(size)
    inside = r - np.sqrt((y - cy) ** 2 + (x - cx) ** 2)  # (1, S, S)
    scene = _compose(bg, np.broadcast_to(_soft(inside), (t, size, size)), colour)
    gain = _ramp(t, rng.uniform(0.15, 0.45), rng.uniform(0.9, 1.1))[..., None]  # (T, 1, 1, 1)
    return scene * gain


def _hue_forward(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    half = rng.uniform(0.15, 0.3) * size
    cy, cx = rng.uniform(half, size - half, size=2)
    # Less than one full turn, so the direction of the cycle is never ambiguous.
    h0, turns = rng.uniform(0.0, 1.0), rng.uniform(0.5, 0.85)
    colour = _hsv_to_rgb(np.linspace(h0, h0 + turns, t), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))  # (T, 3)
    bg = _background(rng, t, size)
    y, x = _grid(size)
    inside = half - np.maximum(np.abs(y - cy), np.abs(x - cx))  # (1, S, S)
    return _compose(bg, np.broadcast_to(_soft(inside), (t, size, size)), colour)


_FORWARD: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "grow": _grow,
    "move_right": _move_right,
    "rotate_cw": _rotate_cw,
    "brighten": _brighten,
    "hue_forward": _hue_forward,
}


def render_video(
    name: str, seed: int | np.random.SeedSequence | np.random.Generator, num_frames: int = 24, size: int = 64
) -> Frames:
    """Renders one video of class `name`: uint8 (num_frames, size, size, 3) RGB.

    The same `seed` gives the same random parameters to both classes of a pair, and then the backward class is
    exactly the forward video reversed in time: `render_video("shrink", s) == render_video("grow", s)[::-1]`.
    """
    _check_classes([name])
    if num_frames < MIN_FRAMES or size < MIN_SIZE:
        raise UsageError(
            f"synthetic videos need num_frames >= {MIN_FRAMES} and size >= {MIN_SIZE}, got {num_frames} and {size}"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    for forward, backward in PAIRS:
        if name in (forward, backward):
            frames = _FORWARD[forward](rng, num_frames, size)
            frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
            return np.ascontiguousarray(frames[::-1] if name == backward else frames)
    raise AssertionError(f"class {name!r} is in CLASSES but in no pair")


def video_seed(seed: int, name: str, index: int) -> np.random.SeedSequence:
    """The seed of video `index` of class `name`: independent of which other classes or how many videos are made."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode()), index])


# --------------------------------------------------------------------------------------------------- encoding
def write_lossless_video(path: str | os.PathLike, frames: Frames, fps: int = 12) -> None:
    """Writes uint8 (T, H, W, 3) RGB frames to an H.264 .mp4 that decodes back to exactly these frames.

    libx264rgb with qp 0 codes the RGB planes (as gbrp) losslessly; yuv444p would lose up to 2 levels in the
    RGB -> YUV -> RGB round trip. The file appears atomically (written beside it, then renamed).
    """
    import av  # here, not at the top: `eleatt prepare` (which imports this module) encodes no video

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise UsageError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name in the same folder (same filesystem, so the rename is atomic), created with the usual
    # permissions (mkstemp would make it private).
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        with av.open(tmp, mode="w") as container:
            stream = container.add_stream("libx264rgb", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "rgb24"
            # ultrafast: no B-frames, so presentation order is decode order.
            stream.options = {"qp": "0", "preset": "ultrafast"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------- dataset
def _check_classes(names: list[str]) -> None:
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        raise UsageError(f"unknown synthetic class(es) {unknown}; choose from {', '.join(CLASSES)}")


def split_counts(videos_per_class: int) -> tuple[int, int, int]:
    """(train, val, test) videos per class: 20% each to val and test (at least one), the rest to train."""
    if videos_per_class < MIN_VIDEOS_PER_CLASS:
        raise UsageError(
            f"videos_per_class={videos_per_class}: need at least {MIN_VIDEOS_PER_CLASS} (one each for train, "
            "val and test)"
        )
    held_out = max(1, round(0.2 * videos_per_class))
    return videos_per_class - 2 * held_out, held_out, held_out


def make_dataset(
    out: str | os.PathLike,
    videos_per_class: int = 6,
    num_frames: int = 24,
    size: int = 64,
    seed: int = 0,
    classes: list[str] | tuple[str, ...] | None = None,
    fps: int = 12,
) -> dict:
    """Writes the generated dataset under `out` and returns a summary.

    Layout: `<out>/videos/<class>/<class>_<k>.mp4` (k = 0..videos_per_class-1), `<out>/{train,val,test}.txt`
    (paths relative to `out`, 0-based labels in `classes` order) and `<out>/classes.txt`. Per class, videos
    k < n_train go to train, the next n_val to val, the last n_test to test (`split_counts`); every video is its
    own source, so no source straddles two splits. Deterministic: the same arguments give byte-identical lists
    and identical decoded frames.

    Returns {"root", "classes", "pairs", "counts": {"train", "val", "test"}, "num_videos", "lists": {split: Path},
    "classes_file", "num_frames", "size", "fps", "seed"}.
    """
    names = list(CLASSES if classes is None else classes)
    _check_classes(names)
    if len(set(names)) != len(names):
        raise UsageError(f"classes listed twice in {names}")
    if num_frames < MIN_FRAMES or size < MIN_SIZE:
        raise UsageError(
            f"synthetic videos need num_frames >= {MIN_FRAMES} and size >= {MIN_SIZE}, got {num_frames} and {size}"
        )
    if fps < 1:
        raise UsageError(f"fps={fps}: must be a positive integer")
    n_train, n_val, n_test = split_counts(videos_per_class)
    out = Path(out)
    splits: dict[str, list[ListEntry]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(names):
        for k in range(videos_per_class):
            rel = f"videos/{name}/{name}_{k}.mp4"
            write_lossless_video(out / rel, render_video(name, video_seed(seed, name, k), num_frames, size), fps)
            split = "train" if k < n_train else "val" if k < n_train + n_val else "test"
            splits[split].append(ListEntry(rel, label))
    lists = {split: out / f"{split}.txt" for split in splits}
    for split, entries in splits.items():
        write_list(lists[split], entries)
    write_classes(out / "classes.txt", names)
    return {
        "root": out,
        "classes": names,
        "pairs": [pair for pair in PAIRS if pair[0] in names and pair[1] in names],
        "counts": {split: len(entries) for split, entries in splits.items()},
        "num_videos": len(names) * videos_per_class,
        "lists": lists,
        "classes_file": out / "classes.txt",
        "num_frames": num_frames,
        "size": size,
        "fps": fps,
        "seed": seed,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `eleatt prepare synthetic` (the command lives in preprocessing/prepare.py)."""
    parser.add_argument("--out", required=True, type=Path, help="output folder (videos/, lists, classes.txt)")
    parser.add_argument("--videos-per-class", type=int, default=6, help="videos per class, >= 3 (default: 6)")
    parser.add_argument("--frames", type=int, default=24, help="frames per video (default: 24)")
    parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels (default: 64)")
    parser.add_argument("--fps", type=int, default=12, help="frame rate written in the files (default: 12)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    parser.add_argument(
        "--classes",
        nargs="+",
        metavar="NAME",
        default=None,
        help=f"a subset of the classes, in label order (default: all {len(CLASSES)}: {', '.join(CLASSES)})",
    )
