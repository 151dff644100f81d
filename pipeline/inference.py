"""Classify new videos with a trained checkpoint: `eleatt classify` and `pipeline.classify(paths, ckpt)`.

The checkpoint records the class names and the settings of the feature folder it was trained on (backbone,
weights, data config, sampling, views, precision), so a video goes through exactly the path its training data
did: decode the same frames, make the same views, encode with the same backbone, store-precision round trip
(float16), the same test-time step sampling and normalisation, views averaged as class probabilities.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.data.datasets import FeatureNormalizer, sample_sequence
from pipeline.data.sampling import frame_indices
from pipeline.data.transforms import eval_views
from pipeline.data.video import load_frames, probe
from pipeline.lit import classifier_from_checkpoint, read_checkpoint
from pipeline.nn.backbone import FrameEncoder

from pipeline.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE
DECODE_CHUNK = 64  # frames decoded at once: bounds the memory of a long video


@dataclass
class Prediction:
    """The result for one video: top-k class `names` and their `probs`, all class `scores` (C,), or an `error`."""

    video: str
    names: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: np.ndarray | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        if self.error is not None:
            return {"video": self.video, "error": self.error}
        return {"video": self.video, "topk": [{"class": n, "label": l, "prob": round(p, 6)}
                                             for n, l, p in zip(self.names, self.labels, self.probs)]}


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device is available here; use --device cpu (or auto)")
    return dev


class VideoClassifier:
    """A checkpoint plus the backbone it needs, ready to classify video files.

    Args:
        ckpt: an `eleatt fit` checkpoint (best.ckpt / last.ckpt); loaded with weights-only semantics.
        weights: backbone weights to use instead of the recorded source ("imagenet", "none" or a local file);
            needed when the recorded file has moved or timm's pretrained weights cannot be downloaded here.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        batch_size: frames (times views) per backbone call.
        backend: the video decoding backend (see `pipeline.data.video.load_frames`).
    """

    def __init__(self, ckpt: str | os.PathLike, weights: str | None = None, device: str = "auto",
                 batch_size: int = 64, backend: str = "auto") -> None:
        ckpt = Path(ckpt)
        self.device = _device(device)
        checkpoint = read_checkpoint(ckpt, map_location="cpu")
        self.model = classifier_from_checkpoint(checkpoint, ckpt).to(self.device)
        hparams = self.model.hparams
        settings = hparams.get("extraction_settings")
        needed = ("backbone", "weights", "data_config", "sampling", "views")
        if not settings or any(key not in settings for key in needed):
            missing = [k for k in needed if not settings or k not in settings]
            raise ValueError(
                f"checkpoint '{ckpt}' does not record the feature extraction settings it was trained on "
                f"(missing: {', '.join(missing)}), so new videos cannot be encoded the same way; retrain on a feature "
                "folder made by `eleatt extract` (its settings.json is recorded in the checkpoint)"
            )
        if settings.get("modality", "rgb") != "rgb":
            raise ValueError(f"checkpoint '{ckpt}' was trained on {settings['modality']!r} features; classify "
                             "handles RGB checkpoints only")
        self.settings = settings
        num_classes = int(hparams["num_classes"])
        self.class_names = list(hparams.get("class_names") or [f"class_{i}" for i in range(num_classes)])
        data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
        self.num_steps = data_hparams.get("num_steps") or None
        self.normalizer = FeatureNormalizer(data_hparams.get("normalize", "none"))
        state = (checkpoint.get("FeatureDataModule") or {}).get("normalizer")
        if state is not None:
            self.normalizer.load_state_dict(state)
        source = weights if weights is not None else settings["weights"]
        try:
            self.encoder = FrameEncoder(settings["backbone"], weights=source).to(self.device)
        except FileNotFoundError as err:
            hint = "" if weights is not None else (
                f" (the checkpoint records weights {settings['weights']!r}; pass `--weights PATH` to a local copy "
                "of the same weights, or `weights=` from Python)")
            raise type(err)(f"{err}{hint}") from None
        self.data_config = dict(settings["data_config"])
        self.views = settings["views"]
        self.batch_size = batch_size
        self.backend = backend
        self.store_dtype = torch.float16 if settings.get("dtype", "float16") == "float16" else torch.float32
        # the network's precision at extraction ("32", "bf16" or "16" autocast), so features match the folder's
        precision = str(settings.get("precision", "32"))
        self.autocast_dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)

    @torch.inference_mode()
    def features(self, path: str | os.PathLike) -> torch.Tensor:
        """The features of one video as extraction stores them: float32 (V, T, D) (via the stored dtype)."""
        info = probe(path)
        indices = frame_indices(self.settings["sampling"], info.num_frames, info.fps)  # (T,)
        chunks = [self.encode(load_frames(path, indices[start:start + DECODE_CHUNK], backend=self.backend))
                  for start in range(0, len(indices), DECODE_CHUNK)]  # each (V, t, D)
        return torch.cat(chunks, dim=1)  # (V, T, D)

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Frames uint8 (t, H, W, 3) RGB -> their features as extraction stores them: float32 (V, t, D) on the CPU
        (the checkpoint's views, the backbone at its extraction precision, the stored-dtype round trip)."""
        x = eval_views(frames, self.data_config, self.views)  # (V, t, C, H, W)
        v, t = x.shape[:2]
        flat = x.reshape(v * t, *x.shape[2:]).to(self.device)
        context = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                   else nullcontext())
        with context:
            feats = torch.cat([self.encoder(b) for b in flat.split(self.batch_size)])  # (V*t, D)
        return feats.float().view(v, t, -1).to(self.store_dtype).float().cpu()

    @torch.inference_mode()
    def scores(self, feats: torch.Tensor) -> np.ndarray:
        """Class probabilities (C,) of one video's features (V, T, D), averaged over views as `test` does."""
        seq = sample_sequence(feats.numpy(), self.num_steps, self.normalizer)  # (V, T', D)
        lengths = torch.tensor([seq.shape[1]])
        probs = self.model.video_probs(seq[None].to(self.device), lengths.to(self.device))  # (1, C)
        return probs[0].float().cpu().numpy()

    def __call__(self, path: str | os.PathLike, topk: int = 5) -> Prediction:
        """Classifies one video; an unreadable video gives a Prediction with `error` set (no exception)."""
        from pipeline.data.video import VideoReadError

        video = str(path)
        try:
            scores = self.scores(self.features(path))
        except (VideoReadError, FileNotFoundError, ValueError) as err:
            return Prediction(video, error=f"{type(err).__name__}: {err}")
        k = max(1, min(topk, len(scores)))
        top = np.argsort(-scores, kind="stable")[:k]
        return Prediction(video, names=[self.class_names[i] for i in top], probs=[float(scores[i]) for i in top],
                          labels=[int(i) for i in top], scores=scores)


