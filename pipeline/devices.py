"""The one parser of a `--device` flag, for the commands that run a network (extract, classify), and
`inference_mode`. torch is imported when they run, not with this module: a command's `--help` does not load it."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, TypeVar

from pipeline.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device", "inference_mode"]
F = TypeVar("F", bound=Callable)


def inference_mode(fn: F) -> F:
    """`@torch.inference_mode()` that imports torch on the first call, not where the function is defined."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)
    return run  # type: ignore[return-value]


def resolve_device(device: str) -> torch.device:
    """`--device` text -> a torch.device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N", "gpu"
    (= cuda) or "mps". Raises ValueError naming the flag for unknown text or a CUDA device this machine lacks."""
    import torch

    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "gpu" or text.startswith("gpu:"):
        text = "cuda" + text[3:]
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: no CUDA device is available here; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev
