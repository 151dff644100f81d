"""`make gpu-check`: every check that needs a GPU, then the GPU benchmarks, in one run with one JSON and one table.

    python -m pipeline.benchmarks.gpu_check [--out DIR] [--dry] [--steps STEP ...] [--budget SECONDS]

With a CUDA device (about 3-5 minutes on one GPU; `--budget`, default 420 s, skips what would start after it):

1. ``tests``: `pytest -m gpu tests/test_gpu.py`: the recurrent kernel on CUDA equals the reference (float64 and
   float32, every gradient), under autocast it computes in float32, `eleatt extract` with float16 autocast on CUDA
   equals float32 on the CPU within 2%, `eleatt fit` trains a few steps on CUDA, RAFT on CUDA equals the CPU;
2. ``recurrent``: EleAttLSTM / EleAttGRU against cuDNN's nn.LSTM / nn.GRU, forward (no grad) and forward+backward,
   D=2048, H=512, T=25 at B=32 and B=256 (target: within 2.5x cuDNN);
3. ``extraction``: resnet50 (random weights) frames/s, the backbone alone and `eleatt extract` end to end, float32
   and bfloat16 autocast;
4. ``training``: end-to-end training clips/s (resnet18 fine-tuned, EleAtt-LSTM, 8 x 112^2 clips);
5. ``raft``: RAFT (random raft_small / raft_large weights, 12 updates) frame pairs/s at 340x256.

Without a CUDA device, or with `--dry`, it runs in dry mode, in a minute or two: the same tests on the CPU
(`ELEATT_GPU_TESTS_DEVICE=cpu`, bfloat16 autocast in place of float16) and every benchmark at tiny sizes on the
CPU, so that nothing it would run on a GPU can rot; its figures measure nothing, and the output says so.

Writes DIR/gpu_check.json (environment, and per step: status, seconds, figures, the command that reproduces it) and
DIR/gpu_check.md (the table, also printed). Exit 0 when every step ran and every test passed, 1 otherwise (the table
says which step and why), 2 for bad options.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from pipeline.errors import quiet_broken_pipe
from pipeline.paths import atomic_write, ensure_writable_dir

REPO = Path(__file__).resolve().parents[2]
STEPS = ("tests", "recurrent", "extraction", "training", "raft")
RECURRENT_TARGET = 2.5  # EleAtt layer time / cuDNN's, forward+backward, on a GPU


@dataclass
class Figure:
    """One measured value: `what` (e.g. "EleAttGRU fwd+bwd, B=32"), value and unit, and an optional comparison."""
    what: str
    value: float
    unit: str
    ratio: float | None = None  # value / the reference's (x nn.LSTM, ...)
    reference: str = ""
    target: str = ""


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok | failed | skipped
    seconds: float = 0.0
    command: str = ""
    note: str = ""
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Context:
    device: str
    dry: bool
    tmp: Path
    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: str, dry: bool) -> dict:
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "device": device, "dry": dry,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# --------------------------------------------------------------------------------------------------------------
# The steps: each fills step.figures (and step.note) or raises
# --------------------------------------------------------------------------------------------------------------
def run_tests(ctx: Context, step: Step) -> None:
    tests = REPO / "tests" / "test_gpu.py"
    if not tests.is_file():
        raise FileNotFoundError(f"{tests} not found: the GPU tests come with a source checkout")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if ctx.dry:
        env["ELEATT_GPU_TESTS_DEVICE"] = "cpu"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(tests)]
    step.command = ("ELEATT_GPU_TESTS_DEVICE=cpu " if ctx.dry else "") + "python -m pytest -q -m gpu tests/test_gpu.py"
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(30.0, min(300.0, ctx.left())))
    except subprocess.TimeoutExpired:
        raise TimeoutError("the GPU tests did not finish in time") from None
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    for part in last.replace(" in ", ", ").split(", "):
        words = part.split()
        if len(words) >= 2 and words[0].isdigit() and words[1].rstrip("s") in counts:
            counts[words[1].rstrip("s")] = int(words[0])
    step.figures = [Figure(f"tests {k}", float(v), "tests") for k, v in counts.items() if v or k == "passed"]
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if done.returncode != 0 or counts["failed"] or counts["error"] or not counts["passed"]:
        raise AssertionError(f"pytest exit {done.returncode}: {last or done.stderr.strip()[-300:]}"
                             + (f"; {'; '.join(failures[:5])}" if failures else ""))
    step.note = last


def run_recurrent(ctx: Context, step: Step) -> None:
    from torch import nn

    from pipeline.benchmarks.rnn import Row, measure
    from pipeline.nn.eleatt import EleAttGRU, EleAttLSTM

    setups = [("B=32", 2048, 512, 25, 32), ("B=256", 2048, 512, 25, 256)]
    repeats, warmup = 10, 3
    if ctx.dry:
        setups, repeats, warmup = [("B=4", 32, 16, 5, 4)], 2, 1
    device = torch.device(ctx.device)
    step.command = f"python -m pipeline.benchmarks.rnn --device {ctx.device} --setups rgb-b32 rgb-b256"
    for label, d, h, t, b in setups:
        torch.manual_seed(0)
        rows = [Row("nn.LSTM", "nn.LSTM", nn.LSTM(d, h)), Row("EleAttLSTM", "nn.LSTM", EleAttLSTM(d, h)),
                Row("nn.GRU", "nn.GRU", nn.GRU(d, h)), Row("EleAttGRU", "nn.GRU", EleAttGRU(d, h))]
        for row in rows:
            row.module.to(device)
        measure(rows, torch.randn(t, b, d, device=device), repeats, warmup)
        med = {r.name: (statistics.median(r.fwd), statistics.median(r.fwdbwd)) for r in rows}
        for row in rows:
            for i, kind in enumerate(("fwd", "fwd+bwd")):
                ours = row.name.startswith("EleAtt")
                step.figures.append(Figure(
                    f"{row.name} {kind}, D={d} H={h} T={t} {label}", med[row.name][i], "ms",
                    med[row.name][i] / med[row.ref][i] if ours else None, f"x {row.ref}" if ours else "",
                    f"<= {RECURRENT_TARGET}x" if ours else ""))


def run_extraction(ctx: Context, step: Step) -> None:
    from pipeline.benchmarks.extract import backbone_alone, make_videos
    from preprocessing.extract import default_workers, extract, quiet_extraction_logs

    quiet_extraction_logs()
    if ctx.dry:
        name, batch, videos, frames, size, seconds, precisions = "test_resnet", 4, 2, 8, 64, 0.5, ("32", "bf16")
    else:
        name, batch, videos, frames, size, seconds, precisions = "resnet50", 64, 16, 64, 256, 5.0, ("32", "bf16")
    workers = 0 if ctx.dry else default_workers(ctx.device)
    step.command = (f"python -m pipeline.benchmarks.extract --device {ctx.device} --backbones {name} "
                    f"--batch-size {batch} --precisions {' '.join(precisions)}")
    root = ctx.tmp / "extraction"
    list_path = make_videos(root, videos, frames, size)
    for precision in precisions:
        alone = backbone_alone(name, batch, ctx.device, precision, False, seconds)
        summary = extract(list_path, root, root / f"out-{precision}", name, weights="none", batch_size=batch,
                          workers=workers, device=ctx.device, precision=precision, progress=False)
        if summary.failed or summary.done != videos:
            raise AssertionError(f"extraction failed: {summary.failed}")
        stats = summary.stats
        step.figures += [Figure(f"{name} precision {precision}, backbone alone, batch {batch}", alone, "frames/s"),
                         Figure(f"{name} precision {precision}, eleatt extract end to end ({workers} workers)",
                                stats.steady_rate, "frames/s", stats.steady_rate / alone, "x backbone alone")]


def run_training(ctx: Context, step: Step) -> None:
    from pipeline.benchmarks.train import bench_end_to_end, make_videos

    args = argparse.Namespace(backbone="resnet18", frame_size=112, segments=8, batch_size=16, workers=8, steps=20,
                              warmup=3, hidden_size=512, frames=64, video_size=128, device=ctx.device)
    if ctx.dry:
        args = argparse.Namespace(backbone="test_resnet", frame_size=64, segments=4, batch_size=2, workers=0,
                                  steps=2, warmup=1, hidden_size=32, frames=16, video_size=64, device=ctx.device)
    args.workers = min(args.workers, max(0, (os.cpu_count() or 1) - 1))
    step.command = (f"python -m pipeline.benchmarks.train --device {ctx.device} --batch-size {args.batch_size} "
                    f"--workers {args.workers} --steps {args.steps}")
    per_class = max(4, -(-2 * args.batch_size * (args.warmup + args.steps) // 10))
    videos = make_videos(ctx.tmp / "training" / "videos", per_class, args.frames, args.video_size)
    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|eval mode at the start|LeafSpec).*")
    result = bench_end_to_end(videos, args, ctx.tmp / "training")
    step.figures += [
        Figure(f"end-to-end training, {args.backbone} + EleAtt-LSTM {args.hidden_size}, {args.segments} x "
               f"{args.frame_size}^2 clips, batch {args.batch_size}", result["clips_per_s"], "clips/s"),
        Figure("share of the step waiting for data", 100 * result["wait_share"], "%")]


def run_raft(ctx: Context, step: Step) -> None:
    from torchvision.models.optical_flow import raft_large, raft_small

    from pipeline.benchmarks.flow import generated_frames
    from pipeline.data.flow_estimation import RaftFlow

    variants = {"raft_small": raft_small} if ctx.dry else {"raft_small": raft_small, "raft_large": raft_large}
    frames = generated_frames(3 if ctx.dry else 25, (128, 136) if ctx.dry else (256, 340))
    step.command = "python -m pipeline.benchmarks.gpu_check --steps raft"
    for name, build in variants.items():
        torch.manual_seed(0)
        weights = ctx.tmp / f"{name}.pth"
        torch.save(build(weights=None).state_dict(), weights)
        estimator = RaftFlow(weights, "fast", device=ctx.device)
        images = estimator.prepare(frames, frames.shape[1:3])
        for _ in estimator.flows(images[:3]):  # warm-up (cuDNN's algorithm choice)
            pass
        _sync(ctx.device)
        start = time.perf_counter()
        pairs = sum(1 for _ in estimator.flows(images))
        _sync(ctx.device)
        step.figures.append(Figure(f"{name}, 12 updates, {frames.shape[2]}x{frames.shape[1]}, batches of pairs",
                                   pairs / (time.perf_counter() - start), "pairs/s"))


RUNNERS: dict[str, Callable[[Context, Step], None]] = {
    "tests": run_tests, "recurrent": run_recurrent, "extraction": run_extraction, "training": run_training,
    "raft": run_raft,
}


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------
def table(env: dict, steps: list[Step]) -> str:
    where = (f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')})"
             if not env["dry"] else "DRY RUN on the CPU: " + ("no CUDA device found" if not env["cuda_available"]
                                                              else "--dry given") +
             "; the tests ran on the CPU and the benchmarks at tiny sizes: these figures measure nothing on a GPU")
    lines = [f"# gpu-check: {where}", "",
             f"torch {env['torch']}, Python {env['python']}, {env['cpus']} CPUs, triton {env.get('triton')}", "",
             "| step | status | seconds | what | value | vs | target |", "|---|---|---:|---|---:|---:|---|"]
    for s in steps:
        head = f"| {s.name} | {s.status} | {s.seconds:.1f} |"
        if not s.figures:
            lines.append(f"{head} {s.note or '-'} | | | |")
        for i, f in enumerate(s.figures):
            ratio = f"{f.ratio:.2f} {f.reference}" if f.ratio is not None else ""
            lines.append(f"{head if i == 0 else '| | | |'} {f.what} | {f.value:.3g} {f.unit} | {ratio} | {f.target} |")
        if s.figures and s.status != "ok" and s.note:
            lines.append(f"| | | | {s.note} | | | |")
    lines += ["", "Commands that reproduce each step:", ""]
    lines += [f"- {s.name}: `{s.command}`" for s in steps if s.command]
    return "\n".join(lines) + "\n"


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build") / "gpu-check",
                        help="folder for gpu_check.json and gpu_check.md (default build/gpu-check)")
    parser.add_argument("--dry", "--quick", action="store_true",
                        help="the dry mode even with a GPU: tiny sizes on the CPU (what CI runs without a GPU)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default all)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds: a step that would start later is skipped (default 420; the run stays under 8 "
                             "minutes on one GPU)")
    parser.add_argument("--device", default="cuda", help="the CUDA device to check (default cuda)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0, got {args.budget}")
    try:
        ensure_writable_dir(args.out, "--out folder", create=True)
    except (ValueError, OSError) as err:
        print(f"gpu-check: error: {err}", file=sys.stderr)
        return 2
    dry = args.dry or not torch.cuda.is_available()
    device = "cpu" if dry else args.device
    env = environment(device, dry)
    if dry:
        why = "no CUDA device found" if not torch.cuda.is_available() else "--dry given"
        print(f"gpu-check: DRY RUN ({why}): the GPU tests run on the CPU and each benchmark at tiny sizes, so that "
              f"they cannot rot; on a GPU this would measure: the GPU tests, EleAttLSTM/GRU vs cuDNN (forward and "
              f"forward+backward, B=32 and 256), resnet50 extraction frames/s, end-to-end training clips/s and "
              f"RAFT pairs/s", flush=True)
    steps = [Step(name) for name in args.steps]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="eleatt-gpu-check-") as tmp:
        ctx = Context(device, dry, Path(tmp), start + args.budget)
        for step in steps:
            if ctx.left() <= 0:
                step.status, step.note = "skipped", f"time budget of {args.budget:.0f} s spent"
                continue
            print(f"gpu-check: {step.name} ...", file=sys.stderr, flush=True)
            began = time.monotonic()
            try:
                RUNNERS[step.name](ctx, step)
                step.status = "ok"
            except KeyboardInterrupt:
                step.status, step.note = "failed", "interrupted"
                steps_left = steps[steps.index(step) + 1:]
                for other in steps_left:
                    other.status, other.note = "skipped", "interrupted"
                step.seconds = time.monotonic() - began
                break
            except Exception as err:  # a failing step is reported, and the others still run
                step.status = "failed"
                step.note = f"{type(err).__name__}: {err}".splitlines()[0][:500]
                print(traceback.format_exc(), file=sys.stderr)
            step.seconds = time.monotonic() - began
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    env["seconds"] = round(time.monotonic() - start, 1)
    text = table(env, steps)
    report = {"environment": env, "steps": [asdict(s) for s in steps]}
    with atomic_write(args.out / "gpu_check.json", "w") as f:
        json.dump(report, f, indent=1, default=float)
    with atomic_write(args.out / "gpu_check.md", "w") as f:
        f.write(text)
    print(text)
    print(f"gpu-check: {'dry run ' if dry else ''}{sum(s.status == 'ok' for s in steps)} of {len(steps)} steps ok "
          f"in {env['seconds']:.0f} s; wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