def classify(paths: str | os.PathLike | Sequence[str | os.PathLike], ckpt: str | os.PathLike, topk: int = 5,
             weights: str | None = None, device: str = "auto") -> list[Prediction]:
    """Classifies video files with a checkpoint: one `Prediction` (top-k names and probabilities) per path.

    >>> [p.names[0] for p in classify(["a.mp4", "b.mp4"], "checkpoints/run/best.ckpt")]  # doctest: +SKIP
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    model = VideoClassifier(ckpt, weights=weights, device=device)
    return [model(p, topk=topk) for p in paths]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eleatt classify",
        description="Classify video files with a trained checkpoint: decode, encode with the backbone settings the "
                    "checkpoint records, run the EleAtt model, print the top-k classes.",
        epilog="online recognition of a file, camera or network stream: eleatt classify --stream SOURCE --ckpt C "
               "(options: eleatt classify --stream SOURCE --help). exit status: 0 all classified; 3 some videos "
               "could not be read (each listed); 2 usage error",
    )
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video files or raw-frame folders")
    parser.add_argument("--ckpt", required=True, help="checkpoint of `eleatt fit` (checkpoints/<run>/best.ckpt)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights instead of the recorded ones: a local .safetensors/.pth/.bin file, "
                             "'imagenet' or 'none' (default: what the training features were made with)")
    parser.add_argument("--topk", type=int, default=5, help="classes to print per video (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object a line instead of a table")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per backbone call (default 64)")
    parser.add_argument("--backend", default="auto", choices=("auto", "decord", "pyav", "rawframes"),
                        help="video decoding backend (default auto: decord where exact, else PyAV)")
    return parser


def _print_table(pred: Prediction) -> None:
    if not pred.ok:
        print(f"{pred.video}\n   cannot classify: {pred.error}")
        return
    print(pred.video)
    width = max(len(n) for n in pred.names)
    for rank, (name, prob) in enumerate(zip(pred.names, pred.probs), 1):
        print(f"  {rank}. {name:<{width}}  {prob:6.1%}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--stream" or a.startswith("--stream=") for a in argv):  # online recognition: its own parser
        from pipeline.streaming import main as stream_main

        return stream_main(argv)
    args = build_parser().parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        print("eleatt classify: error: --topk and --batch-size must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    model = VideoClassifier(args.ckpt, weights=args.weights, device=args.device, batch_size=args.batch_size,
                            backend=args.backend)
    failed = []
    for video in args.videos:
        pred = model(video, topk=args.topk)
        if args.json:
            print(json.dumps(pred.to_json()), flush=True)
        else:
            _print_table(pred)
        if not pred.ok:
            failed.append(pred)
    if failed:
        print(f"eleatt classify: {len(failed)} of {len(args.videos)} videos could not be classified:", file=sys.stderr)
        for pred in failed:
            print(f"  {pred.video}: {pred.error}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK
