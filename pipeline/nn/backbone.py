"""Per-frame feature encoder around any timm model: weights resolution (timm pretrained, a local file, none),
the model's eval data config as a plain dict, and batched, channels-last inference.

`FrameEncoder("resnet50")` maps normalised frames `(N, C, H, W)` to pooled features `(N, num_features)`.
The data config (input size, mean, std, crop_pct, interpolation) follows the weights, as in timm, and is what
`pipeline.data.transforms.eval_views` needs to prepare frames for it.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg, load_state_dict
from torch import nn
from pipeline.errors import InputNotFoundError, UsageError, load_failure

__all__ = ["FrameEncoder", "cross_modality_conv", "MissingWeightsError", "resolve_weights", "WEIGHT_FILE_SUFFIXES", "STORED_DTYPES",
           "AUTOCAST_DTYPES"]

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_SPECIAL_WEIGHTS = ("imagenet", "none")
_HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TRUE = {"1", "on", "yes", "true"}
# A stream's precision (its settings) -> the autocast dtype of the backbone (None: float32 arithmetic).
AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
STORED_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class MissingWeightsError(InputNotFoundError):
    """timm's pretrained weights are neither cached nor downloadable (offline); the message says what to pass."""


def resolve_weights(weights: str | os.PathLike | None) -> str:
    """Normalise a weights argument: "imagenet", "none" (also None), or the absolute path of an existing file.

    Raises FileNotFoundError naming the path when a file is given that does not exist, and ValueError for a
    file of an unknown kind.
    """
    if weights is None:
        return "none"
    text = str(weights)
    if text.lower() in _SPECIAL_WEIGHTS:
        return text.lower()
    path = Path(text).expanduser()
    if not path.is_file():
        raise InputNotFoundError(
            f"weights file '{path}' not found; pass --weights PATH to an existing {'/'.join(WEIGHT_FILE_SUFFIXES)} "
            "file, --weights imagenet for timm's pretrained weights or --weights none for random initialisation"
        )
    if path.suffix.lower() not in WEIGHT_FILE_SUFFIXES:
        raise UsageError(
            f"weights file '{path}' has suffix {path.suffix!r}; expected one of {', '.join(WEIGHT_FILE_SUFFIXES)} "
            "(a state dict saved with safetensors or torch.save)"
        )
    return str(path.resolve())


def _offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub only reads it at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
        return False


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the host of `url` opens within `timeout` s (instead of a minute of retries)."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_pretrained_file(cfg: Any) -> Path | None:
    """The local copy of timm's default pretrained weights for `cfg`, if the HF or torch hub cache holds one."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_WEIGHT_NAMES
        for name in names:
            found = try_to_load_from_cache(repo_id, name, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path
    return None


def _pretrained_cfg(name: str) -> Any:
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UsageError(
            f"timm has no pretrained weights for backbone {name!r}; pass --weights PATH to a state dict file "
            "or --weights none for random initialisation"
        )
    return cfg


def cross_modality_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """TSN's cross-modality initialisation of a first convolution for `in_chans` inputs (e.g. 2L flow channels):
    the pretrained filters averaged over their (RGB) input channels and repeated over the new ones, unscaled.

    weight (O, I, k, k) -> (O, in_chans, k, k).
    """
    return weight.float().mean(1, keepdim=True).expand(-1, in_chans, -1, -1).contiguous().to(weight.dtype)


def _adapt_in_chans(model: nn.Module, name: str, in_chans: int) -> nn.Module | None:
    """`model`'s weights in a fresh `name` with `in_chans` inputs, its first conv(s) adapted TSN's way
    (`cross_modality_conv`); None where the first conv is not a plain (O, I, k, k) convolution."""
    state = model.state_dict()
    keys = [c + ".weight" for c in _first_convs(model)]
    if not keys or not all(k in state and state[k].ndim == 4 for k in keys):
        return None
    for key in keys:
        state[key] = cross_modality_conv(state[key], in_chans)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapted = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    try:
        adapted.load_state_dict(state, strict=True)
    except RuntimeError:
        return None
    adapted.pretrained_cfg = model.pretrained_cfg
    return adapted


def _create_pretrained(name: str, in_chans: int) -> nn.Module:
    """timm's pretrained weights (RGB); for other `in_chans` (flow stacks) the first conv adapted TSN's way, which
    timm does not do (it repeats R, G, B cyclically and rescales): averaged over RGB and repeated."""
    model = _create_pretrained_rgb(name)
    if in_chans == 3:
        return model
    adapted = _adapt_in_chans(model, name, in_chans)
    if adapted is None:  # an unusual stem: timm's own adaptation
        return _create_pretrained_rgb(name, in_chans)
    return adapted


def _create_pretrained_rgb(name: str, in_chans: int = 3) -> nn.Module:
    """timm's pretrained weights, from the local cache when there, else downloaded; never a minute of retries."""
    cfg = _pretrained_cfg(name)
    cached = _cached_pretrained_file(cfg)
    if cached is not None:
        # Load the cached file directly: timm would otherwise ask the hub for a newer revision first.
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, num_classes=0, in_chans=in_chans
        )
    source = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    if _offline() or not _reachable(source):
        why = "HF_HUB_OFFLINE is set" if _offline() else f"{urlparse(source).hostname} cannot be reached"
        raise MissingWeightsError(
            f"pretrained weights for backbone {name!r} ({source}) are not in the local cache and {why}; "
            f"pass --weights PATH to a local {'/'.join(WEIGHT_FILE_SUFFIXES)} state dict, or --weights none for "
            "random initialisation (or download them once with network access)"
        )
    return timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_chans)


def _first_convs(model: nn.Module) -> tuple[str, ...]:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if not first:
        return ()
    return (first,) if isinstance(first, str) else tuple(first)


