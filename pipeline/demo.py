"""`eleatt demo`: the two-stream (RGB + optical flow) pipeline end to end on a generated dataset, in minutes on a CPU.

prepare synthetic -> flow (OpenCV DIS) -> extract RGB and flow features (timm backbone) -> fit an EleAtt-LSTM per
stream (the Lightning CLI, the same code as `eleatt fit`) -> validate and test both -> fuse (weights picked on the
validation scores) -> classify a few videos with both checkpoints -> report (accuracy table with an order-blind
baseline, training curves, confusion matrices, the attention picture).
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
STREAMS = ("rgb", "flow")
LABELS = {"rgb": "RGB", "flow": "flow"}


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


STAGES = 10

# The stages on a real dataset, shown in the report (the README's UCF101 walkthrough).
REAL_COMMANDS = [
    ("1. lists from the official split files", "eleatt prepare ucf101 --splits-dir data/ucf101/ucfTrainTestlist "
     "--split 1 --out data/ucf101/lists/split1"),
    ("2. optical flow, once (resumable)", "eleatt flow --list data/ucf101/lists/split1/all.txt --root "
     "data/ucf101/videos --out data/ucf101/flow --method dis"),
    ("3. per-frame RGB features and flow-stack features, once (resumable)", "for s in train val test; do\n"
     "  eleatt extract --list data/ucf101/lists/split1/$s.txt --root data/ucf101/videos \\\n"
     "      --out data/ucf101/features/rgb --backbone resnet50 --weights imagenet\n"
     "  eleatt extract --modality flow --stack 5 --list data/ucf101/lists/split1/$s.txt --root data/ucf101/flow \\\n"
     "      --out data/ucf101/features/flow --backbone resnet50 --weights imagenet\n"
     "done"),
    ("4. train each stream", "eleatt fit --config configs/ucf101_rgb.yaml --run_name ucf101-rgb-s1\n"
     "eleatt fit --config configs/ucf101_rgb.yaml --data.features_dir data/ucf101/features/flow "
     "--run_name ucf101-flow-s1"),
    ("5. validate and test each stream (scores_val.npz, scores_test.npz, confusion matrices)",
     "for r in rgb flow; do\n  eleatt validate --config checkpoints/ucf101-$r-s1/config.yaml "
     "--ckpt_path checkpoints/ucf101-$r-s1/best.ckpt\n"
     "  eleatt test --config checkpoints/ucf101-$r-s1/config.yaml --ckpt_path checkpoints/ucf101-$r-s1/best.ckpt\n"
     "done"),
    ("6. fuse the two streams (weights picked on validation)",
     "eleatt fuse --scores checkpoints/ucf101-rgb-s1/scores_test.npz checkpoints/ucf101-flow-s1/scores_test.npz \\\n"
     "    --search-weights checkpoints/ucf101-rgb-s1/scores_val.npz checkpoints/ucf101-flow-s1/scores_val.npz \\\n"
     "    --out checkpoints/ucf101-fused-s1.npz"),
    ("7. classify new videos (each stream; fuse their probabilities with the weights above)",
     "eleatt classify my_video.mp4 --ckpt checkpoints/ucf101-rgb-s1/best.ckpt --topk 5\n"
     "eleatt classify my_video.mp4 --ckpt checkpoints/ucf101-flow-s1/best.ckpt --topk 5"),
    ("8. look at the attention of one video", "eleatt visualize --ckpt checkpoints/ucf101-rgb-s1/best.ckpt "
     "--video my_video.mp4 --out checkpoints/ucf101-rgb-s1/visualize"),
]


def _cpu() -> float:
    """CPU seconds (user + system) of this process and of its finished children (flow and decoding workers)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _stage(number: int, title: str) -> tuple[float, float]:
    print(f"\n== [{number}/{STAGES}] {title}", flush=True)
    return time.perf_counter(), _cpu()


