"""Clip transforms: shapes and values on known inputs, crop positions, flow flips, one crop per clip, and parity
of normalisation / eval_views with timm's own eval transform on a real frame."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.data import transforms as T

IMAGENET = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "crop_pct": 0.875, "interpolation": "bilinear", "crop_mode": "center"}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def ramp(t: int = 2, c: int = 3, h: int = 10, w: int = 12) -> torch.Tensor:
    """float (T, C, H, W), every value unique: row * w + col + 500 * c + 1000 * t."""
    pix = torch.arange(h * w, dtype=torch.float32).reshape(h, w)
    return pix + 1000 * torch.arange(t).reshape(t, 1, 1, 1) + 500 * torch.arange(c).reshape(1, c, 1, 1)


def real_clip(shared_data, n: int = 3) -> torch.Tensor:
    from PIL import Image

    paths = [shared_data / "rawframes" / f"img_{i:05d}.jpg" for i in range(1, n + 1)]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(frames))  # uint8 (T, H, W, 3)


# ---------------------------------------------------------------------------------------------------- layout, crops

def test_to_tchw_is_a_view_with_the_right_values():
    frames = torch.randint(0, 256, (4, 6, 8, 3), dtype=torch.uint8)
    x = T.to_tchw(frames)
    assert x.shape == (4, 3, 6, 8) and x.data_ptr() == frames.data_ptr()
    assert torch.equal(x[2, 1], frames[2, :, :, 1])
    assert torch.equal(T.to_tchw(frames.numpy()), x)
    with pytest.raises(ValueError, match=r"\(T, H, W, C\)"):
        T.to_tchw(frames[0])


def test_center_crop_known_image_and_torchvision_offsets():
    x = ramp(h=10, w=12)
    out = T.center_crop(x, (4, 6))
    assert out.shape == (2, 3, 4, 6)
    assert torch.equal(out, x[..., 3:7, 3:9])
    for size in [(3, 5), (10, 12), (7, 7), 5, (12, 14), (9, 16)]:  # odd margins round like torchvision; padding too
        assert torch.equal(T.center_crop(x, size), TF.center_crop(x, list(T._pair(size))))
    padded = T.center_crop(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), 4, fill=(10, 20, 30))
    assert padded[0, :, 0, 0].tolist() == [10, 20, 30] and padded[0, :, 1:3, 1:3].sum() == 0


def test_three_crop_positions():
    x = ramp(h=8, w=20)  # landscape: along the width
    views = T.three_crop(x, 8)
    assert views.shape == (3, 2, 3, 8, 8)
    for v, left in zip(views, (0, 6, 12)):
        assert torch.equal(v, x[..., :, left:left + 8])
    assert torch.equal(views[1], T.center_crop(x, 8))
    y = ramp(h=20, w=8)  # portrait: along the height
    views = T.three_crop(y, (6, 6))
    for v, top in zip(views, (0, 7, 14)):
        assert torch.equal(v, y[..., top:top + 6, 1:7])
    with pytest.raises(ValueError, match="resize"):
        T.three_crop(x, 9)


def test_ten_crop_positions_and_flips():
    x = ramp(h=10, w=12)
    views = T.ten_crop(x, (4, 6))
    assert views.shape == (10, 2, 3, 4, 6)
    expected = [x[..., :4, :6], x[..., :4, 6:], x[..., 6:, :6], x[..., 6:, 6:], x[..., 3:7, 3:9]]
    for k, e in enumerate(expected):
        assert torch.equal(views[k], e), k
        assert torch.equal(views[k + 5], e.flip(-1)), k
    flow = T.ten_crop(x[:, :2], (4, 6), flow=True)
    assert torch.equal(flow[5][:, 0], -x[:, 0, :4, :6].flip(-1))  # flipped x negated
    assert torch.equal(flow[5][:, 1], x[:, 1, :4, :6].flip(-1))  # flipped y kept


def test_hflip_rgb_and_flow_stacks():
    x = ramp(c=3)
    assert torch.equal(T.hflip(x), x.flip(-1))
    # a flow stack x1, y1, x2, y2: every pixel moves right by +2 (x) and down by +1 (y), plus a spatial pattern
    base = torch.arange(12.0).reshape(1, 1, 1, 12)
    stack = torch.cat([2 + base, 1 + base, 2 + base, 1 + base], dim=1).expand(3, 4, 5, 12)
    out = T.hflip(stack, flow=True)
    assert torch.equal(out[:, 0::2], -(2 + base.flip(-1)).expand(3, 2, 5, 12))  # x negated and mirrored
    assert torch.equal(out[:, 1::2], (1 + base.flip(-1)).expand(3, 2, 5, 12))  # y mirrored only
    assert torch.equal(stack[:, 0], (2 + base[0, 0]).expand(3, 5, 12))  # input untouched
    q = torch.tensor([[[[0, 100, 255]], [[7, 8, 9]]]], dtype=torch.uint8)  # (1, 2, 1, 3) quantised flow
    assert T.hflip(q, flow=True).tolist() == [[[[0, 155, 255]], [[9, 8, 7]]]]
    with pytest.raises(ValueError, match="even channel"):
        T.hflip(ramp(c=3), flow=True)


def test_resize_short_rule_and_dtype():
    x = torch.randint(0, 256, (2, 3, 240, 320), dtype=torch.uint8)
    out = T.resize_short(x, 100)
    assert out.shape == (2, 3, 100, 133) and out.dtype == torch.uint8  # int(100 * 320 / 240) = 133
    assert T.resize_short(x.transpose(-1, -2), 100).shape == (2, 3, 133, 100)
    const = torch.full((1, 3, 240, 320), 77, dtype=torch.uint8)
    assert torch.all(T.resize_short(const, 57, "bicubic") == 77)
    with pytest.raises(ValueError, match="interpolation 'box'"):
        T.resize_short(x, 100, "box")


# ---------------------------------------------------------------------------------------------------- random crops

def test_random_resized_crop_same_box_for_every_frame():
    img = torch.rand(1, 3, 60, 80)
    clip = img + torch.arange(4.0).reshape(4, 1, 1, 1)  # frame t = frame 0 + t
    out = T.random_resized_crop(clip, (24, 32), rng=rng(5))
    assert out.shape == (4, 3, 24, 32)
    for t in range(4):  # a linear resize of (img + t) is resize(img) + t: same box in every frame
        torch.testing.assert_close(out[t] - out[0], torch.full_like(out[0], float(t)), atol=1e-4, rtol=0)
    assert torch.equal(out, T.random_resized_crop(clip, (24, 32), rng=rng(5)))
    assert not torch.equal(out, T.random_resized_crop(clip, (24, 32), rng=rng(6)))
    with pytest.raises(ValueError, match="rng"):
        T.random_resized_crop(clip, 24)


def test_random_resized_crop_params_respect_scale_and_ratio():
    g = rng(0)
    for _ in range(200):
        top, left, h, w = T.random_resized_crop_params(240, 320, (0.2, 0.6), (0.75, 1.333), g)
        assert 0 <= top <= 240 - h and 0 <= left <= 320 - w
        assert 0.18 <= h * w / (240 * 320) <= 0.62 and 0.7 <= w / h <= 1.4
    # impossible constraints fall back to the largest centred box within the ratio range
    assert T.random_resized_crop_params(10, 100, (0.99, 1.0), (1.0, 1.0), g) == (0, 45, 10, 10)


def test_multi_scale_crop_params_tsn_grid():
    sides = [256, 224, 192, 168]  # int(256 * s) for TSN's scales; 224 (from 256 * 0.875) is the output size
    positions = set()
    g = rng(1)
    for _ in range(400):
        top, left, h, w = T.multi_scale_crop_params(256, 340, 224, g)
        assert h in sides and w in sides
        assert abs(sides.index(h) - sides.index(w)) <= 1  # max_distort
        hs, ws = (256 - h) // 4, (340 - w) // 4  # fixed positions lie on a quarter grid
        assert top % max(hs, 1) == 0 and left % max(ws, 1) == 0 and top <= 4 * hs and left <= 4 * ws
        if (h, w) == (224, 224):
            positions.add((top // hs, left // ws))
    assert len(positions) == 13  # corners, centre, edge centres, quarter points (more_fix_crop)
    clip = torch.rand(1, 2, 64, 80) + torch.arange(3.0).reshape(3, 1, 1, 1)
    out = T.multi_scale_crop(clip, (16, 16), rng=rng(2))
    assert out.shape == (3, 2, 16, 16)
    torch.testing.assert_close(out[2] - out[0], torch.full_like(out[0], 2.0), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------- values

def test_normalize_matches_timm_and_uint8_path():
    from torchvision.transforms import Normalize  # what timm's eval transform normalises with

    x8 = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    xf = x8.float() / 255
    ref = torch.stack([Normalize(IMAGENET["mean"], IMAGENET["std"])(f) for f in xf])
    torch.testing.assert_close(T.normalize(xf, IMAGENET["mean"], IMAGENET["std"]), ref)
    torch.testing.assert_close(T.normalize(x8, IMAGENET["mean"], IMAGENET["std"]), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(T.Normalize(IMAGENET["mean"], IMAGENET["std"])(xf), ref)
    flow = torch.rand(2, 4, 3, 3)
    torch.testing.assert_close(T.normalize(flow, (0.5,), (0.25,)), (flow - 0.5) / 0.25)
    with pytest.raises(ValueError, match="3 values for 4 channels"):
        T.normalize(flow, IMAGENET["mean"], IMAGENET["std"])


@pytest.fixture(scope="module")
def timm_configs():
    import timm
    from timm.data import resolve_data_config

    cfgs = {name: resolve_data_config(model=timm.create_model(name, pretrained=False))
            for name in ("test_resnet", "test_efficientnet")}
    assert cfgs["test_resnet"]["interpolation"] == "bilinear"
    assert cfgs["test_efficientnet"]["interpolation"] == "bicubic"
    return cfgs


# torch's antialiased uint8 kernels follow PIL's: they differ by at most one uint8 step on a few pixels (rounding;
# often none for bilinear). Tolerance: that step after normalisation, and < 1% of values off.
@pytest.mark.parametrize("model,override", [
    ("test_resnet", {}),
    ("test_efficientnet", {}),
    ("test_efficientnet", {"input_size": (3, 96, 128)}),
    ("test_efficientnet", {"crop_mode": "squash"}),
    ("test_efficientnet", {"crop_mode": "border", "input_size": (3, 120, 100)}),
    ("test_resnet", {"crop_pct": 1.0, "input_size": (3, 224, 224)}),
])
def test_eval_views_center_matches_timm_eval_transform(shared_data, timm_configs, model, override):
    from PIL import Image
    from timm.data import create_transform

    cfg = {**timm_configs[model], **override}
    tf = create_transform(**cfg, is_training=False)
    clip = real_clip(shared_data, 3)
    ref = torch.stack([tf(Image.fromarray(f.numpy())) for f in clip])  # (T, 3, H, W)
    out = T.eval_views(clip, cfg, "center")
    assert out.shape == (1, *ref.shape) and out.dtype == torch.float32 and out.is_contiguous()
    diff = (out[0] - ref).abs()
    step = 1 / (255 * min(cfg["std"]))
    assert diff.max() <= 1.001 * step, diff.max()
    assert (diff > 1e-4).float().mean() < 0.01


def test_eval_views_three_and_ten_share_the_centre_view(shared_data, timm_configs):
    cfg = timm_configs["test_efficientnet"]
    clip = real_clip(shared_data, 2)
    center = T.eval_views(clip, cfg, "center")
    three = T.eval_views(clip, cfg, "three")
    ten = T.eval_views(clip, cfg, "ten")
    H, W = cfg["input_size"][1:]
    assert three.shape == (3, 2, 3, H, W) and ten.shape == (10, 2, 3, H, W)
    assert torch.equal(three[1], center[0]) and torch.equal(ten[4], center[0])
    assert torch.equal(ten[9], ten[4].flip(-1))
    assert not torch.equal(three[0], three[2])
    # one call on the clip equals frame-by-frame calls
    assert torch.equal(T.eval_views(clip[1:2], cfg, "ten")[:, 0], ten[:, 1])
    assert torch.equal(T.EvalViews(cfg, "three")(clip), three)


def test_eval_views_errors():
    frames = torch.zeros(2, 40, 50, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="views"):
        T.eval_views(frames, IMAGENET, "five")
    with pytest.raises(ValueError, match="lacks"):
        T.eval_views(frames, {"input_size": (3, 32, 32)})
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        T.eval_views(frames.permute(0, 3, 1, 2), IMAGENET)
    with pytest.raises(ValueError, match="crop_pct <= 1"):
        T.eval_views(frames, {**IMAGENET, "crop_pct": 1.2}, "ten")
    with pytest.raises(ValueError, match="interpolation 'hamming'"):
        T.eval_views(frames, {**IMAGENET, "interpolation": "hamming"})


def test_train_clip_transform_one_crop_per_clip():
    frame = torch.randint(0, 256, (1, 48, 64, 3), dtype=torch.uint8)
    clip = frame.expand(5, -1, -1, -1)
    for augment in ("multi_scale", "random_resized"):
        outs = [T.train_clip_transform(clip, IMAGENET, rng(s), augment=augment) for s in range(6)]
        for out in outs:
            assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
            assert torch.equal(out, out[:1].expand_as(out))  # identical frames stay identical: one crop, one flip
        assert len({o.sum().item() for o in outs}) > 1  # random across calls
        torch.testing.assert_close(outs[0], T.train_clip_transform(clip, IMAGENET, rng(0), augment=augment))
    # the module wrapper draws from torch's seeded RNG without an explicit rng
    module = T.TrainClipTransform(IMAGENET)
    torch.manual_seed(3)
    a = module(clip)
    torch.manual_seed(3)
    assert torch.equal(a, module(clip))
    with pytest.raises(ValueError, match="augment"):
        T.train_clip_transform(clip, IMAGENET, rng(0), augment="jitter")


def test_train_clip_transform_flips_half_the_time():
    frame = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    frame[:, :, :16] = 255  # left half white; with crop covering the frame, a flip moves it right
    cfg = {**IMAGENET, "crop_pct": 1.0}
    flips = 0
    for s in range(40):
        out = T.train_clip_transform(frame, cfg, rng(s), augment="multi_scale", scales=(1.0,))
        left, right = out[0, :, :, :8].mean(), out[0, :, :, -8:].mean()
        flips += int(right > left)
    assert 8 <= flips <= 32
    none = [T.train_clip_transform(frame, cfg, rng(s), scales=(1.0,), flip=False) for s in range(10)]
    assert all(o[0, :, :, :8].mean() > o[0, :, :, -8:].mean() for o in none)


def test_random_hflip_module_flow():
    stack = torch.randn(2, 4, 5, 6)
    flip = T.RandomHFlip(p=1.0, flow=True)
    assert torch.equal(flip(stack, rng(0)), T.hflip(stack, flow=True))
    assert torch.equal(T.RandomHFlip(p=0.0)(stack), stack)


# ------------------------------------------------------------------------------------------- flow flips, by value

def test_hflip_flow_stack_literal_values():
    # one stack of L = 2 fields on a 1 x 3 image: channels x1, y1, x2, y2 (x: the even channels)
    stack = torch.tensor([[[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0]], [[10.0, 11.0, 12.0]]]])
    expected = [[[[-3.0, -2.0, -1.0]], [[6.0, 5.0, 4.0]], [[-9.0, -8.0, -7.0]], [[12.0, 11.0, 10.0]]]]
    assert T.hflip(stack, flow=True).tolist() == expected  # mirrored; x negated, y kept
    assert T.hflip(stack).tolist() == [[[[3.0, 2.0, 1.0]], [[6.0, 5.0, 4.0]], [[9.0, 8.0, 7.0]], [[12.0, 11.0, 10.0]]]]
    assert T.RandomHFlip(p=1.0, flow=True)(stack, rng(0)).tolist() == expected
    assert T.RandomHFlip(p=0.0, flow=True)(stack, rng(0)).tolist() == stack.tolist()
    assert stack[0, 0, 0].tolist() == [1.0, 2.0, 3.0]  # the input is left alone


FLOW_EVAL = {"input_size": (2, 3, 3), "mean": (0.0,), "std": (1.0,), "crop_pct": 0.6, "interpolation": "bilinear",
             "crop_mode": "center"}  # resize to floor(3 / 0.6) = 5: a 5 x 5 frame is left as it is


def test_eval_views_ten_flow_mirror_crops_and_negate_x():
    # one flow field (x, y) on a 5 x 5 frame: x = 1 + col + 5 * row (moving right), y = x + 100
    x = torch.arange(1.0, 26.0).reshape(5, 5)
    frames = torch.stack([x, x + 100], -1)[None]  # (T=1, H, W, 2) float
    views = T.eval_views(frames, FLOW_EVAL, "ten", flow=True)  # (10, 1, 2, 3, 3)
    assert views.shape == (10, 1, 2, 3, 3)
    assert views[0, 0].tolist() == [[[1, 2, 3], [6, 7, 8], [11, 12, 13]],
                                    [[101, 102, 103], [106, 107, 108], [111, 112, 113]]]  # top-left, as is
    assert views[5, 0].tolist() == [[[-3, -2, -1], [-8, -7, -6], [-13, -12, -11]],
                                    [[103, 102, 101], [108, 107, 106], [113, 112, 111]]]  # its mirror
    assert views[1, 0, 0].tolist() == [[3, 4, 5], [8, 9, 10], [13, 14, 15]]  # top-right
    assert views[6, 0, 0].tolist() == [[-5, -4, -3], [-10, -9, -8], [-15, -14, -13]]
    assert views[4, 0, 0].tolist() == [[7, 8, 9], [12, 13, 14], [17, 18, 19]]  # centre
    assert views[9, 0].tolist() == [[[-9, -8, -7], [-14, -13, -12], [-19, -18, -17]],
                                    [[109, 108, 107], [114, 113, 112], [119, 118, 117]]]
    # RGB-style ten views (flow=False) only mirror
    assert T.eval_views(frames, FLOW_EVAL, "ten")[9, 0, 0].tolist() == [[9, 8, 7], [14, 13, 12], [19, 18, 17]]
    # three views and the centre view never mirror
    assert T.eval_views(frames, FLOW_EVAL, "three", flow=True)[1, 0, 0].tolist() == [[7, 8, 9], [12, 13, 14],
                                                                                     [17, 18, 19]]


def test_eval_views_ten_flow_on_uint8_levels():
    # quantised levels with mean 0.5, std 0.5 (flow_data_config): q -> 2 q / 255 - 1; x = 51 * col, y = 204
    q = torch.zeros(1, 5, 5, 2, dtype=torch.uint8)
    q[..., 0] = torch.tensor([0, 51, 102, 153, 204], dtype=torch.uint8)
    q[..., 1] = 204
    views = T.eval_views(q, {**FLOW_EVAL, "mean": (0.5,), "std": (0.5,)}, "ten", flow=True)
    np.testing.assert_allclose(views[0, 0, 0], [[-1.0, -0.6, -0.2]] * 3, atol=1e-6)  # top-left x
    np.testing.assert_allclose(views[5, 0, 0], [[0.2, 0.6, 1.0]] * 3, atol=1e-6)  # mirrored: 255 - q = -x
    np.testing.assert_allclose(views[5, 0, 1], [[0.6, 0.6, 0.6]] * 3, atol=1e-6)  # y kept
    # centre: columns 1-3 are -0.6, -0.2, 0.2; mirrored and negated
    np.testing.assert_allclose(views[9, 0, 0], [[-0.2, 0.2, 0.6]] * 3, atol=1e-6)
