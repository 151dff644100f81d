"""FrameEncoder: shapes and data config across timm families, weights files, in_chans, offline behaviour."""
from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.nn.backbone import FrameEncoder, MissingWeightsError, resolve_weights


def _input(enc: FrameEncoder, n: int = 4) -> torch.Tensor:
    _, h, w = enc.data_config["input_size"]
    return torch.randn(n, enc.in_chans, h, w)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit", "test_convnext"])
def test_shapes_dtype_and_data_config(name):
    enc = FrameEncoder(name, weights="none")
    assert not enc.training and enc.weights == "none"
    cfg = enc.data_config
    assert set(cfg) >= {"input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode"}
    assert isinstance(cfg["input_size"], tuple) and cfg["input_size"][0] == 3 and len(cfg["mean"]) == 3
    x = _input(enc, 5)
    feats = enc.encode(x)
    assert feats.shape == (5, enc.num_features) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.std() > 0
    assert not feats.requires_grad
    # Batching must not change the result (eval mode: no batch statistics).
    torch.testing.assert_close(enc.encode(x, batch_size=2), feats, atol=1e-5, rtol=1e-4)


def test_forward_keeps_autograd_for_end_to_end_use():
    enc = FrameEncoder("test_resnet", weights="none")
    out = enc(_input(enc, 2))
    out.sum().backward()
    assert enc.model.conv1[0].weight.grad is not None


def test_in_chans_for_flow_stacks():
    enc = FrameEncoder("test_resnet", weights="none", in_chans=10)
    assert enc.data_config["input_size"][0] == 10
    assert enc.encode(_input(enc, 3)).shape == (3, enc.num_features)
    with pytest.raises(ValueError, match=r"expects \(N, 10, H, W\)"):
        enc(torch.randn(1, 3, 32, 32))


@pytest.fixture
def full_resnet():
    """A test_resnet *with* its 1000-class head, as timm's pretrained files have."""
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=1000).eval()
    for m in model.modules():  # non-trivial BN statistics, so that a missed buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_local_weights_round_trip(tmp_path, full_resnet, suffix):
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in full_resnet.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    enc = FrameEncoder("test_resnet", weights=path)
    assert enc.weights == str(path.resolve())
    x = _input(enc)
    with torch.inference_mode():
        want = full_resnet.forward_head(full_resnet.forward_features(x), pre_logits=True)
    torch.testing.assert_close(enc.encode(x), want, atol=1e-5, rtol=1e-5)


def test_frame_encoder_state_dict_and_checkpoint_dict_load(tmp_path):
    src = FrameEncoder("test_efficientnet", weights="none")
    torch.save(src.state_dict(), tmp_path / "enc.pth")  # keys under "model."
    torch.save({"state_dict": src.model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    x = _input(src)
    for name in ("enc.pth", "ckpt.pth"):
        torch.testing.assert_close(FrameEncoder("test_efficientnet", tmp_path / name).encode(x), src.encode(x))


def test_local_weights_adapt_first_conv_the_tsn_way(tmp_path, full_resnet):
    """RGB weights for a flow stream (in_chans 2L): the first conv's filters averaged over RGB, repeated (TSN)."""
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in full_resnet.state_dict().items()}, str(path))
    enc = FrameEncoder("test_resnet", weights=path, in_chans=6)
    w3 = full_resnet.conv1[0].weight.detach()  # (O, 3, k, k)
    w6 = enc.model.conv1[0].weight.detach()
    assert w6.shape == (w3.shape[0], 6, *w3.shape[2:])
    for c in range(6):
        torch.testing.assert_close(w6[:, c], w3.mean(1))
    # the rest of the network is the file's
    torch.testing.assert_close(enc.model.conv1[1].weight.detach(), full_resnet.conv1[1].weight.detach())
    assert enc.encode(_input(enc, 2)).shape == (2, enc.num_features)
    # the path `weights="imagenet"` takes for in_chans != 3 (no download here: on the same random RGB model)
    from pipeline.nn.backbone import _adapt_in_chans

    rgb = timm.create_model("test_resnet", num_classes=0)
    flow = _adapt_in_chans(rgb, "test_resnet", 10)
    assert flow.conv1[0].weight.shape[1] == 10
    torch.testing.assert_close(flow.conv1[0].weight[:, 7], rgb.conv1[0].weight.mean(1))


def test_weights_errors_name_the_file(tmp_path, full_resnet):
    wrong = tmp_path / "vit.safetensors"
    save_file(dict(timm.create_model("test_vit").state_dict()), str(wrong))
    with pytest.raises(ValueError, match=r"vit\.safetensors.*does not match backbone 'test_resnet'"):
        FrameEncoder("test_resnet", weights=wrong)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read weights file .*broken\.pth"):
        FrameEncoder("test_resnet", weights=broken)
    with pytest.raises(FileNotFoundError, match=r"nothere\.pth.*--weights none"):
        FrameEncoder("test_resnet", weights=tmp_path / "nothere.pth")
    odd = tmp_path / "w.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"w\.txt.*suffix"):
        resolve_weights(odd)
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet5x'"):
        FrameEncoder("resnet5x", weights="none")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf"


def test_imagenet_offline_without_cache_fails_at_once(empty_caches):
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match=r"--weights PATH.*--weights none") as info:
        FrameEncoder("test_resnet", weights="imagenet")
    assert time.perf_counter() - start < 5.0
    assert isinstance(info.value, FileNotFoundError) and "test_resnet" in str(info.value)


def test_imagenet_loads_from_the_hub_cache_without_network(empty_caches, full_resnet):
    # The layout huggingface_hub writes: refs/main -> snapshot folder holding the file.
    repo = empty_caches / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in full_resnet.state_dict().items()}, str(snapshot / "model.safetensors"))
    enc = FrameEncoder("test_resnet", weights="imagenet")
    assert enc.weights == "imagenet"
    x = _input(enc)
    with torch.inference_mode():
        want = full_resnet.forward_head(full_resnet.forward_features(x), pre_logits=True)
    torch.testing.assert_close(enc.encode(x), want, atol=1e-5, rtol=1e-5)


def test_random_weights_are_the_same_in_every_process():
    torch.manual_seed(123)  # the caller's RNG state must neither matter nor change
    state = torch.random.get_rng_state()
    a = FrameEncoder("test_resnet", weights="none")
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(7)
    b = FrameEncoder("test_resnet", weights="none")
    x = _input(a, 2)
    torch.testing.assert_close(a.encode(x), b.encode(x), atol=0, rtol=0)
