"""The one --device parser (extract and classify)."""
import pytest
import torch

from pipeline.devices import resolve_device


def test_device_text():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("bogus", "tpu", "cpu:x"):
        with pytest.raises(ValueError, match=f"--device '{bad}'"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_names_the_fix():
    for text in ("cuda", "cuda:1", "gpu"):
        with pytest.raises(ValueError, match="no CUDA device is available here; use --device cpu"):
            resolve_device(text)
