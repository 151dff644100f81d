"""`eleatt visualize`: what a trained EleAtt model attends to and how its prediction forms over time.

For one video (its stored features, or the video file encoded the way the checkpoint's training data was) this
draws the gate values of one attention layer (elements x steps) and the class probabilities after each step (the
prediction the model makes from the first t steps; exact, since the recurrence is causal), as PNGs, and keeps the
arrays drawn in an .npz beside them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.features import NPY_ERRORS, npy_layout
from pipeline.devices import inference_mode
from pipeline.errors import EXIT_OK, EXIT_SOME_FAILED, InputNotFoundError, load_failure, UsageError
from pipeline.paths import atomic_write, check_not_input, ensure_writable_dir

if TYPE_CHECKING:  # loaded with the checkpoint, not for --help
    import torch

    from pipeline.trained.load import LoadedStream


@inference_mode
def gates_and_probabilities(model: torch.nn.Module, seq: torch.Tensor, layer: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gate values and prefix predictions of one video.

    model: a SequenceClassifier (or a module holding one as `.net`), in eval mode.
    seq: float32 (V, T, D) or (T, D), prepared as for `test` (`LoadedStream.prepare`).
    layer: 1-based index among the layers that have an attention gate.
    Returns gates float32 (T, D_layer) of the first view, and probs float32 (T, C): row t is the class
    probability (averaged over views, as `test` does) of the model run on the first t + 1 steps.
    """
    net = getattr(model, "net", model)
    if net.training:
        raise UsageError("put the model in eval mode (model.eval()) first: dropout would change the values")
    if seq.dim() == 2:
        seq = seq[None]
    seq = seq.to(net.head.weight.device)
    logits, _, gates = net.stream(seq, return_attention=True)  # (V, T, C): step t's as for a (t + 1)-step input
    if not gates:
        raise UsageError("this model has no element-wise attention gate (attention_layers=0: the plain RNN "
                         "baseline); visualize a model trained with attention_layers >= 1")
    if not 1 <= layer <= len(gates):
        raise UsageError(f"--layer {layer}: the model has {len(gates)} gated layer(s); use 1..{len(gates)}")
    probs = logits.float().softmax(-1).mean(0)  # (T, C)
    return gates[layer - 1][0].float().cpu().numpy(), probs.cpu().numpy()


def video_frames(path: str | os.PathLike, count: int = 4) -> np.ndarray:
    """`count` frames spread evenly over a video file or raw-frame folder: uint8 (K, H, W, 3)."""
    from pipeline.data.video import probe, read_frames

    total = probe(path).num_frames
    indices = np.unique(np.linspace(0, total - 1, num=min(count, total)).round().astype(np.int64))
    return read_frames(path, indices)


