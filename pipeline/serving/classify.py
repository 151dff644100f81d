"""Classify new videos with a trained checkpoint: `eleatt classify` and `pipeline.classify(paths, ckpt)`.

The checkpoint records the class names and the settings of the feature folder it was trained on (backbone,
weights, data config, sampling, views, precision), so a video goes through exactly the path its training data
did: decode the same frames, make the same views, encode with the same backbone, store-precision round trip
(float16), the same test-time step sampling and normalisation, views averaged as class probabilities.
A flow-stream checkpoint also records how its flow was computed (`FlowOptions`: method, preset, short side,
bound): a new video's flow is computed the way `eleatt flow` computes it (`pipeline.data.flow_estimation`), kept as
the same uint8 levels a flow file stores, and goes through the flow stacks `eleatt extract --modality flow` makes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.features import SettingsFormatError
from pipeline.data.flow_files import FlowArray, FlowOptions
from pipeline.data.video import backend_names, close_readers
from pipeline.devices import inference_mode, resolve_device
from pipeline.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, UsageError
from pipeline.evaluation.fusion import MODES, check_same_classes, check_weights, default_weights, fuse_probs

if TYPE_CHECKING:  # torch, the decoders and the network code load when a classifier is made, not for --help
    import torch


@dataclass
class Prediction:
    """The result for one video: top-k class `names` and their `probs`, all class `scores` (C,), or an `error`."""

    video: str
    names: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: np.ndarray | None = None
    error: str | None = None

    @classmethod
    def from_scores(cls, video: str, scores: np.ndarray, class_names: Sequence[str], topk: int = 5) -> "Prediction":
        """The top-k classes of class probabilities `scores` (C,), highest first (ties: lower label first)."""
        k = max(1, min(topk, len(scores)))
        top = np.argsort(-scores, kind="stable")[:k]
        return cls(video, names=[class_names[i] for i in top], probs=[float(scores[i]) for i in top],
                   labels=[int(i) for i in top], scores=scores)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        if self.error is not None:
            return {"video": self.video, "error": self.error}
        return {"video": self.video, "topk": [{"class": n, "label": l, "prob": round(p, 6)}
                                             for n, l, p in zip(self.names, self.labels, self.probs)]}


class VideoClassifier:
    """A checkpoint plus the backbone it needs, ready to classify video files.

    Args:
        ckpt: an `eleatt fit` checkpoint (best.ckpt / last.ckpt); loaded with weights-only semantics.
        weights: backbone weights to use instead of the recorded source ("imagenet", "none" or a local file);
            needed when the recorded file has moved or timm's pretrained weights cannot be downloaded here.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        batch_size: frames (times views) per backbone call.
        backend: the video decoding backend (see `pipeline.data.video.load_frames`).
        flow_weights: a flow-stream checkpoint whose flow was computed with RAFT: the local RAFT weights file
            (the checkpoint records only its name).
    """

    def __init__(self, ckpt: str | os.PathLike, weights: str | None = None, device: str = "auto",
                 batch_size: int = 64, backend: str = "auto", flow_weights: str | os.PathLike | None = None) -> None:
        from pipeline.trained.load import load_stream

        ckpt = Path(ckpt)
        self.device = resolve_device(device)
        # The checkpoint's trained-stream record says what the stream is; its loader builds plain modules.
        self.stream = load_stream(ckpt, self.device)
        self.net = self.stream.net
        self.normalizer = self.stream.normalizer
        self.num_steps = self.stream.num_steps
        self.class_names = self.stream.class_names
        settings = self.stream.record.features
        if settings is not None and settings.modality not in ("rgb", "flow"):
            raise UsageError(f"checkpoint '{ckpt}' was trained on {settings.modality!r} features; classify handles "
                             "RGB and flow checkpoints")
        # An end-to-end stream holds its own (fine-tuned) backbone; a feature stream names the one to build.
        self.encoder = self.stream.encoder(weights).to(self.device)
        self.flow: FlowOptions | None = None
        self._raft = None
        if settings.modality == "flow":
            try:
                self.flow = FlowOptions.of(settings, ckpt)
            except SettingsFormatError as err:
                raise UsageError(f"checkpoint {err}; a flow-stream checkpoint must be trained on a feature folder "
                                 "made by `eleatt extract --modality flow`") from None
            if self.flow.method == "raft":
                from pipeline.data.flow_estimation import estimator_for

                self._raft = estimator_for(self.flow, flow_weights)  # loaded once; raises naming what to pass
            elif self.flow.method == "jpg":
                raise UsageError(f"checkpoint '{ckpt}' was trained on flow imported from JPEG folders, whose "
                                 "computation is unknown, so a new video's flow cannot be made the same way; train "
                                 "on flow computed by `eleatt flow` to classify videos")
        self.settings = settings
        self.data_config = dict(settings.data_config)
        self.views = settings.views
        self.batch_size = batch_size
        self.backend = backend

    def flow_of(self, path: str | os.PathLike) -> FlowArray:
        """A flow-stream checkpoint: the video's quantised flow, computed as `eleatt flow` computes it with the
        recorded options (the same levels its flow file would store)."""
        from pipeline.data.flow_estimation import DEFAULT_BACKEND, estimator_for, video_flow
        from pipeline.data.video import probe

        options = self.flow
        # OpenCV's estimators are made afresh per video, as `eleatt flow` does; RAFT is loaded once.
        estimator = self._raft if self._raft is not None else estimator_for(options)
        # `eleatt flow` decodes with PyAV by default (exact frames); raw-frame folders read as themselves.
        backend = DEFAULT_BACKEND if self.backend == "auto" and not Path(path).is_dir() else self.backend
        fps = probe(path).fps
        q = np.stack(list(video_flow(path, estimator, options.short_side, options.bound, backend)))  # (T-1, 2, h, w)
        return FlowArray(q, options.bound, fps=fps, name=str(path))

    @inference_mode
    def features(self, path: str | os.PathLike) -> torch.Tensor:
        """The features of one video as extraction stores them: float32 (V, T, D) (via the stored dtype)."""
        import torch

        from pipeline.data.views import DECODE_CHUNK, video_views

        chunks = []
        source = self.flow_of(path) if self.flow is not None else path
        for chunk in video_views(source, self.settings, backend=self.backend, chunk=DECODE_CHUNK):
            v, t = chunk.views.shape[:2]
            images = chunk.views.reshape(v * t, *chunk.views.shape[2:]).to(self.device)  # (V*t, C, H, W) view-major
            feats = self.encoder.encode_stored(images, self.settings.precision, self.settings.dtype,
                                               self.batch_size)  # (V*t, D)
            chunks.append(feats.view(v, t, -1))
        return torch.cat(chunks, dim=1).cpu()  # (V, T, D)

    @inference_mode
    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Frames uint8 (t, H, W, 3) RGB, already sampled -> their features as `features` makes them: float32
        (V, t, D) on the CPU (the same views and `encode_stored`). For streaming, which samples frames as they come."""
        if self.flow is not None:
            raise UsageError("a flow-stream checkpoint encodes flow stacks, not RGB frames: it classifies video files "
                             "(eleatt classify VIDEO --ckpt FLOW.ckpt), whose flow it computes first; stream with the "
                             "RGB stream's checkpoint")
        from pipeline.data.transforms import eval_views

        views = eval_views(frames, self.data_config, self.views)  # (V, t, C, H, W)
        v, t = views.shape[:2]
        images = views.reshape(v * t, *views.shape[2:]).to(self.device)  # (V*t, C, H, W) view-major
        feats = self.encoder.encode_stored(images, self.settings.precision, self.settings.dtype, self.batch_size)
        return feats.view(v, t, -1).cpu()

    @inference_mode
    def scores(self, feats: torch.Tensor) -> np.ndarray:
        """Class probabilities (C,) of one video's features (V, T, D), averaged over views as `test` does."""
        return self.stream.probabilities(self.stream.prepare(feats.numpy()))  # views averaged

    def __call__(self, path: str | os.PathLike, topk: int = 5) -> Prediction:
        """Classifies one video; an unreadable video gives a Prediction with `error` set (no exception)."""
        from pipeline.data.video import VideoReadError

        video = str(path)
        try:
            scores = self.scores(self.features(path))
        except (VideoReadError, FileNotFoundError, ValueError) as err:
            return Prediction(video, error=f"{type(err).__name__}: {err}")
        return Prediction.from_scores(video, scores, self.class_names, topk)