def _done(start: tuple[float, float], what: str) -> None:
    # CPU time too: on a shared machine the wall time says more about the other jobs than about the demo.
    wall, cpu = time.perf_counter() - start[0], _cpu() - start[1]
    print(f"   -> {what} ({wall:.1f} s, CPU {cpu:.1f} s)", flush=True)


def _failed(stage: str, code: int) -> int:
    print(f"eleatt demo: {stage} ended with exit status {code} (see above); rerun the same command to resume",
          file=sys.stderr)
    return code


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
    args = build_parser().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:  # the training stages run on one thread; a caller (the tests run the demo in-process) gets its own back
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    opts = _options(args)
    if not CONFIG.is_file():
        raise InputNotFoundError(f"config '{CONFIG}' not found: the installation lacks its configs; reinstall eleatt")
    from pipeline.paths import ensure_writable_dir

    out = ensure_writable_dir(Path(args.out), "--out").resolve()
    # The videos are regenerated on every run, so flow and features are kept per dataset: a rerun with other sizes or
    # seed into the same --out must not resume (skip) from flow or features of different videos.
    dataset_tag = f"{opts['videos_per_class']}v{opts['num_frames']}f{opts['size']}px-seed{args.seed}"
    data = out / "data"
    flow = out / "flow" / f"dis-{dataset_tag}"
    features = {"rgb": out / "features" / f"rgb-{opts['backbone']}-{dataset_tag}",
                "flow": out / "features" / f"flow{opts['stack']}-{opts['backbone']}-{dataset_tag}"}
    session = out / "checkpoints" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    total = (time.perf_counter(), _cpu())

    from preprocessing.synthetic import make_dataset

    t = _stage(1, f"prepare synthetic: {opts['videos_per_class']} videos a class, {opts['num_frames']} frames, "
                  f"{opts['size']}x{opts['size']} -> {data}")
    summary = make_dataset(data, videos_per_class=opts["videos_per_class"], num_frames=opts["num_frames"],
                           size=opts["size"], seed=args.seed)
    counts = summary["counts"]
    _done(t, f"{summary['num_videos']} H.264 videos in {len(summary['classes'])} classes "
             f"(train {counts['train']}, val {counts['val']}, test {counts['test']}): {', '.join(summary['classes'])}")

    from pipeline.data.lists import read_list, write_list

    everything = data / "all.txt"
    write_list(everything, [e for split in ("train", "val", "test") for e in read_list(data / f"{split}.txt")])
    from preprocessing.flow import main as flow_main

    t = _stage(2, f"flow: OpenCV DIS between consecutive frames at {opts['size']}x{opts['size']} -> {flow}")
    code = flow_main(["--list", str(everything), "--root", str(data), "--out", str(flow), "--method", "dis",
                      "--short-side", "0"])
    if code != 0:
        return _failed("flow", code)
    _done(t, f"{summary['num_videos']} flow files ({opts['num_frames'] - 1} frame pairs each) in {flow}")

    from preprocessing.extract import main as extract_main

    t = _stage(3, f"extract RGB: per-frame {opts['backbone']} features (weights {args.weights}) -> {features['rgb']}")
    code = extract_main(["--list", str(everything), "--root", str(data), "--out", str(features["rgb"]),
                         "--backbone", opts["backbone"], "--weights", args.weights])
    if code != 0:
        return _failed("RGB extraction", code)
    _done(t, f"RGB features of {summary['num_videos']} videos in {features['rgb']}")

    t = _stage(4, f"extract flow: {opts['backbone']} features of stacks of {opts['stack']} flow fields "
                  f"({2 * opts['stack']} channels, weights {args.weights}) -> {features['flow']}")
    code = extract_main(["--modality", "flow", "--stack", str(opts["stack"]), "--list", str(everything),
                         "--root", str(flow), "--out", str(features["flow"]), "--backbone", opts["backbone"],
                         "--weights", args.weights])
    if code != 0:
        return _failed("flow extraction", code)
    _done(t, f"flow features of {summary['num_videos']} videos in {features['flow']}")

    import torch

    from pipeline.training.cli import main as lightning_main

    # The sequence model is tiny (batches of 16 x 24 steps): one thread is as fast, and on a busy machine several
    # threads that wait on each other make training ten times slower. Restored before classify (and by main).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def common(stream: str) -> list[str]:
        return ["--config", str(CONFIG), "--data.features_dir", str(features[stream]),
                "--data.train_list", str(data / "train.txt"), "--data.val_list", str(data / "val.txt"),
                "--data.test_list", str(data / "test.txt"), "--data.num_workers", "0",
                "--trainer.default_root_dir", str(session), "--trainer.enable_model_summary", "false",
                "--seed_everything", str(args.seed), "--model.hidden_size", str(opts["hidden"]), *TRAINING]

    runs = {s: session / s for s in STREAMS}
    for number, stream in zip((5, 6), STREAMS):
        t = _stage(number, f"fit {LABELS[stream]}: EleAtt-LSTM ({opts['hidden']} units) on the {LABELS[stream]} "
                           f"feature sequences, {opts['epochs']} epochs")
        code = lightning_main(["fit", *common(stream), "--run_name", stream,
                               "--trainer.max_epochs", str(opts["epochs"])])
        if code != 0:
            return _failed(f"fit {LABELS[stream]}", code)
        _done(t, f"{LABELS[stream]} checkpoints in {runs[stream]}")

    from pipeline.evaluation.scores import accuracy_summary, read_scores

    t = _stage(7, "validate and test both streams with their best checkpoints")
    metrics = {}
    for stream in STREAMS:
        for command in ("validate", "test"):
            code = lightning_main([command, *common(stream), "--trainer.enable_progress_bar", "false",
                                   "--ckpt_path", str(runs[stream] / "best.ckpt")])
            if code != 0:
                return _failed(f"{command} {LABELS[stream]}", code)
        scores = read_scores(runs[stream] / "scores_test.npz")
        metrics[stream] = accuracy_summary(scores["scores"], scores["labels"])
    chance = 1 / len(summary["classes"])
    _done(t, "test top-1 " + ", ".join(f"{LABELS[s]} {metrics[s]['top1']:.1%}" for s in STREAMS)
             + f" (chance {chance:.1%})")

    from pipeline.evaluation.fusion import main as fuse_main

    fused_path = session / "fused_test.npz"
    t = _stage(8, "fuse: weighted mean of the two streams' probabilities, weights picked on validation")
    code = fuse_main(["--scores", *(str(runs[s] / "scores_test.npz") for s in STREAMS),
                      "--search-weights", *(str(runs[s] / "scores_val.npz") for s in STREAMS),
                      "--out", str(fused_path)])
    if code != 0:
        return _failed("fuse", code)
    fused = read_scores(fused_path)
    weights = [float(w) for w in fused["weights"]]
    metrics["fused"] = accuracy_summary(fused["scores"], fused["labels"])
    _done(t, f"fused test top-1 {metrics['fused']['top1']:.1%} with weights RGB {weights[0]:g} : flow {weights[1]:g}")

    torch.set_num_threads(threads)
    from pipeline.evaluation.fusion import fuse_probs
    from pipeline.serving.classify import VideoClassifier

    tests = read_list(data / "test.txt")
    picks = [tests[i] for i in range(0, len(tests), max(1, len(tests) // 4))][:4]
    t = _stage(9, f"classify {len(picks)} test videos from their files with both checkpoints (flow computed on the "
                  "fly)")
    models = {s: VideoClassifier(runs[s] / "best.ckpt", device="cpu") for s in STREAMS}
    names = [str(c) for c in fused["classes"]]
    rows = {str(v): i for i, v in enumerate(fused["videos"])}
    agree = 0
    for entry in picks:
        preds = [models[s](data / entry.path, topk=1) for s in STREAMS]
        for pred in preds:
            if not pred.ok:
                raise UsageError(f"classify '{data / entry.path}' failed: {pred.error}")
        probs = fuse_probs([p.scores for p in preds], weights)  # (C,)
        label = int(probs.argmax())
        agree += label == int(fused["scores"][rows[entry.path]].argmax())
        each = ", ".join(f"{LABELS[s]} {p.names[0]} {p.probs[0]:.0%}" for s, p in zip(STREAMS, preds))
        print(f"   {entry.path}  (true: {names[entry.label]})  ->  fused {names[label]} {probs[label]:.0%}  ({each})")
    _done(t, f"fused top-1 agrees with `fuse` for {agree} of {len(picks)} videos")

    from pipeline.evaluation.report import Stream

    t = _stage(10, f"report: order-blind baseline, curves, confusion, attention -> {session}")
    streams = [Stream("RGB", runs["rgb"] / "scores_test.npz", runs["rgb"]),
               Stream("flow", runs["flow"] / "scores_test.npz", runs["flow"],
                      note=f"stacks of {opts['stack']} DIS flow fields"),
               Stream("fused", fused_path, None, note=f"RGB {weights[0]:g} : flow {weights[1]:g}, picked on val")]
    report, baseline = write_demo_report(session, streams, features["rgb"], data, runs["rgb"] / "best.ckpt", picks,
                                         seed=args.seed)
    _done(t, f"order-blind baseline (linear on the mean RGB feature) top-1 {baseline['top1']:.1%}; report "
             f"{report.name} with {len(list(session.glob('*.png')))} pictures")

    print(f"\ndemo done in {time.perf_counter() - total[0]:.0f} s (CPU {_cpu() - total[1]:.0f} s): "
          f"test top-1 RGB {metrics['rgb']['top1']:.1%}, flow {metrics['flow']['top1']:.1%}, fused {metrics['fused']['top1']:.1%} (order-blind baseline "
          f"{baseline['top1']:.1%}, chance {chance:.1%}); run folder {session}")
    print(f"report: {report.resolve()}")
    return 0


def write_demo_report(out: Path, streams: list, features: Path, data: Path, ckpt: Path, videos: list,
                      seed: int = 0, commands: list[tuple[str, str]] | None = None) -> tuple[Path, dict]:
    """The demo's report in the folder `out`: the table of `streams` (pipeline.evaluation.report.Stream, e.g. RGB, flow, fused) plus the
    order-blind baseline on the RGB `features`, curves, confusion matrices, and the attention picture of the RGB
    checkpoint `ckpt` on a few of `videos` (list entries under `data`). Returns (report.html, baseline)."""
    from tqdm import tqdm

    from pipeline.evaluation.baseline import order_blind_baseline
    from pipeline.data.features import FeatureFolder
    from pipeline.evaluation.report import write_report
    from pipeline.serving.visualize import attention_picture
    from pipeline.trained.load import load_stream

    shown = videos[:3]
    with tqdm(total=4, desc="report", unit="step", leave=False) as bar:
        bar.set_postfix_str("order-blind baseline")
        baseline = order_blind_baseline(features, data / "train.txt", data / "test.txt", seed=seed)
        baseline["note"] = "linear classifier on the mean RGB frame feature (blind to order)"
        bar.update()
        bar.set_postfix_str("attention picture")
        model = load_stream(ckpt)
        folder = FeatureFolder(features)
        names = model.class_names
        picture, _ = attention_picture(
            model, [folder.load(e.path) for e in shown], out / "attention.png",
            titles=[f"{e.path} (true: {names[e.label]})" for e in shown], videos=[data / e.path for e in shown])
        bar.update()
        bar.set_postfix_str("streaming timeline")
        timeline = streaming_timeline(ckpt, data, out / "streaming.png")
        bar.update()
        bar.set_postfix_str("report")
        report = write_report(
            out, streams, baselines={"order-blind baseline": baseline}, attention=picture,
            images=[timeline] if timeline else None,
            commands=commands or REAL_COMMANDS, title="eleatt demo: two-stream EleAtt-LSTM on the generated order-only dataset",
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