def attention_picture(
    stream: LoadedStream,
    features: list[np.ndarray],
    path: str | os.PathLike,
    titles: list[str] | None = None,
    videos: list[str | os.PathLike | None] | None = None,
    layer: int = 1,
    frames_per_video: int = 4,
) -> tuple[Path, list[np.ndarray]]:
    """The attention picture of a few videos (their stored features (T, D)/(V, T, D)); `videos` (files) add a few
    frames of each. Returns the PNG path and the gates drawn, float32 (T, D_layer) per video."""
    from pipeline.evaluation.plots import plot_attention

    gates, frames = [], []
    for i, feats in enumerate(features):
        g, _ = gates_and_probabilities(stream.net, stream.prepare(feats), layer)
        gates.append(g)
        video = videos[i] if videos else None
        frames.append(video_frames(video, frames_per_video) if video is not None else None)
    return plot_attention(gates, path, titles=titles, frames=frames, layer=layer), gates


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser

    parser = command_parser(
        prog="eleatt visualize",
        description="Draw the element-wise attention (gate values per input element and step of one layer) and the "
                    "class probabilities over time of one video, for a trained checkpoint. Writes "
                    "<name>_gates_layer<k>.png, <name>_probabilities.png and <name>_visualize.npz (the arrays drawn).",
    )
    parser.add_argument("--ckpt", required=True, help="an `eleatt fit` checkpoint (best.ckpt / last.ckpt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="a stored feature file (.npy, (T, D) or (V, T, D)) of a feature folder")
    source.add_argument("--video", help="a video file (or raw-frame folder), encoded with the checkpoint's backbone")
    parser.add_argument("--layer", type=int, default=1, help="which gated layer to draw (1 = the first; default 1)")
    parser.add_argument("--out", default=None, help="output folder (default: visualize/ in the checkpoint's run folder)")
    parser.add_argument("--label", type=int, default=None, help="the true class index (highlighted in the plot)")
    parser.add_argument("--weights", default=None,
                        help="--video only: backbone weights instead of the recorded ones (none, imagenet or a file)")
    parser.add_argument("--device", default="cpu", help="--video only: where the backbone runs (default cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.layer < 1:
        raise UsageError(f"--layer {args.layer}: layers count from 1")
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else ckpt.resolve().parent / "visualize"
    ensure_writable_dir(out, "--out folder")  # before loading and encoding anything
    named = Path(args.features if args.features is not None else args.video)
    stem = named.stem if named.is_file() or named.suffix else named.name
    outputs = [out / f"{stem}_gates_layer{args.layer}.png", out / f"{stem}_probabilities.png",
               out / f"{stem}_visualize.npz"]
    for path in outputs:  # a checkpoint or a video named like one of them is never overwritten
        check_not_input(path, [ckpt, named, args.weights], "output")
    frames = None
    if args.features is not None:
        from pipeline.trained.load import load_stream

        stream = load_stream(ckpt)
        source = Path(args.features)
        if not source.is_file():
            raise InputNotFoundError(f"feature file '{source}' not found (feature folders hold one .npy per video)")
        try:
            npy_layout(source)  # the header against the file's size first: np.load allocates what it says
            features = np.load(source, allow_pickle=False)
        except NPY_ERRORS as err:
            raise UsageError(f"'{source}' is not a readable .npy feature file ({load_failure(err)})") from None
    else:
        from pipeline.data.video import VideoReadError
        from pipeline.serving.classify import VideoClassifier

        source = Path(args.video)
        if not source.exists():
            raise InputNotFoundError(f"video '{source}' not found")
        classifier = VideoClassifier(ckpt, weights=args.weights, device=args.device)
        stream = classifier.stream  # the classifier already holds it: no second read of the checkpoint
        try:
            features = classifier.features(source).numpy()  # (V, T, D)
            frames = video_frames(source)
        except VideoReadError as err:
            print(f"eleatt visualize: {err}", file=sys.stderr)  # the error names the file
            return EXIT_SOME_FAILED
    bad = int(np.size(features) - np.isfinite(features).sum()) if np.asarray(features).dtype.kind == "f" else 0
    if bad:  # a picture of NaNs would pass for one of a model's attention
        raise UsageError(f"'{source}': {bad} of its {np.size(features)} feature values are NaN or infinite; "
                         "re-extract the video's features (`eleatt extract`) and visualize again")
    seq = stream.prepare(features)  # (V, T, D)
    gates, probs = gates_and_probabilities(stream.net, seq, args.layer)
    if not (np.isfinite(gates).all() and np.isfinite(probs).all()):
        raise UsageError(f"checkpoint '{ckpt}' gives NaN or infinite gates or probabilities on '{source}' (its "
                         "features are finite): the model diverged; visualize a checkpoint trained without NaNs")

    from pipeline.evaluation.plots import plot_attention, plot_probabilities

    names = stream.class_names
    if args.label is not None and not 0 <= args.label < len(names):
        raise UsageError(f"--label {args.label}: the checkpoint has {len(names)} classes (0..{len(names) - 1})")
    predicted = names[int(probs[-1].argmax())]
    truth = f", true {names[args.label]}" if args.label is not None else ""
    gates_png = plot_attention([gates], outputs[0], layer=args.layer,
                               titles=[f"{source.name}: predicted {predicted}{truth}"],
                               frames=[frames] if frames is not None else None)
    probs_png = plot_probabilities(probs, outputs[1], class_names=names, true_label=args.label,
                                   title=f"{source.name}: class probabilities after each step")
    arrays = outputs[2]
    with atomic_write(arrays) as f:
        np.savez(f, gates=gates, probs=probs, classes=np.array(names, dtype=np.str_), layer=np.int64(args.layer))
    print(f"{source}: {seq.shape[1]} steps, layer {args.layer} gates {gates.shape[1]} elements "
          f"(mean {gates.mean():.3f}, min {gates.min():.3f}, max {gates.max():.3f}); predicted {predicted} "
          f"({probs[-1].max():.0%}){truth}")
    for path in (gates_png, probs_png, arrays):
        print(f"wrote {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
