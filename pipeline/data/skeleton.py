"""NTU RGB+D 3D skeletons: reading `.skeleton` text files, choosing and centring two bodies, rotation augmentation.

The path from a skeleton file to the model's input exists once, here: `load_skeleton(path)` returns the float32
`(T, 150)` sequence `eleatt prepare ntu-skeleton` stores (2 bodies x 25 joints x (x, y, z), body-major), and
`SkeletonRotation` is the training-time augmentation the feature data module plugs in (`--data.augment`).

The `.skeleton` format (Kinect v2, as released by NTU): the frame count; per frame a body count; per body a line of
10 values (body id, clipped edges, left/right hand confidence and state, restricted flag, lean x and y, tracking
state), the joint count (25) and 25 lines of 12 values (x, y, z in metres, depth x/y, colour x/y, orientation
w/x/y/z, tracking state). Only x, y, z are kept.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pipeline.errors import InputNotFoundError, UsageError

if TYPE_CHECKING:  # torch is imported where rotations need it, so that `eleatt prepare` parses files without it
    import torch

NUM_JOINTS = 25
NUM_BODIES = 2  # the two most active bodies are kept; NTU's two-person actions need both
CENTRE_JOINT = 1  # 0-based index of NTU joint 2, the middle of the spine (the view-adaptive preprocessing's origin)
FEATURE_DIM = NUM_BODIES * NUM_JOINTS * 3  # 150
# The 24 bones of the Kinect v2 skeleton as (joint, parent), 0-based (NTU numbers minus 1), as in ST-GCN's NTU graph.
NTU_BONES: tuple[tuple[int, int], ...] = tuple((a - 1, b - 1) for a, b in (
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10), (12, 11),
    (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (22, 23), (23, 8), (24, 25),
    (25, 12),
))
# The 16 bones of the COCO-17 keypoints (2D pose estimators: HRNet, pyskl's *_hrnet.pkl) as (joint, parent),
# 0-based: 0 nose, 1/2 eyes, 3/4 ears, 5/6 shoulders, 7/8 elbows, 9/10 wrists, 11/12 hips, 13/14 knees, 15/16 ankles
# (left, right); the nose is the root (zero), shoulders and hips hang from it, as pyskl's COCO graph.
COCO_BONES: tuple[tuple[int, int], ...] = (
    (1, 0), (2, 0), (3, 1), (4, 2), (5, 0), (6, 0), (7, 5), (8, 6), (9, 7), (10, 8), (11, 0), (12, 0), (13, 11),
    (14, 12), (15, 13), (16, 14),
)
BONES_BY_JOINTS: dict[int, tuple[tuple[int, int], ...]] = {25: NTU_BONES, 17: COCO_BONES}
BODY_INFO_VALUES = 10
JOINT_VALUES = 12
# Reading bounds (a file is untrusted): NTU's files are at most a few MB and a few hundred frames; coordinates are
# metres from the camera. Beyond these a file is damaged, and refused before it costs memory.
MAX_FILE_BYTES = 32 * 2**20
MAX_FRAMES = 20_000  # 11 minutes at 30 fps; the joints of 20000 frames take 12 MB
MAX_BODIES = 64  # per frame
MAX_COORDINATE = 1e4  # metres


class SkeletonFormatError(UsageError):
    """A `.skeleton` file does not follow the NTU format; the message names the file and the line."""


@dataclass
class Body:
    """One tracked body of a file: `frames` int64 (n,) frame indices where it appears, `joints` float32 (n, 25, 3)."""

    body_id: str
    frames: np.ndarray
    joints: np.ndarray
    clean: np.ndarray | None = None  # bool (n,): the frames the noise filter found clean (None: not filtered)

    @property
    def motion(self) -> float:
        """Sum over joints and axes of the position variance over the body's frames (0 for a single frame); after
        the noise filter, the lower of that and the same over its clean frames (the dataset authors' rule)."""
        value = _variance(self.joints)
        if self.clean is not None and 1 < self.clean.sum() < len(self.clean):
            value = min(value, _variance(self.joints[self.clean]))
        return value


def _variance(joints: np.ndarray) -> float:
    return float(joints.astype(np.float64).var(axis=0).sum()) if len(joints) > 1 else 0.0


@dataclass
class SkeletonFile:
    """The bodies of one file, in order of first appearance; `num_frames` counts the frames read (with or without
    bodies); `truncated` is set when the file ended early and the whole frames before the cut were kept."""

    path: str
    num_frames: int
    bodies: list[Body]
    truncated: bool = False


class _Truncated(Exception):
    """Internal: the file ended before the frames its header announces."""


def _error(path: str, line: int | None, reason: str, fix: str = "") -> SkeletonFormatError:
    where = f"{path}:{line}" if line is not None else path
    return SkeletonFormatError(f"skeleton file {where}: {reason}" + (f" ({fix})" if fix else ""))


def read_skeleton(path: str | os.PathLike, allow_truncated: bool = False) -> SkeletonFile:
    """Parses an NTU `.skeleton` file.

    Frames with no body are counted (and carry no body); any number of bodies per frame is read (selection is
    `select_bodies`'s job). A body seen twice in one frame under the same id becomes a separate body.
    A file that ends before the frames its header announces raises SkeletonFormatError, unless `allow_truncated`:
    then the whole frames read so far are kept and `truncated` is set. Blank lines are ignored.

    Raises:
        FileNotFoundError: no such file.
        SkeletonFormatError: malformed content, naming the file and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"skeleton file '{path}' not found")
    name = str(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise _error(name, None, f"{path.stat().st_size} bytes, more than a skeleton file holds "
                     f"({MAX_FILE_BYTES // 2**20} MB at most)", "is it an NTU .skeleton file?")
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as err:
        raise _error(name, None, f"not a text file ({err.reason} at byte {err.start})", "is it an NTU .skeleton file?")
    rows = [(n, s.strip()) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    pos = 0
    def take() -> tuple[int, str]:
        nonlocal pos
        if pos >= len(rows):
            raise _Truncated
        row = rows[pos]
        pos += 1
        return row

    def count(what: str, limit: int) -> int:
        n, s = take()
        if not s.isdigit() or len(s) > 12 or int(s) > limit:
            raise _error(name, n, f"expected the {what} (an integer in 0..{limit}), got {s[:60]!r}")
        return int(s)

    if not rows:
        raise _error(name, None, "the file is empty", "re-extract or re-download it")
    num_frames = count("frame count", MAX_FRAMES)
    per_body: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    frame = 0
    truncated = False
    try:
        for frame in range(num_frames):
            bodies = count("body count of frame %d" % (frame + 1), MAX_BODIES)
            seen: dict[str, int] = {}
            frame_bodies: list[tuple[str, np.ndarray]] = []
            for _ in range(bodies):
                n, info = take()
                fields = info.split()
                if len(fields) != BODY_INFO_VALUES:
                    raise _error(name, n, f"expected a body line of {BODY_INFO_VALUES} values (body id, clipped "
                                 f"edges, hand states, restricted, lean x/y, tracking state), got {len(fields)}")
                joints_count = count("joint count", 10_000)
                if joints_count != NUM_JOINTS:
                    raise _error(name, rows[pos - 1][0], f"joint count {joints_count}, expected {NUM_JOINTS} "
                                 "(Kinect v2 skeletons)")
                if pos + NUM_JOINTS > len(rows):
                    raise _Truncated
                block = rows[pos:pos + NUM_JOINTS]
                pos += NUM_JOINTS
                tokens = " ".join(s for _, s in block).split()
                values = None
                if len(tokens) == NUM_JOINTS * JOINT_VALUES:
                    try:
                        values = np.array(tokens, dtype=np.float64).reshape(NUM_JOINTS, JOINT_VALUES)
                    except ValueError:
                        values = None
                if values is None or not (np.abs(values[:, :3]) <= MAX_COORDINATE).all():  # NaN fails too
                    for n, s in block:  # find the bad line for the message
                        parts = s.split()
                        try:
                            ok = len(parts) == JOINT_VALUES and all(abs(float(p)) <= MAX_COORDINATE
                                                                    for p in parts[:3])
                        except ValueError:
                            ok = False
                        if not ok:
                            raise _error(name, n, f"expected a joint line of {JOINT_VALUES} numbers (x y z depth "
                                         f"x/y colour x/y orientation w/x/y/z tracking; x, y, z finite metres "
                                         f"within {MAX_COORDINATE:g}), got {s[:80]!r}")
                    raise _error(name, block[0][0], "malformed joint block")  # unreachable in practice
                body_id = fields[0]
                k = seen.get(body_id, 0)
                seen[body_id] = k + 1
                frame_bodies.append((body_id if k == 0 else f"{body_id}#{k}", values[:, :3].astype(np.float32)))
            # A frame counts only when whole: a file cut inside a frame keeps the frames before it.
            for body_id, joints in frame_bodies:
                frames, arrays = per_body.setdefault(body_id, ([], []))
                frames.append(frame)
                arrays.append(joints)
        else:
            frame = num_frames
    except _Truncated:
        last = rows[-1][0]
        if not allow_truncated:
            raise _error(name, last, f"the file ends inside frame {frame + 1} of the {num_frames} its header "
                         "announces (truncated)", "re-download or re-extract it, or keep its whole frames with "
                         "--keep-truncated") from None
        truncated = True
    if not truncated and pos < len(rows):
        raise _error(name, rows[pos][0], f"unexpected data after the {num_frames} frames the header announces",
                     "is the frame count on line 1 right?")
    bodies_out = [Body(b, np.asarray(f, dtype=np.int64), np.stack(a)) for b, (f, a) in per_body.items()]
    return SkeletonFile(name, frame, bodies_out, truncated)


def select_bodies(skeleton: SkeletonFile, max_bodies: int = NUM_BODIES) -> tuple[np.ndarray, np.ndarray]:
    """Places the most active bodies into `max_bodies` slots over time.

    Bodies are taken in decreasing motion (`Body.motion`); each goes into the first slot it does not overlap in
    time, so a person whose tracking id changed mid-sequence stays in one slot, and a third or fourth body seen at
    the same time as two kept ones is dropped. Returns joints float32 (F, max_bodies, 25, 3), zeros where a slot
    is empty, and present bool (F, max_bodies).
    """
    F = skeleton.num_frames
    joints = np.zeros((F, max_bodies, NUM_JOINTS, 3), np.float32)
    present = np.zeros((F, max_bodies), bool)
    order = sorted(range(len(skeleton.bodies)), key=lambda i: (-skeleton.bodies[i].motion, i))  # stable on ties
    for i in order:
        body = skeleton.bodies[i]
        for slot in range(max_bodies):
            if not present[body.frames, slot].any():
                joints[body.frames, slot] = body.joints
                present[body.frames, slot] = True
                break
    return joints, present


def centre_and_flatten(joints: np.ndarray, present: np.ndarray, path: str = "<array>") -> np.ndarray:
    """joints float (F, B, 25, 3), present bool (F, B) -> float32 (T, B * 75), T = frames with a body present.

    Coordinates become relative to the centre joint (NTU joint 2, the middle of the spine) of the first frame with
    a body (its first present slot); empty slots stay exactly zero, so a missing second body is zero. Frames with
    no body are dropped. Raises SkeletonFormatError when no frame has a body.
    """
    keep = present.any(axis=1)  # (F,)
    if not keep.any():
        raise _error(path, None, "no body in any frame",
                     "NTU lists such samples in samples_with_missing_skeletons.txt: pass it as --missing-list")
    joints, present = joints[keep], present[keep]  # (T, B, 25, 3), (T, B)
    first_slot = int(np.argmax(present[0]))
    origin = joints[0, first_slot, CENTRE_JOINT].astype(np.float64)  # (3,)
    centred = np.where(present[:, :, None, None], joints - origin, 0.0)  # (T, B, 25, 3)
    return centred.reshape(len(centred), -1).astype(np.float32)  # (T, B * 75)


def load_skeleton(path: str | os.PathLike, allow_truncated: bool = False) -> np.ndarray:
    """An NTU `.skeleton` file -> float32 (T, 150): the two most active bodies, centred, body-major
    (body 0 joints 1..25 x/y/z, then body 1). The stored form of `eleatt prepare ntu-skeleton`."""
    skeleton = read_skeleton(path, allow_truncated=allow_truncated)
    joints, present = select_bodies(skeleton)
    return centre_and_flatten(joints, present, skeleton.path)


# ----------------------------------------------------------------------------------------------- augmentation
def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """angles (3,) radians about x, y, z -> (3, 3) rotation R = Rz @ Ry @ Rx (acting on column vectors)."""
    import torch

    ax, ay, az = angles.double().unbind()
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    cx, sx, cy, sy, cz, sz = ax.cos(), ax.sin(), ay.cos(), ay.sin(), az.cos(), az.sin()
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx]).reshape(3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy]).reshape(3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one]).reshape(3, 3)
    return rz @ ry @ rx


def rotate_skeleton(feats: torch.Tensor | np.ndarray, angles) -> torch.Tensor | np.ndarray:
    """Rotates every joint about the origin (the body centre after `centre_and_flatten`).

    feats (..., D) with D a multiple of 3 (x, y, z per joint, e.g. (T, 150)), torch or numpy; angles (3,) radians
    about x, y, z. Returns the same type, shape and dtype. Zero joints (a missing body) stay zero.
    """
    import torch

    as_numpy = isinstance(feats, np.ndarray)
    x = torch.from_numpy(feats) if as_numpy else feats
    if x.shape[-1] % 3:
        raise UsageError(f"skeleton features need x, y, z per joint: last dimension {x.shape[-1]} is not a multiple "
                         "of 3 (is this a skeleton feature folder?)")
    r = rotation_matrix(torch.as_tensor(angles, dtype=torch.float64)).to(x.dtype if x.is_floating_point()
                                                                         else torch.float32)
    points = x.reshape(*x.shape[:-1], -1, 3)  # (..., J, 3)
    out = (points @ r.T).reshape(x.shape)  # row vectors: p' = R p
    return out.numpy() if as_numpy else out


def random_rotation(feats: torch.Tensor | np.ndarray, max_degrees: float = 35.0,
                    generator: torch.Generator | None = None) -> torch.Tensor | np.ndarray:
    """`rotate_skeleton` by angles drawn uniformly in [-max_degrees, max_degrees] about x, y and z (torch's
    generator, so seeded runs draw the same rotations)."""
    import torch

    angles = (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_degrees)
    return rotate_skeleton(feats, angles)


class SkeletonRotation:
    """Training-time augmentation: one random rotation per sample within +-`max_degrees` about x, y and z.
    Called on float32 (T, D) training tensors by the feature dataset's transform hook."""

    def __init__(self, max_degrees: float = 35.0) -> None:
        if not (math.isfinite(max_degrees) and 0 <= max_degrees <= 180):
            raise UsageError(f"rotation_degrees={max_degrees}: give an angle in [0, 180] degrees (the paper uses 35)")
        self.max_degrees = float(max_degrees)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return random_rotation(feats, self.max_degrees)

    def __repr__(self) -> str:
        return f"SkeletonRotation(max_degrees={self.max_degrees})"


# ----------------------------------------------------------------------------------------------- writing
def write_skeleton(path: str | os.PathLike, frames: list[list[tuple[str, np.ndarray]]],
                   num_frames: int | None = None) -> Path:
    """Writes an NTU `.skeleton` file (for tests, generated data and exports).

    frames: per frame a list of (body id, joints float (25, 3) x/y/z in metres); an empty list is a frame with no
    body. The other values of the format are written as plausible constants (tracked, no clipping, colour and
    depth coordinates 0). `num_frames` overrides the header's frame count (e.g. to write a truncated file).
    """
    lines = [str(len(frames) if num_frames is None else num_frames)]
    for bodies in frames:
        lines.append(str(len(bodies)))
        for body_id, joints in bodies:
            joints = np.asarray(joints, dtype=np.float64)
            if joints.shape != (NUM_JOINTS, 3):
                raise UsageError(f"joints of body {body_id} must be ({NUM_JOINTS}, 3), got {joints.shape}")
            lines.append(f"{body_id} 0 1 1 1 1 0 0.01 -0.02 2")
            lines.append(str(NUM_JOINTS))
            lines.extend(f"{x:.7g} {y:.7g} {z:.7g} 0 0 0 0 0 0 0 0 2" for x, y, z in joints)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\r\n".join(lines) + "\r\n", encoding="ascii")  # NTU's files use CRLF
    return path


# ----------------------------------------------------------------------------------------------- noise filter
# The dataset authors' denoising (NTU RGB+D 120, Liu et al. 2019, and their released preprocessing): Kinect also
# tracks "bodies" that are not people (furniture, reflections). When a file has several bodies, bodies seen in at
# most NOISE_MAX_FRAMES frames are dropped, then bodies wider than tall: a frame is noisy when the spread of the
# joints in x exceeds NOISE_SPREAD times their spread in y, and a body with at least NOISE_SPREAD_FRACTION of its
# frames noisy is dropped; a kept body's motion counts only its frames that are not noisy. Ranking by motion
# (`select_bodies`) follows, as before.
NOISE_MAX_FRAMES = 11
NOISE_SPREAD = 0.8
NOISE_SPREAD_FRACTION = 0.69754


@dataclass
class NoiseCounts:
    """What the noise filter did to one file or, summed (`+`), to many: bodies dropped by each rule and the files
    they came from; `kept_all` counts files where a rule would have dropped every body and was not applied."""

    by_length: int = 0
    files_by_length: int = 0
    by_spread: int = 0
    files_by_spread: int = 0
    kept_all: int = 0

    def __add__(self, other: "NoiseCounts") -> "NoiseCounts":
        return NoiseCounts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def summary(self) -> str:
        text = (f"noise filter: {self.by_length} bodies seen in at most {NOISE_MAX_FRAMES} frames dropped "
                f"({self.files_by_length} files), {self.by_spread} bodies wider than tall (x spread > {NOISE_SPREAD} "
                f"x y spread in >= {NOISE_SPREAD_FRACTION:.1%} of their frames) dropped ({self.files_by_spread} files)")
        return text + (f"; {self.kept_all} files kept bodies a rule would all have dropped" if self.kept_all else "")


def noisy_frames(joints: np.ndarray) -> np.ndarray:
    """joints (n, 25, 3) -> bool (n,): the frames where the joints spread more in x than NOISE_SPREAD times in y."""
    spread = joints.max(axis=1) - joints.min(axis=1)  # (n, 3)
    return spread[:, 0] > NOISE_SPREAD * spread[:, 1]


def denoise_bodies(skeleton: SkeletonFile) -> tuple[SkeletonFile, NoiseCounts]:
    """The dataset authors' noise filter (see NOISE_*): returns the file with the noisy bodies left out (each kept
    body keeps all its frames; its `clean` frames, the ones not noisy, bound its motion) and what was done.

    Files with one body are returned as they are; a rule that would drop every body is not applied to that file.
    """
    counts = NoiseCounts()
    bodies = list(skeleton.bodies)
    if len(bodies) < 2:
        return skeleton, counts
    long_enough = [b for b in bodies if len(b.frames) > NOISE_MAX_FRAMES]
    if not long_enough:
        counts.kept_all += 1
    elif len(long_enough) < len(bodies):
        counts.by_length, counts.files_by_length = len(bodies) - len(long_enough), 1
        bodies = long_enough
    if len(bodies) > 1:
        noisy = [noisy_frames(b.joints) for b in bodies]
        people = [(b, n) for b, n in zip(bodies, noisy) if n.mean() < NOISE_SPREAD_FRACTION]
        if not people:
            counts.kept_all += 1
            people = list(zip(bodies, noisy))
        elif len(people) < len(bodies):
            counts.by_spread, counts.files_by_spread = len(bodies) - len(people), 1
        bodies = [dataclasses.replace(b, clean=~n) for b, n in people]
    return dataclasses.replace(skeleton, bodies=bodies), counts


def skeleton_features(path: str | os.PathLike, allow_truncated: bool = False,
                      denoise: bool = True) -> tuple[np.ndarray, NoiseCounts]:
    """`load_skeleton` with the dataset authors' noise filter first (`denoise_bodies`): float32 (T, 150) and what
    the filter did. `denoise=False` gives `load_skeleton`'s array. The stored form of `eleatt prepare
    ntu-skeleton` (the filter is on unless --no-denoise)."""
    skeleton = read_skeleton(path, allow_truncated=allow_truncated)
    counts = NoiseCounts()
    if denoise:
        skeleton, counts = denoise_bodies(skeleton)
    joints, present = select_bodies(skeleton)
    return centre_and_flatten(joints, present, skeleton.path), counts


# ----------------------------------------------------------------------------------------------- streams
# The streams of the multi-stream ensembles (2s-AGCN, CTR-GCN, pyskl), each derived from the joint sequence:
#   joint         the stored coordinates;
#   bone          per joint v, joint v minus its parent in NTU_BONES (the centre joint 21 has no parent: zero),
#                 or in COCO_BONES for 17 COCO keypoints (the nose is the root);
#   joint_motion  x[t+1] - x[t] over the stored frames, the last step zero (T steps, aligned with the joints);
#   bone_motion   the same of the bones.
# A body absent at t or t+1 (its values all zero) has zero motion at t, not the jump from or to the origin.
STREAMS = ("joint", "bone", "joint_motion", "bone_motion")


def _bodies(feats: np.ndarray, joints: int, channels: int) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[1] % (joints * channels):
        raise UsageError(f"skeleton features of shape {tuple(feats.shape)} are not (T, bodies x {joints} joints x "
                         f"{channels} values)")
    return feats.astype(np.float64).reshape(len(feats), -1, joints, channels)  # (T, B, V, C)


def bones(feats: np.ndarray, channels: int = 3, score: bool = False, joints: int = NUM_JOINTS) -> np.ndarray:
    """Joint sequence float (T, B x V x C), body-major -> the bone sequence of the same shape, float32.

    Bone of joint v = joint v - its parent on the coordinates: NTU_BONES for the 25 Kinect joints (the centre joint
    21 is zero), COCO_BONES for 17 COCO keypoints (the nose is zero). With `score` (2D keypoints with a confidence as
    last channel, pyskl's convention), a bone's score is the mean of its two joints' scores.
    """
    pairs = BONES_BY_JOINTS.get(joints)
    if pairs is None:
        raise UsageError(f"bone streams know the NTU 25-joint and COCO 17-keypoint layouts (their bone pairs); these "
                         f"skeletons have {joints} joints: use the joint and joint_motion streams")
    x = _bodies(feats, joints, channels)
    out = np.zeros_like(x)
    child, parent = (list(v) for v in zip(*pairs))
    coords = channels - 1 if score else channels
    out[:, :, child, :coords] = x[:, :, child, :coords] - x[:, :, parent, :coords]
    if score:
        out[:, :, child, coords] = (x[:, :, child, coords] + x[:, :, parent, coords]) / 2
    return out.reshape(np.shape(feats)).astype(np.float32)


def motion(feats: np.ndarray, joints: int = NUM_JOINTS, channels: int = 3, score: bool = False) -> np.ndarray:
    """Sequence float (T, B x V x C), body-major -> its motion, float32 of the same shape: step t is x[t+1] - x[t],
    the last step zero; zero where the body is absent (all zero) at t or t+1. With `score`, the last channel of a
    step is the mean of the two frames' scores."""
    x = _bodies(feats, joints, channels)
    out = np.zeros_like(x)
    present = x.any(axis=(2, 3))  # (T, B)
    both = (present[:-1] & present[1:])[:, :, None, None]  # (T-1, B, 1, 1)
    coords = channels - 1 if score else channels
    out[:-1, ..., :coords] = np.where(both, x[1:, ..., :coords] - x[:-1, ..., :coords], 0.0)
    if score:
        out[:-1, ..., coords] = np.where(both[..., 0], (x[1:, ..., coords] + x[:-1, ..., coords]) / 2, 0.0)
    return out.reshape(np.shape(feats)).astype(np.float32)


def derive_stream(feats: np.ndarray, stream: str, joints: int = NUM_JOINTS, channels: int = 3,
                  score: bool = False) -> np.ndarray:
    """The `stream` (one of STREAMS) of a joint sequence float (T, B x V x C), float32 of the same shape."""
    if stream not in STREAMS:
        raise UsageError(f"skeleton stream {stream!r}: choose one of {', '.join(STREAMS)}")
    if stream.startswith("bone") and joints not in BONES_BY_JOINTS:
        raise UsageError(f"the {stream} stream needs the NTU 25-joint or the COCO 17-keypoint layout (their bone "
                         f"pairs); these skeletons have {joints} joints: use the joint and joint_motion streams")
    if stream == "joint":
        return np.asarray(feats, dtype=np.float32)
    base = bones(feats, channels, score, joints) if stream.startswith("bone") else feats
    return motion(base, joints, channels, score) if stream.endswith("motion") else base