class FusedClassifier:
    """Several streams' classifiers (e.g. RGB and flow) fused as `eleatt fuse` fuses their scores files: each gives
    class probabilities (C,) for the video, fused by a weighted mean (`mode="prob"`) or of log-probabilities."""

    def __init__(self, classifiers: Sequence, weights: Sequence[float] | None = None, mode: str = "prob",
                 names: Sequence[str] | None = None) -> None:
        if mode not in MODES:
            raise UsageError(f"fusion mode {mode!r}: expected one of {', '.join(MODES)}")
        names = list(names) if names is not None else [f"checkpoint {i + 1}" for i in range(len(classifiers))]
        for model, name in zip(classifiers[1:], names[1:]):
            check_same_classes(classifiers[0].class_names, model.class_names, names[0], name, what="checkpoints")
        self.classifiers = list(classifiers)
        self.weights = check_weights(default_weights(len(classifiers)) if weights is None else weights,
                                     len(classifiers))
        self.mode = mode
        self.class_names = list(classifiers[0].class_names)

    def __call__(self, path: str | os.PathLike, topk: int = 5) -> Prediction:
        """Classifies one video with every stream; a stream that cannot read it gives the Prediction's `error`."""
        num_classes = len(self.class_names)
        streams = []
        for model in self.classifiers:
            pred = model(path, topk=num_classes)  # every class's probability: pred.scores (C,)
            if not pred.ok:
                return pred
            streams.append(pred.scores)
        scores = fuse_probs(streams, self.weights, self.mode)  # (C,)
        return Prediction.from_scores(str(path), scores, self.class_names, topk)


