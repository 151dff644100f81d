"""The checks that need a GPU (`pytest -m gpu`; `make gpu-check` runs them first, then the GPU benchmarks).

Without CUDA they skip. `ELEATT_GPU_TESTS_DEVICE=cpu` runs the same checks on the CPU (the dry mode of
`make gpu-check` does, so that they cannot rot on machines without a GPU); there the "device" half runs on the CPU
too, with bfloat16 autocast in place of float16.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.nn.eleatt import EleAttGRU, EleAttLSTM, EleAttRNN
from tests.nn.test_kernel import forward_backward

DEVICE = os.environ.get("ELEATT_GPU_TESTS_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA device (ELEATT_GPU_TESTS_DEVICE=cpu runs these checks on the CPU)")]
F64 = torch.float64
STACKS = [pytest.param(EleAttLSTM, {}, id="lstm"), pytest.param(EleAttGRU, {}, id="gru"),
          pytest.param(EleAttRNN, {}, id="rnn-tanh")]


def _run(module, x, h0, lengths):
    """Values and gradients (of x, h0 and every parameter) of one forward + backward touching outputs, finals and
    gates (the kernel tests' loss)."""
    return forward_backward(module, x, lengths, h0, batch_first=True)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("ours, kw", STACKS)
def test_recurrent_kernel_on_the_device_equals_the_reference(ours, kw, packed):
    """The fast kernel on the device (torch.mm products, index tensors on the device) equals the step-by-step
    reference definition: in float64 to 1e-10, and in float32 against the float64 reference to float32 rounding."""
    d, h, t, b = 12, 10, 9, 5
    lengths = torch.tensor([9, 4, 7, 1, 9]) if packed else None
    torch.manual_seed(0)
    fast = ours(d, h, num_layers=2, batch_first=True, **kw).to(DEVICE)
    reference = copy.deepcopy(fast).double()
    reference.impl = "reference"
    x = torch.randn(b, t, d, dtype=F64, device=DEVICE, requires_grad=True)
    h0 = torch.randn(2, b, h, dtype=F64, device=DEVICE, requires_grad=True)
    h0 = (h0, torch.randn(2, b, h, dtype=F64, device=DEVICE, requires_grad=True)) if ours is EleAttLSTM else h0
    expected = _run(reference, x, h0, lengths)
    fast64 = copy.deepcopy(fast).double()
    assert fast64.impl == "fast"
    got64 = _run(fast64, x, h0, lengths)
    for a, e in zip([*got64[0], *got64[1]], [*expected[0], *expected[1]]):
        assert a.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
    x32 = x.detach().float().requires_grad_()
    h32 = tuple(s.detach().float().requires_grad_() for s in h0) if isinstance(h0, tuple) else \
        h0.detach().float().requires_grad_()
    got32 = _run(fast, x32, h32, lengths)
    for a, e in zip([*got32[0], *got32[1]], [*expected[0], *expected[1]]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


def test_recurrent_kernel_under_autocast_computes_in_the_weights_dtype():
    """Under autocast (mixed-precision training) the gated layers run in the weights' float32: the same values as
    without autocast, and float32 gradients."""
    torch.manual_seed(0)
    lstm = EleAttLSTM(16, 8, num_layers=2).to(DEVICE)
    x = torch.randn(6, 3, 16, device=DEVICE)
    plain, _ = lstm(x)
    dtype = torch.float16 if torch.device(DEVICE).type == "cuda" else torch.bfloat16
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        mixed, _ = lstm(x)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-6)
    mixed.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in lstm.parameters())


def test_extraction_with_autocast_on_the_device_equals_float32_on_the_cpu(synthetic_dataset, tmp_path):
    """`eleatt extract --device cuda --precision 16` (the autocast path) stores the features float32 on the CPU
    gives, within half-precision rounding: relative error under 2% per video, and the same settings but precision."""
    import timm
    from safetensors.torch import save_file

    from pipeline.data.features import FeatureFolder
    from preprocessing.extract import main

    torch.manual_seed(3)
    weights = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(weights))
    videos = [line.rsplit(maxsplit=1)[0] for line in (synthetic_dataset / "train.txt").read_text().splitlines()][:2]
    (tmp_path / "list.txt").write_text("".join(f"{v} 0\n" for v in videos))
    precision = "16" if torch.device(DEVICE).type == "cuda" else "bf16"
    runs = {"cpu": ("cpu", "32"), "device": (DEVICE, precision)}
    for name, (device, prec) in runs.items():
        code = main(["--list", str(tmp_path / "list.txt"), "--root", str(synthetic_dataset), "--out",
                     str(tmp_path / name), "--backbone", "test_resnet", "--weights", str(weights), "--device", device,
                     "--precision", prec, "--workers", "0", "--num-segments", "4", "--no-progress"])
        assert code == 0
    cpu, dev = FeatureFolder(tmp_path / "cpu"), FeatureFolder(tmp_path / "device")
    assert (cpu.settings.precision, dev.settings.precision) == ("32", precision)
    for video in videos:
        a, b = np.asarray(cpu.load(video), np.float64), np.asarray(dev.load(video), np.float64)
        assert a.shape == b.shape and a.shape[0] == 4
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2
        assert not np.array_equal(a, b)  # the autocast path ran (float32 would match to the float16 storage)


def test_fit_a_few_steps_on_the_device(order_features, tmp_path):
    """`eleatt fit` (the tiny recipe) trains 6 optimiser steps on the device and writes its checkpoint."""
    from pipeline.training.cli import main

    lists = order_features["lists"]
    accelerator = "gpu" if torch.device(DEVICE).type == "cuda" else "cpu"
    code = main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "tiny.yaml"),
                 "--data.features_dir", str(order_features["features"]), "--data.train_list", str(lists / "train.txt"),
                 "--data.val_list", str(lists / "val.txt"), "--trainer.accelerator", accelerator,
                 "--trainer.devices", "1", "--trainer.max_steps", "6", "--trainer.max_epochs", "-1",
                 "--trainer.default_root_dir", str(tmp_path), "--run_name", "gpu"])
    assert code == 0
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert state["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_raft_flow_on_the_device_equals_the_cpu(tmp_path):
    """RAFT (random raft_small weights) on the device gives the CPU's flow up to float32 rounding of 12 updates."""
    from torchvision.models.optical_flow import raft_small

    from pipeline.data.flow_estimation import RaftFlow

    torch.manual_seed(0)
    weights = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), weights)
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    frames = np.stack([texture[t:t + 128, 2 * t:2 * t + 136] for t in range(3)])  # (3, 128, 136, 3)
    flows = {}
    for device in ("cpu", DEVICE):
        estimator = RaftFlow(weights, "fast", device=device)
        flows[device] = np.stack(list(estimator.flows(estimator.prepare(frames, (128, 136)))))  # (2, H, W, 2)
    a, b = flows["cpu"], flows[DEVICE]
    assert a.shape == (2, 128, 136, 2) and np.isfinite(b).all()
    assert np.abs(a - b).max() <= 1e-2 * max(1.0, np.abs(a).max())