def _classifiers(model: nn.Module) -> tuple[str, ...]:
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not head:
        return ()
    return (head,) if isinstance(head, str) else tuple(head)


def load_weights_file(model: nn.Module, path: str | os.PathLike, in_chans: int = 3) -> None:
    """Load a state dict file into a timm model built with `num_classes=0`.

    Accepts a timm model's state dict or a `FrameEncoder`'s (keys under `model.`), plain or wrapped in a
    checkpoint dict (`state_dict` / `model` / EMA keys, `module.` prefixes: timm's `load_state_dict`), as
    `.safetensors` or a torch pickle loaded with `weights_only=True`. Classifier weights are dropped; the first
    convolution is adapted to `in_chans` the way timm adapts pretrained weights. Any other missing or unexpected
    key is an error naming the file (a file for another architecture must not load half-way). A first convolution
    saved for other input channels (an RGB file for a flow stream's 2L channels) is adapted TSN's way
    (`cross_modality_conv`), as `weights="imagenet"` is.
    """
    path = Path(path)
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as err:  # safetensors / pickle errors carry no file name
        raise UsageError(
            f"cannot read weights file '{path}' ({load_failure(err)}); expected a state dict saved with "
            "safetensors.torch.save_file or torch.save(model.state_dict())"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"weights file '{path}' does not hold a state dict of tensors")

    own = model.state_dict()
    if not any(k in own for k in state) and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # a FrameEncoder's state dict
    heads = tuple(h + "." for h in _classifiers(model))
    state = {k: v for k, v in state.items() if not (heads and k.startswith(heads) and k not in own)}
    for conv in _first_convs(model):
        key = conv + ".weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            state[key] = cross_modality_conv(state[key], in_chans)

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise UsageError(
            f"weights file '{path}' does not match backbone {arch!r}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}; pass the --backbone it was "
            "saved from"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UsageError(f"weights file '{path}' does not fit backbone shapes: {err}") from err


class FrameEncoder(nn.Module):
    """A timm backbone without its classifier: `(N, C, H, W)` normalised frames -> `(N, num_features)` features.

    Args:
        name: any `timm.list_models()` name (e.g. "resnet50", "test_resnet").
        weights: "imagenet" (timm's default pretrained weights; from the cache, else the hub; offline without a
            cached copy raises `MissingWeightsError` at once), "none" (random init, seeded: the same network in
            every process), or a local state dict file.
        in_chans: input channels (3 for RGB; 2L for stacks of L flow fields). Pretrained (RGB) first-conv weights
            are adapted TSN's cross-modality way: averaged over R, G, B and repeated over the in_chans channels.

    Attributes:
        num_features: D, the pooled feature size.
        data_config: timm's eval data config as a plain dict: input_size (C, H, W), mean, std (3-tuples from the
            weights even when in_chans != 3), crop_pct, interpolation, crop_mode.
        weights: the resolved weights source ("imagenet", "none" or an absolute path), for settings files.

    Built in eval mode, channels-last. `forward` keeps autograd (end-to-end training may fine-tune it); use
    `encode` for extraction (inference mode, batched).
    """

    def __init__(self, name: str, weights: str | os.PathLike | None = "imagenet", in_chans: int = 3) -> None:
        super().__init__()
        if in_chans < 1:
            raise UsageError(f"in_chans must be >= 1, got {in_chans}")
        if not timm.is_model(name.split(".")[0]):
            close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
            raise UsageError(f"unknown timm backbone {name!r}; similar names: {close or 'none'} (see timm.list_models())")
        self.name = name
        self.in_chans = in_chans
        self.weights = resolve_weights(weights)
        if self.weights == "imagenet":
            model = _create_pretrained(name, in_chans)
        else:
            # Seeded, so that "none" gives the same network in every run and on every rank of a distributed run.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
            if self.weights != "none":
                load_weights_file(model, self.weights, in_chans)
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.num_features: int = int(model.num_features)
        config = resolve_data_config({}, model=model)
        config["input_size"] = (in_chans, *tuple(config["input_size"])[1:])
        self.data_config: dict[str, Any] = {
            k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()
        }
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float (N, C, H, W), normalised with data_config's mean/std -> features (N, num_features)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise UsageError(f"FrameEncoder({self.name!r}) expects (N, {self.in_chans}, H, W) input, got {tuple(x.shape)}")
        return self.model(x.contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Features of many frames in batches of `batch_size` (all at once when None): (N, C, H, W) -> (N, D)."""
        if batch_size is None or x.shape[0] <= batch_size:
            return self(x)
        return torch.cat([self(chunk) for chunk in x.split(batch_size)])

    @torch.inference_mode()
    def encode_stored(self, x: torch.Tensor, precision: str = "32", dtype: str = "float16",
                      batch_size: int | None = None) -> torch.Tensor:
        """Features exactly as a feature folder stores them: the one place for the autocast and the store round trip.

        x float (N, C, H, W) normalised images -> float32 (N, D), computed under `precision` ("32", or "bf16" /
        "16" autocast on x's device) and rounded through the stored `dtype` ("float16" or "float32"), so that
        features made for a new video (classify, streaming) equal the stored ones of the same frames.
        """
        if precision not in AUTOCAST_DTYPES:
            raise UsageError(f"precision {precision!r} is not one of {tuple(AUTOCAST_DTYPES)}")
        if dtype not in STORED_DTYPES:
            raise UsageError(f"stored dtype {dtype!r} is not one of {tuple(STORED_DTYPES)}")
        autocast = AUTOCAST_DTYPES[precision]
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            feats = self.encode(x, batch_size)  # (N, D)
        return feats.to(STORED_DTYPES[dtype]).float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights!r}, in_chans={self.in_chans}, num_features={self.num_features}"
