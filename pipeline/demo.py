"""`eleatt demo`: the RGB feature pipeline end to end on a generated dataset, in a few minutes on a CPU.

prepare synthetic -> extract (timm backbone) -> fit (EleAtt-LSTM, Lightning CLI) -> test -> classify -> report
(accuracy table with an order-blind baseline, training curves, confusion matrices, the attention picture).
The generated classes differ only in temporal order, so the test accuracy measures what the recurrent model
learnt about order (chance is 1 / classes; a model that ignores order cannot beat ~1/2 within each pair).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Shipped inside the package (pipeline/configs links to the checkout's configs/), so an installed wheel finds it too.
CONFIG = Path(__file__).resolve().parent / "configs" / "features_lstm.yaml"

# (videos per class, frames, size, backbone, epochs, hidden size) for the full and the --quick demo
# Random (seeded) backbone weights need no download; their features are small and nearly constant over time, so
# the demo standardises them per dimension (statistics of the training set, kept in the checkpoint).
FULL = dict(videos_per_class=40, num_frames=24, size=64, backbone="test_resnet", epochs=80, hidden=128)
QUICK = dict(videos_per_class=5, num_frames=16, size=48, backbone="test_resnet", epochs=4, hidden=32)
TRAINING = ["--data.normalize", "standard", "--data.batch_size", "16", "--optimizer.init_args.lr", "0.003",
            "--model.dropout", "0.2", "--trainer.log_every_n_steps", "1"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eleatt demo",
        description="Run the RGB pipeline end to end on a generated order-only action dataset: prepare synthetic "
                    "-> extract -> fit -> test -> classify, printing what each stage did and the test accuracy.",
    )
    parser.add_argument("--out", default="runs/demo", help="working folder (default runs/demo; reruns resume "
                                                            "extraction and start a new training run)")
    parser.add_argument("--quick", action="store_true", help="a tiny version (seconds; for tests and smoke checks)")
    parser.add_argument("--backbone", default=None, help="timm backbone (default test_resnet: seconds on a CPU)")
    parser.add_argument("--weights", default="none",
                        help="backbone weights: none (random, seeded; default: no download needed), imagenet, or a "
                             "local .safetensors/.pth/.bin file")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 80; --quick: 4)")
    parser.add_argument("--videos-per-class", type=int, default=None, help="generated videos per class (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default 0)")
    return parser


STAGES = 6

# The stages on a real dataset, shown in the report (the README's UCF101 walkthrough).
REAL_COMMANDS = [
    ("1. lists from the official split files", "eleatt prepare ucf101 --splits-dir data/ucf101/ucfTrainTestlist "
     "--split 1 --out data/ucf101/lists/split1"),
    ("2. per-frame RGB features, once (resumable)", "for s in train val test; do\n  eleatt extract --list "
     "data/ucf101/lists/split1/$s.txt --root data/ucf101/videos \\\n      --out data/ucf101/features/rgb "
     "--backbone resnet50 --weights imagenet\ndone"),
    ("3. train the RGB stream", "eleatt fit --config configs/ucf101_rgb.yaml --run_name ucf101-s1"),
    ("4. test it (scores_test.npz, confusion_test.png)",
     "eleatt test --config configs/ucf101_rgb.yaml --ckpt_path checkpoints/ucf101-s1/best.ckpt"),
    ("5. classify new videos", "eleatt classify my_video.mp4 --ckpt checkpoints/ucf101-s1/best.ckpt --topk 5"),
    ("6. look at the attention of one video", "eleatt visualize --ckpt checkpoints/ucf101-s1/best.ckpt "
     "--video my_video.mp4 --out checkpoints/ucf101-s1/visualize"),
]


def _stage(number: int, title: str) -> float:
    print(f"\n== [{number}/{STAGES}] {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    print(f"   -> {what} ({time.perf_counter() - start:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = dict(QUICK if args.quick else FULL)
    for key, value in (("backbone", args.backbone), ("epochs", args.epochs),
                       ("videos_per_class", args.videos_per_class)):
        if value is not None:
            opts[key] = value
    if not CONFIG.is_file():
        raise FileNotFoundError(f"config '{CONFIG}' not found: the installation lacks its configs; reinstall eleatt")
    from pipeline.paths import ensure_writable_dir

    out = ensure_writable_dir(Path(args.out), "--out").resolve()
    # The videos are regenerated on every run, so features are kept per dataset: a rerun with other sizes or seed
    # into the same --out must not resume (skip) from features of different videos.
    dataset_tag = f"{opts['videos_per_class']}v{opts['num_frames']}f{opts['size']}px-seed{args.seed}"
    data, runs = out / "data", out / "checkpoints"
    features = out / "features" / f"{opts['backbone']}-{dataset_tag}"
    total = time.perf_counter()

    from preprocessing.synthetic import make_dataset

    t = _stage(1, f"prepare synthetic: {opts['videos_per_class']} videos a class, {opts['num_frames']} frames, "
                  f"{opts['size']}x{opts['size']} -> {data}")
    summary = make_dataset(data, videos_per_class=opts["videos_per_class"], num_frames=opts["num_frames"],
                           size=opts["size"], seed=args.seed)
    counts = summary["counts"]
    _done(t, f"{summary['num_videos']} H.264 videos in {len(summary['classes'])} classes "
             f"(train {counts['train']}, val {counts['val']}, test {counts['test']}): {', '.join(summary['classes'])}")

    from pipeline.data.lists import read_list, write_list

    t = _stage(2, f"extract: per-frame {opts['backbone']} features (weights {args.weights}) -> {features}")
    everything = data / "all.txt"
    write_list(everything, [e for split in ("train", "val", "test") for e in read_list(data / f"{split}.txt")])
    from preprocessing.extract import main as extract_main

    code = extract_main(["--list", str(everything), "--root", str(data), "--out", str(features),
                         "--backbone", opts["backbone"], "--weights", args.weights, "--no-progress"])
    if code != 0:
        print(f"eleatt demo: extraction ended with exit status {code}; see above", file=sys.stderr)
        return code
    _done(t, f"features of {summary['num_videos']} videos in {features}")

    from pipeline.lit_cli import main as lightning_main

    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    common = ["--config", str(CONFIG), "--data.features_dir", str(features),
              "--data.train_list", str(data / "train.txt"), "--data.val_list", str(data / "val.txt"),
              "--data.test_list", str(data / "test.txt"), "--data.num_workers", "0",
              "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--seed_everything", str(args.seed), *TRAINING]
    t = _stage(3, f"fit: EleAtt-LSTM ({opts['hidden']} units) on the feature sequences, {opts['epochs']} epochs")
    code = lightning_main(["fit", *common, "--run_name", run_name, "--trainer.max_epochs", str(opts["epochs"]),
                           "--model.hidden_size", str(opts["hidden"])])
    if code != 0:
        return code
    run = runs / run_name
    best = run / "best.ckpt"
    _done(t, f"checkpoints in {run}")

    t = _stage(4, f"test: {best}")
    code = lightning_main(["test", *common, "--model.hidden_size", str(opts["hidden"]), "--ckpt_path", str(best)])
    if code != 0:
        return code
    from pipeline.scores import accuracy_summary, read_scores

    scores = read_scores(run / "scores_test.npz")
    metrics = accuracy_summary(scores["scores"], scores["labels"])
    _done(t, f"test top-1 {metrics['top1']:.1%} on {len(scores['videos'])} videos "
             f"(chance {1 / scores['scores'].shape[1]:.1%})")

    from pipeline.inference import VideoClassifier

    tests = read_list(data / "test.txt")
    picks = [tests[i] for i in range(0, len(tests), max(1, len(tests) // 4))][:4]
    t = _stage(5, f"classify {len(picks)} test videos from their files with {best.name}")
    model = VideoClassifier(best, device="cpu")
    names = list(scores["classes"])
    agree = 0
    for entry in picks:
        pred = model(data / entry.path, topk=3)
        row = int(list(scores["videos"]).index(entry.path))
        agree += pred.labels[0] == int(scores["scores"][row].argmax())
        top = ", ".join(f"{n} {p:.0%}" for n, p in zip(pred.names, pred.probs))
        print(f"   {entry.path}  (true: {names[entry.label]})  ->  {top}")
    _done(t, f"top-1 agrees with `test` for {agree} of {len(picks)} videos")

    from pipeline.report import Stream

    t = _stage(6, f"report: order-blind baseline, curves, confusion, attention -> {run}")
    report, baseline = write_demo_report(run, [Stream("RGB", run / "scores_test.npz", run)], features, data, best,
                                         picks, seed=args.seed)
    _done(t, f"order-blind baseline (linear on the mean RGB feature) top-1 {baseline['top1']:.1%} vs RGB EleAtt-LSTM "
             f"{metrics['top1']:.1%}; report {report.name} with {len(list(run.glob('*.png')))} pictures")

    print(f"\ndemo done in {time.perf_counter() - total:.0f} s: test top-1 {metrics['top1']:.1%}, "
          f"mean class accuracy {metrics['mca']:.1%}; run folder {run}")
    print(f"report: {report.resolve()}")
    return 0


def write_demo_report(out: Path, streams: list, features: Path, data: Path, ckpt: Path, videos: list,
                      seed: int = 0, commands: list[tuple[str, str]] | None = None) -> tuple[Path, dict]:
    """The demo's report in the folder `out`: the table of `streams` (pipeline.report.Stream, e.g. RGB, flow, fused) plus the
    order-blind baseline on the RGB `features`, curves, confusion matrices, and the attention picture of the RGB
    checkpoint `ckpt` on a few of `videos` (list entries under `data`). Returns (report.html, baseline)."""
    from tqdm import tqdm

    from pipeline.baseline import order_blind_baseline
    from pipeline.data.features import FeatureFolder
    from pipeline.report import write_report
    from pipeline.visualize import attention_picture, load_sequence_model

    shown = videos[:3]
    with tqdm(total=3, desc="report", unit="step", leave=False) as bar:
        bar.set_postfix_str("order-blind baseline")
        baseline = order_blind_baseline(features, data / "train.txt", data / "test.txt", seed=seed)
        baseline["note"] = "linear classifier on the mean RGB frame feature (blind to order)"
        bar.update()
        bar.set_postfix_str("attention picture")
        model = load_sequence_model(ckpt)
        folder = FeatureFolder(features)
        names = model.class_names
        picture, _ = attention_picture(
            model, [folder.load(e.path) for e in shown], out / "attention.png",
            titles=[f"{e.path} (true: {names[e.label]})" for e in shown], videos=[data / e.path for e in shown])
        bar.update()
        bar.set_postfix_str("report")
        report = write_report(
            out, streams, baselines={"order-blind baseline": baseline}, attention=picture,
            commands=commands or REAL_COMMANDS, title="eleatt demo: EleAtt-LSTM on the generated order-only dataset",
            intro="The classes of this generated dataset differ only in temporal order (grow vs. shrink, move right "
                  "vs. left, ...), so a model that ignores order cannot tell the two classes of a pair apart. "
                  "Figures measured in this run.")
        bar.update()
    return report, baseline
