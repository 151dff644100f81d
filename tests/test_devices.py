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


def test_inference_mode_runs_the_function_in_torch_inference_mode_and_keeps_its_name():
    from pipeline.devices import inference_mode

    @inference_mode
    def double(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Doubles x."""
        return x * 2, torch.is_inference_mode_enabled()

    x = torch.ones(2, requires_grad=True)
    y, inside = double(x)
    assert inside and not torch.is_inference_mode_enabled()
    assert y.tolist() == [2.0, 2.0] and y.is_inference() and not y.requires_grad
    assert (double.__name__, double.__doc__) == ("double", "Doubles x.")
