"""`eleatt demo`: the two-stream (RGB + optical flow) pipeline end to end on a generated dataset, in minutes on a CPU.

prepare synthetic -> flow (OpenCV DIS) -> extract RGB and flow features (timm backbone) -> fit an EleAtt-LSTM per
stream (the Lightning CLI, the same code as `eleatt fit`) -> validate and test both -> fuse (weights picked on the
validation scores) -> classify a few videos with both checkpoints -> report (accuracy table with an order-blind
baseline, training curves, confusion matrices, the attention picture). Every stage after the first is `eleatt run`'s
(`pipeline.run.Pipeline`: the walkthrough's commands), on the generated dataset.
The generated classes differ only in temporal order, so the test accuracy measures what the models learnt about order
(chance is 1 / classes; a model that ignores order cannot beat ~1/2 within each pair). Pooled features of a random
backbone see brightness, size and hue but hardly position or orientation, so the RGB stream tells grow/shrink,
brighten/darken and the hue pair apart; flow sees the motion (move, rotate, grow/shrink) but not the hue pair.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from pipeline.errors import InputNotFoundError, UsageError

# Shipped inside the package (pipeline/configs links to the checkout's configs/), so an installed wheel finds it too.
CONFIG = Path(__file__).resolve().parent / "configs" / "features_lstm.yaml"

# The full and the --quick demo: generated videos per class, frames, size, backbone, flow stack length L, epochs,
# hidden size. Random (seeded) backbone weights need no download; their features are small and nearly constant over
# time, so the demo standardises them per dimension (statistics of the training set, kept in the checkpoint).
FULL = dict(videos_per_class=60, num_frames=24, size=64, backbone="test_resnet", stack=5, epochs=40, hidden=128)
QUICK = dict(videos_per_class=5, num_frames=16, size=48, backbone="test_resnet", stack=2, epochs=4, hidden=32)
TRAINING = ["--data.normalize", "standard", "--data.batch_size", "16", "--optimizer.init_args.lr", "0.003",
            "--model.dropout", "0.2", "--trainer.log_every_n_steps", "1"]


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser

    parser = command_parser(
        prog="eleatt demo",
        description="Run the two-stream pipeline end to end on a generated order-only action dataset: prepare "
                    "synthetic -> optical flow -> extract RGB and flow features -> fit an EleAtt-LSTM per stream -> "
                    "test -> fuse -> classify -> report, printing what each stage did and the accuracies.",
        epilog="The last line is the report's absolute path. Exit status 0 done, 2 usage error or missing input, "
               "3 some videos failed in a stage (listed), 130 interrupted (rerun to resume the flow and features).",
    )
    parser.add_argument("--out", default="runs/demo", help="working folder (default runs/demo; reruns resume the "
                                                            "flow and the features and start new training runs)")
    parser.add_argument("--quick", action="store_true", help="a tiny version (seconds; for tests and smoke checks)")
    parser.add_argument("--backbone", default=None, help="timm backbone of both streams (default test_resnet: "
                                                         "seconds on a CPU)")
    parser.add_argument("--weights", default="none",
                        help="backbone weights of both streams: none (random, seeded; default: no download needed), "
                             "imagenet, or a local .safetensors/.pth/.bin file (for flow, the first convolution's RGB "
                             "filters are averaged and repeated over the 2L channels)")
    parser.add_argument("--stack", type=int, default=None, help="flow fields per flow-stream input, L (default 5)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per stream (default 40; --quick 4)")
    parser.add_argument("--videos-per-class", type=int, default=None, help="generated videos per class (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default 0)")
    return parser



def _options(args: argparse.Namespace) -> dict:
    opts = dict(QUICK if args.quick else FULL)
    for key, value in (("backbone", args.backbone), ("epochs", args.epochs), ("stack", args.stack),
                       ("videos_per_class", args.videos_per_class)):
        if value is not None:
            opts[key] = value
    if opts["epochs"] < 1 or opts["stack"] < 1:
        raise UsageError(f"--epochs {opts['epochs']} and --stack {opts['stack']}: both must be at least 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args, argv)
    finally:  # the training stages run on one thread; a caller (the tests run the demo in-process) gets its own back
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    opts = _options(args)
    if not CONFIG.is_file():
        raise InputNotFoundError(f"config '{CONFIG}' not found: the installation lacks its configs; reinstall eleatt")
    from pipeline.paths import ensure_writable_dir
    from pipeline.run import Hooks, Pipeline
    from pipeline.walkthrough import STREAMS, Layout, Options

    out = ensure_writable_dir(Path(args.out), "--out").resolve()
    # The videos are regenerated on every run, so flow and features are kept per dataset: a rerun with other sizes or
    # seed into the same --out must not resume (skip) from flow or features of different videos.
    dataset_tag = f"{opts['videos_per_class']}v{opts['num_frames']}f{opts['size']}px-seed{args.seed}"
    data = out / "data"
    session = out / "checkpoints" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    layout = Layout(
        videos=str(data), lists=str(data), flow=str(out / "flow" / f"dis-{dataset_tag}"),
        features={"rgb": str(out / "features" / f"rgb-{opts['backbone']}-{dataset_tag}"),
                  "flow": str(out / "features" / f"flow{opts['stack']}-{opts['backbone']}-{dataset_tag}")},
        filtered=str(session / "lists"), runs=str(session), run_names={s: s for s in STREAMS},
        fused=str(session / "fused_test.npz"))
    options = Options(
        backbone=opts["backbone"], weights=args.weights, stack=opts["stack"], config=str(CONFIG),
        flow_args=("--method", "dis", "--short-side", "0"),
        fit_args=("--data.num_workers", "0", "--trainer.enable_model_summary", "false", "--seed_everything",
                  str(args.seed), "--model.hidden_size", str(opts["hidden"]), *TRAINING, "--trainer.max_epochs",
                  str(opts["epochs"])))
    settings = {"quick": bool(args.quick), **opts, "weights": args.weights, "seed": args.seed}

    def generate() -> str:
        from pipeline.data.lists import read_list, write_list
        from preprocessing.synthetic import make_dataset

        summary = make_dataset(data, videos_per_class=opts["videos_per_class"], num_frames=opts["num_frames"],
                               size=opts["size"], seed=args.seed)
        write_list(data / "all.txt", [e for split in ("train", "val", "test") for e in read_list(data / f"{split}.txt")])
        counts = summary["counts"]
        return (f"{summary['num_videos']} H.264 videos in {len(summary['classes'])} classes (train {counts['train']}, "
                f"val {counts['val']}, test {counts['test']}): {', '.join(summary['classes'])}")

    hooks = Hooks(lists=generate, lists_title=f"prepare synthetic: {opts['videos_per_class']} videos a class, "
                                              f"{opts['num_frames']} frames, {opts['size']}x{opts['size']} -> {data}",
                  train_threads=1, report=lambda pipeline, streams, picks: _report(pipeline, streams, picks, args.seed),
                  report_title=f"report: order-blind baseline, curves, confusion, attention -> {session}")
    pipeline = Pipeline("eleatt demo", layout, options, session, settings,
                        resume="eleatt " + " ".join(["demo", *argv]) + " (flow and features resume; training "
                               "starts again)", hooks=hooks)
    return pipeline.execute()


def _report(pipeline, streams: list, picks: list, seed: int) -> tuple[Path, str]:
    session = pipeline.out
    report, baseline = write_demo_report(session, streams, Path(pipeline.layout.features["rgb"]),
                                         Path(pipeline.layout.videos), Path(pipeline.layout.run("rgb")) / "best.ckpt",
                                         picks, seed=seed)
    pipeline.hooks.extra_summary["order-blind baseline"] = f"{baseline['top1']:.1%}"
    return report, f"order-blind baseline (linear on the mean RGB feature) top-1 {baseline['top1']:.1%}; "


def write_demo_report(out: Path, streams: list, features: Path, data: Path, ckpt: Path, videos: list,
                      seed: int = 0, commands: list[tuple[str, str]] | None = None) -> tuple[Path, dict]:
    """The demo's report in the folder `out`: the table of `streams` (pipeline.evaluation.report.Stream, e.g. RGB,
    flow, fused) plus the order-blind baseline on the RGB `features`, curves, confusion matrices, and the attention
    picture of the RGB checkpoint `ckpt` on a few of `videos` (list entries under `data`). Returns (report.html,
    baseline)."""
    from tqdm import tqdm

    from pipeline.evaluation.baseline import order_blind_baseline
    from pipeline.evaluation.report import write_report
    from pipeline.run import attention_of
    from pipeline.walkthrough import as_pairs, ucf101_steps

    # The bar only on a terminal (tqdm's disable=None): a log file gets the stage lines alone.
    with tqdm(total=4, desc="report", unit="step", leave=False, disable=None) as bar:
        bar.set_postfix_str("order-blind baseline")
        baseline = order_blind_baseline(features, data / "train.txt", data / "test.txt", seed=seed)
        baseline["note"] = "linear classifier on the mean RGB frame feature (blind to order)"
        bar.update()
        bar.set_postfix_str("attention picture")
        picture = attention_of(ckpt, features, data, videos, out)
        bar.update()
        bar.set_postfix_str("streaming timeline")
        timeline = streaming_timeline(ckpt, data, out / "streaming.png")
        bar.update()
        bar.set_postfix_str("report")
        report = write_report(
            out, streams, baselines={"order-blind baseline": baseline}, attention=picture,
            images=[timeline] if timeline else None,
            commands=commands or as_pairs(ucf101_steps()),
            title="eleatt demo: two-stream EleAtt-LSTM on the generated order-only dataset",
            intro="The classes of this generated dataset differ only in temporal order (grow vs. shrink, move right "
                  "vs. left, ...), so a model that ignores order cannot tell the two classes of a pair apart. "
                  "The RGB stream sees size, brightness and hue; the flow stream sees motion (but not the hue pair); "
                  "their fusion (weights picked on the validation videos) sees both. Figures measured in this run.")
        bar.update()
    return report, baseline


def streaming_timeline(ckpt: Path, data: Path, path: Path, first: str = "grow", second: str = "shrink"):
    """Online recognition in the report: the checkpoint's StreamingClassifier fed a test video of class `first`
    followed by one of class `second` (frame by frame, state carried across the cut); the class probabilities after
    each frame are drawn to `path`. Returns (caption, path), or None when the test list lacks either class."""
    import warnings

    import numpy as np

    from pipeline.data.lists import read_classes, read_list
    from pipeline.data.video import load_frames, probe
    from pipeline.serving.streaming import StreamingClassifier, plot_stream

    names = read_classes(data / "classes.txt")
    if first not in names or second not in names:
        return None
    tests = read_list(data / "test.txt")
    clips = [next((e for e in tests if e.label == names.index(c)), None) for c in (first, second)]
    if None in clips:
        return None
    with warnings.catch_warnings():  # the demo's checkpoints sample 16 steps of a whole video: said in the caption
        warnings.simplefilter("ignore")
        stream = StreamingClassifier(ckpt, device="cpu")
    fps = probe(data / clips[0].path).fps
    frames = [load_frames(data / e.path, np.arange(probe(data / e.path).num_frames)) for e in clips]
    out = stream.push(np.concatenate([f.numpy() for f in frames]), fps=fps)  # probs (n, C) after each sampled frame
    cut = len(frames[0]) / fps
    plot_stream(out.times, out.probs, names, path,
                title=f"streaming: {clips[0].path} then {clips[1].path} (cut at {cut:.1f} s)")
    return (f"Online recognition (`eleatt classify --stream`): the RGB checkpoint's class probabilities after each "
            f"frame of a '{first}' test video followed by a '{second}' one (cut at {cut:.1f} s), the recurrent state "
            "carried across the cut; the band along the bottom is the top-1 class at each moment. The model was "
            "trained on 16 steps spread over whole clips, never on a cut.", path)
