"""Online recognition latency: time per frame of `StreamingClassifier`, split into decode, backbone and recurrent step.

    python -m pipeline.benchmarks.stream            # resnet18 and resnet50 at 224x224, 25 fps source, 8 steps/s
    python -m pipeline.benchmarks.stream --quick    # the same table on a shorter video (seconds)

For each backbone (random weights, `weights="none"`: speed does not depend on their values) a checkpoint is written
to a temporary folder: an EleAtt-LSTM (one layer, 512 units, the paper's) on that backbone's
features, trained on features sampled at 8 frames/s. A generated lossless H.264 video (25 frames/s) is then decoded
incrementally with PyAV, as `eleatt classify --stream` does, and each sampled frame is timed through its two parts at
batch 1: the backbone (`VideoClassifier.encode`: resize, crop, normalise, network, float16 round trip) and the
recurrent step (`SequenceClassifier.stream`: one step of the stack with its carried state, and the head). Per step,
decode counts the source frames decoded for it (25 / 8). `realtime` = seconds of video per second of compute at
8 steps/s (>= 1: keeps up with a live source). Target: with resnet18-sized (512-d) features the recurrent step costs
under 10% of the backbone (`rnn/backbone`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from pipeline.errors import quiet_broken_pipe

SOURCE_FPS = 25
STEP_FPS = 8.0


def make_checkpoint(path: Path, backbone: str, hidden: int = 512, num_classes: int = 10) -> int:
    """Writes a checkpoint like `eleatt fit` makes on `backbone` features sampled at STEP_FPS; returns D."""
    from pipeline.data.features import FeatureSettings
    from pipeline.data.sampling import Sampling
    from pipeline.trained.record import RECORD_KEY
    from pipeline.training.module import EleAttClassifier
    from pipeline.nn.backbone import FrameEncoder

    encoder = FrameEncoder(backbone, weights="none")
    dim = encoder.num_features
    settings = FeatureSettings(backbone=backbone, weights="none", data_config=dict(encoder.data_config),
                               sampling=Sampling(fps=STEP_FPS), dim=dim).to_json()
    model = EleAttClassifier(dim, num_classes, hidden_size=hidden, extraction_settings=settings,
                             class_names=[f"class_{i}" for i in range(num_classes)])
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(),
                RECORD_KEY: model.trained_stream().to_dict()}, path)
    return dim


def _ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def bench(backbone: str, video: Path, tmp: Path) -> dict:
    import warnings

    from pipeline.serving.streaming import StreamingClassifier, decode_frames, open_stream

    ckpt = tmp / f"{backbone}.ckpt"
    dim = make_checkpoint(ckpt, backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = StreamingClassifier(ckpt, device="cpu")
    decode, backbone_s, rnn, push = [], [], [], []
    state = None
    container = open_stream(str(video))
    with torch.inference_mode():
        for frames, _, fps, decode_s in decode_frames(container):
            decode.append(decode_s)
            start = time.perf_counter()
            out = stream.push(frames, fps=fps)  # the whole online path, for the end-to-end figure
            if len(out):
                push.append(time.perf_counter() - start)
                # the same step again, part by part (a separate state, so `stream` is not disturbed)
                t0 = time.perf_counter()
                feats = stream.video.encode(torch.from_numpy(frames))  # (1, 1, D)
                t1 = time.perf_counter()
                _, state = stream.net.stream(stream.video.normalizer(feats), state)
                t2 = time.perf_counter()
                backbone_s.append(t1 - t0)
                rnn.append(t2 - t1)
    container.close()
    warm = slice(2, None)  # the first steps pay one-off costs (allocator, kernels)
    per_step_decode = statistics.median(decode) * SOURCE_FPS / STEP_FPS
    per_step = per_step_decode + statistics.median(push[warm])
    return {"backbone": backbone, "dim": dim, "steps": len(push), "decode_ms": 1e3 * per_step_decode,
            "backbone_ms": _ms(backbone_s[warm]), "rnn_ms": _ms(rnn[warm]), "push_ms": _ms(push[warm]),
            "ratio": statistics.median(rnn[warm]) / statistics.median(backbone_s[warm]),
            "realtime": (1.0 / STEP_FPS) / per_step}


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter video (2 s instead of 8 s)")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"], help="timm names")
    parser.add_argument("--size", type=int, default=224, help="frame size of the generated video (default 224)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from preprocessing.synthetic import render_video, video_seed, write_lossless_video

    seconds = 2 if args.quick else 8
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        video = tmp / "stream.mp4"
        write_lossless_video(video, render_video("grow", video_seed(0, "grow", 0), seconds * SOURCE_FPS, args.size),
                             fps=SOURCE_FPS)
        print(f"online recognition on {torch.get_num_threads()} CPU threads: {seconds} s of {args.size}x{args.size} "
              f"video at {SOURCE_FPS} fps, {STEP_FPS:g} steps/s, batch 1, EleAtt-LSTM 512 units; ms per step "
              "(median after 2 warm-up steps)")
        header = f"{'backbone':<12} {'D':>5} {'steps':>5} {'decode':>8} {'backbone':>9} {'rnn':>7} {'push':>8} " \
                 f"{'rnn/backbone':>13} {'realtime':>9}"
        print(header)
        verdicts = []  # the target is stated for resnet18-sized (512-d) features
        for name in args.backbones:
            r = bench(name, video, tmp)
            print(f"{r['backbone']:<12} {r['dim']:>5} {r['steps']:>5} {r['decode_ms']:>8.1f} {r['backbone_ms']:>9.1f} "
                  f"{r['rnn_ms']:>7.2f} {r['push_ms']:>8.1f} {r['ratio']:>12.1%} {r['realtime']:>8.2f}x", flush=True)
            if r["dim"] == 512:
                verdicts.append(r["ratio"] < 0.10)
        verdict = "no 512-d backbone run" if not verdicts else "met" if all(verdicts) else "NOT met"
        print(f"target (recurrent step < 10% of the backbone with 512-d features, e.g. resnet18): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