def _as_list(value, count: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise UsageError(f"{len(values)} {what} given for {count} checkpoints: give one, or one per checkpoint")
    return values


def open_classifiers(ckpts: str | os.PathLike | Sequence[str | os.PathLike], weights=None,
                     stream_weights: Sequence[float] | None = None, mode: str = "prob", **kwargs):
    """One checkpoint: its classifier; several (e.g. RGB and flow): a FusedClassifier of theirs."""
    ckpts = [ckpts] if isinstance(ckpts, (str, os.PathLike)) else list(ckpts)
    if not ckpts:
        raise UsageError("no checkpoint given")
    if len(ckpts) == 1 and stream_weights is not None:
        raise UsageError("stream fusion weights need two or more checkpoints (e.g. --ckpt RGB.ckpt FLOW.ckpt "
                         "--weights 1 1.5)")
    backbones = _as_list(weights, len(ckpts), "backbone weights")
    models = [VideoClassifier(c, weights=w, **kwargs) for c, w in zip(ckpts, backbones)]
    if len(models) == 1:
        return models[0]
    return FusedClassifier(models, stream_weights, mode, names=[str(c) for c in ckpts])


def classify(paths: str | os.PathLike | Sequence[str | os.PathLike],
             ckpt: str | os.PathLike | Sequence[str | os.PathLike], topk: int = 5,
             weights: str | None | Sequence[str | None] = None, device: str = "auto",
             stream_weights: Sequence[float] | None = None, mode: str = "prob") -> list[Prediction]:
    """Classifies video files with a checkpoint, or with several streams' checkpoints fused (a list, e.g.
    [RGB, flow]; `stream_weights` default 1 : 1.5 for two, `mode` "prob" or "logit", as `eleatt fuse`):
    one `Prediction` (top-k names and probabilities) per path. `weights` overrides the backbone weights (one
    value, or one per checkpoint).

    >>> [p.names[0] for p in classify(["a.mp4", "b.mp4"], "checkpoints/run/best.ckpt")]  # doctest: +SKIP
    >>> classify("a.mp4", ["checkpoints/rgb/best.ckpt", "checkpoints/flow/best.ckpt"])  # doctest: +SKIP
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    model = open_classifiers(ckpt, weights=weights, stream_weights=stream_weights, mode=mode, device=device)
    return [model(p, topk=topk) for p in paths]


def _split_weights(values: list[str] | None) -> tuple[str | None, list[float] | None]:
    """`--weights`: numbers are the streams' fusion weights, one word (a file, imagenet, none) the backbone's."""
    if not values:
        return None, None
    try:
        return None, [float(v) for v in values]
    except ValueError:
        pass
    if len(values) != 1:
        raise UsageError(f"--weights {' '.join(values)}: give numbers (one fusion weight per checkpoint, e.g. "
                         "--weights 1 1.5) or one backbone weights file, imagenet or none")
    return values[0], None


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser

    parser = command_parser(
        prog="eleatt classify",
        description="Classify video files with a trained checkpoint: decode, encode with the backbone settings the "
                    "checkpoint records (a flow-stream checkpoint: compute the video's optical flow first, with the "
                    "flow settings it records), run the EleAtt model, print the top-k classes.",
        epilog="online recognition of a file, camera or network stream: eleatt classify --stream SOURCE --ckpt C "
               "(options: eleatt classify --stream SOURCE --help). exit status: 0 all classified; 3 some videos "
               "could not be read (each listed); 2 usage error",
    )
    # nargs="*" so that a missing VIDEO (swallowed by --ckpt's list) gets the message saying where to put them
    parser.add_argument("videos", nargs="*", metavar="VIDEO", help="video files or raw-frame folders")
    parser.add_argument("--ckpt", required=True, nargs="+",
                        help="checkpoint of `eleatt fit` (checkpoints/<run>/best.ckpt); two or more (e.g. RGB.ckpt "
                             "FLOW.ckpt): their streams' probabilities are fused as `eleatt fuse` does")
    parser.add_argument("--weights", default=None, nargs="+", metavar="W",
                        help="with several checkpoints, numbers: each stream's fusion weight (default 1 1.5 for two, "
                             "as TSN; equal otherwise); otherwise the backbone weights instead of the recorded ones: "
                             "a local .safetensors/.pth/.bin file, 'imagenet' or 'none' (default: what the training "
                             "features were made with)")
    parser.add_argument("--mode", choices=MODES, default="prob",
                        help="fusion of several checkpoints: prob (weighted mean of probabilities, default) or "
                             "logit (of log-probabilities)")
    parser.add_argument("--topk", type=int, default=5, help="classes to print per video (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object a line instead of a table")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per backbone call (default 64)")
    parser.add_argument("--backend", default="auto", choices=backend_names(),
                        help="video decoding backend (default auto: PyAV, or torchcodec/decord for dense reads where "
                             "checked exact on the file; the flow of a "
                             "flow-stream checkpoint is computed from PyAV's frames, as `eleatt flow` does)")
    parser.add_argument("--flow-weights", default=None, metavar="PATH",
                        help="a flow-stream checkpoint whose flow was computed with RAFT: the local RAFT weights file")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.videos:
        parser.error("no VIDEO given; name the videos before --ckpt, which takes one or more checkpoints "
                     "(eleatt classify a.mp4 b.mp4 --ckpt RGB.ckpt [FLOW.ckpt])")
    if args.topk < 1 or args.batch_size < 1:
        print("eleatt classify: error: --topk and --batch-size must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    backbone_weights, stream_weights = _split_weights(args.weights)
    model = open_classifiers(args.ckpt, weights=backbone_weights, stream_weights=stream_weights, mode=args.mode,
                             device=args.device, batch_size=args.batch_size, backend=args.backend,
                             flow_weights=args.flow_weights)
    failed = []
    try:
        for video in args.videos:
            pred = model(video, topk=args.topk)
            if args.json:
                print(json.dumps(pred.to_json()), flush=True)
            else:
                _print_table(pred)
            if not pred.ok:
                failed.append(pred)
    finally:
        close_readers()  # the decoding process of this command
    if failed:
        print(f"eleatt classify: {len(failed)} of {len(args.videos)} videos could not be classified:", file=sys.stderr)
        for pred in failed:
            print(f"  {pred.video}: {pred.error}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK
