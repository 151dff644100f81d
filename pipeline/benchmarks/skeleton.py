"""The time of one NTU-sized training epoch of the skeleton recipe, so that users can plan.

`python -m pipeline.benchmarks.skeleton` trains, on generated data, the paper's skeleton network (3 x 100
EleAtt-GRU on 150-d inputs, 60 classes, dropout 0.5, Adam lr 5e-3, gradients clipped at 1) for one epoch of NTU RGB+D
60's size (40,000 sequences of 100 steps, batch 256: 157 optimiser steps), and beside it the same stack without
gates (the `_gru` baseline) and torch's `nn.GRU`, interleaved batch by batch so that load from other processes hits
every network alike. `--quick` times a few batches and extrapolates to the epoch (and says so). The random rotation
augmentation's cost per batch is printed too.

`--gate` measures accuracy instead of time: the EleAtt-GRU against the same GRU without gates on a generated
skeleton set whose classes live in a few joints among many (`generated_skeletons`: the other joints move in the
patterns of random classes), trained alike for each of `--seeds` seeds; it prints the test top-1 per seed and the
mean. `--streams` measures what storing the derived streams (bone, joint/bone motion) costs against deriving them
when a sample is read: time per sample and bytes on disk.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import numpy as np

from pipeline.data.skeleton import FEATURE_DIM, NUM_JOINTS, STREAMS, SkeletonRotation, derive_stream
from pipeline.errors import quiet_broken_pipe
from pipeline.nn.classifier import SequenceClassifier

POOL = 4  # generated batches cycled: the content of a batch does not change its time


class TorchGRUClassifier(nn.Module):
    """The reference: torch's fused nn.GRU stack with the same head as SequenceClassifier (last step)."""

    def __init__(self, input_size: int, num_classes: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.rnn = nn.GRU(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, feats: Tensor) -> Tensor:  # feats (B, T, D) -> logits (B, C)
        return self.head(self.dropout(self.rnn(feats)[0][:, -1]))


@dataclass
class Row:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)

    @property
    def gate_params(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters()
                   if n.rsplit(".", 1)[-1].split("_l")[0] in ("weight_xa", "weight_ha", "bias_a"))


def build_rows(dim: int, hidden: int, layers: int, classes: int, lr: float, device: torch.device) -> list[Row]:
    models = [
        ("EleAtt-GRU", SequenceClassifier(dim, classes, cell="gru", hidden_size=hidden, num_layers=layers,
                                          dropout=0.5)),
        ("GRU (no gate, same kernel)", SequenceClassifier(dim, classes, cell="gru", hidden_size=hidden,
                                                          num_layers=layers, attention_layers=0, dropout=0.5)),
        ("nn.GRU", TorchGRUClassifier(dim, classes, hidden, layers, dropout=0.5)),
    ]
    rows = []
    for name, model in models:
        model.to(device).train()
        rows.append(Row(f"{name} {layers}x{hidden}", model, torch.optim.Adam(model.parameters(), lr=lr)))
    return rows


def train_step(row: Row, feats: Tensor, labels: Tensor) -> None:
    """One optimiser step of the recipe: forward, cross-entropy, backward, clip at 1, Adam."""
    row.optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(row.model(feats), labels)
    loss.backward()
    nn.utils.clip_grad_norm_(row.model.parameters(), 1.0)
    row.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PATTERNS = ("wave", "drift")
INFORMATIVE = (7, 11, 15, 19, 3, 23)  # 0-based: NTU joints 8 and 12 (hands), 16 and 20 (feet), 4 (head), 24


def generated_skeletons(num: int, classes: int = 6, steps: int = 20, informative=(7, 11), pattern: str = "wave",
                        amplitude: float = 0.1, jitter: float = 0.03, pose: float = 0.03,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A generated skeleton set whose class lives in a few joints among many: float32 (num, steps, 150) in the
    stored layout (body 1 absent: zeros) and int64 labels (num,), classes balanced and shuffled.

    Body 0 is one random standing pose (0.5 m wide, 1.6 m tall), the same for every sample up to `pose` metres of
    noise per coordinate (fixed over the sample's frames). Every one
    of its 25 joints moves in the pattern of a class: the `informative` joints (0-based) in the sample's class,
    every other joint in a class drawn at random, so no joint alone tells an informative one from a distractor;
    `jitter` metres of noise on every coordinate of every frame. Patterns, class c of C:
      wave:  amplitude x sin(2 pi f_c t / steps + random phase) along the direction at angle pi c / C in the x-y
             plane, f_c = 1, 1.5, 2 cycles by c mod 3;
      drift: amplitude x t / steps along the direction at angle 2 pi c / C (a steady walk of `amplitude` metres).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r}: choose one of {PATTERNS}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num) % classes)
    base = rng.uniform(-0.5, 0.5, size=(NUM_JOINTS, 3)) * [0.5, 1.6, 0.3]
    angle = (np.pi if pattern == "wave" else 2 * np.pi) * np.arange(classes) / classes
    cycles = 1.0 + 0.5 * (np.arange(classes) % 3)
    t = np.arange(steps)[:, None] / steps  # (T, 1)
    feats = np.zeros((num, steps, 2, NUM_JOINTS, 3))
    for i, label in enumerate(labels):
        kinds = rng.integers(classes, size=NUM_JOINTS)
        kinds[list(informative)] = label
        if pattern == "wave":
            phase = rng.uniform(0, 2 * np.pi, size=NUM_JOINTS)
            path = np.sin(2 * np.pi * cycles[kinds] * t + phase)  # (T, V)
        else:
            path = np.broadcast_to(t, (steps, NUM_JOINTS))
        direction = np.stack([np.cos(angle[kinds]), np.sin(angle[kinds]), np.zeros(NUM_JOINTS)], axis=-1)  # (V, 3)
        feats[i, :, 0] = (base + rng.normal(scale=pose, size=(NUM_JOINTS, 3)) + amplitude * path[..., None] * direction
                          + rng.normal(scale=jitter, size=(steps, NUM_JOINTS, 3)))
    return feats.reshape(num, steps, -1).astype(np.float32), labels.astype(np.int64)


def train_classifier(model: nn.Module, feats: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int,
                     lr: float, seed: int) -> nn.Module:
    """The recipe on arrays: Adam, cross-entropy, gradients clipped at 1, shuffled batches (seeded)."""
    row = Row("", model, torch.optim.Adam(model.parameters(), lr=lr))
    x, y = torch.from_numpy(feats), torch.from_numpy(labels)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            train_step(row, x[idx], y[idx])
    return model.eval()


def predict_probs(model: nn.Module, feats: np.ndarray, batch_size: int = 256) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([torch.softmax(model(torch.from_numpy(feats[i:i + batch_size])), -1).numpy()
                               for i in range(0, len(feats), batch_size)])


def gate_networks(classes: int, hidden: int, layers: int) -> dict[str, SequenceClassifier]:
    """The two networks `--gate` compares: the EleAtt-GRU of the recipe ("eleatt") and the same stack without
    gates ("plain", attention_layers=0), dropout 0.5, on 150-d skeletons."""
    return {key: SequenceClassifier(FEATURE_DIM, classes, cell="gru", hidden_size=hidden, num_layers=layers,
                                    attention_layers=gates, dropout=0.5)
            for key, gates in (("eleatt", None), ("plain", 0))}


def gate_benchmark(args: argparse.Namespace) -> int:
    """EleAtt-GRU vs the same GRU without gates on `generated_skeletons`, per seed and on average."""
    informative = INFORMATIVE[:args.informative]
    print(f"### The gate on generated skeletons: {args.classes} classes in {args.informative} of 25 joints "
          f"(0-based {', '.join(map(str, informative))}), pattern {args.pattern}, {args.train} training and "
          f"{args.test} test sequences of {args.steps} steps; {args.layers} x {args.hidden} GRU, dropout 0.5, Adam "
          f"lr {args.lr:g}, batch {args.batch_size}, {args.epochs} epochs, clipping at 1; "
          f"{torch.get_num_threads()} threads")
    print()
    print("| seed | EleAtt-GRU top-1 | GRU (no gate) top-1 |")
    print("|---:|---:|---:|")
    results: dict[str, list[float]] = {"eleatt": [], "plain": []}
    for seed in range(args.seeds):
        feats, labels = generated_skeletons(args.train + args.test, args.classes, args.steps, informative,
                                            args.pattern, args.amplitude, args.jitter, seed=seed)
        row = []
        for key in ("eleatt", "plain"):
            torch.manual_seed(seed)
            model = gate_networks(args.classes, args.hidden, args.layers)[key]
            train_classifier(model, feats[:args.train], labels[:args.train], args.epochs, args.batch_size, args.lr,
                             seed)
            top1 = float((predict_probs(model, feats[args.train:]).argmax(1) == labels[args.train:]).mean())
            results[key].append(top1)
            row.append(f"{top1:.1%}")
        print(f"| {seed} | {' | '.join(row)} |", flush=True)
    mean = {k: statistics.mean(v) for k, v in results.items()}
    spread = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in results.items()}
    print(f"| mean (sd) | {mean['eleatt']:.1%} ({spread['eleatt']:.1%}) | {mean['plain']:.1%} "
          f"({spread['plain']:.1%}) |")
    print()
    print(f"chance: {1 / args.classes:.1%}; the gate adds {100 * (mean['eleatt'] - mean['plain']):+.1f} points of "
          "test top-1 on average")
    return 0


def streams_benchmark(args: argparse.Namespace) -> int:
    """Stored vs derived-when-read: ms per sample to derive each stream against reading a stored sample, and the
    bytes a stream folder adds (float32 (T, 150) .npy per sample)."""
    import tempfile

    from pipeline.data.features import FeatureFolder

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.samples, args.steps, FEATURE_DIM)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = FeatureFolder(tmp)
        folder.check_settings({"modality": "skeleton", "dtype": "float32", "dim": FEATURE_DIM})
        for i, f in enumerate(feats):
            folder.write(f"s{i}.skeleton", f)
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.npy")) / args.samples
        start = time.perf_counter()
        for i in range(args.samples):
            folder.load(f"s{i}.skeleton")
        load_ms = (time.perf_counter() - start) * 1e3 / args.samples
    print(f"### Derived skeleton streams: {args.samples} samples of {args.steps} x {FEATURE_DIM} float32")
    print()
    print("| stream | derive ms / sample | x reading a stored sample | disk per sample (stored) |")
    print("|---|---:|---:|---:|")
    print(f"| read a stored sample (reference) | {load_ms:.3f} | 1.00 | {size / 1024:.1f} KiB |")
    for stream in STREAMS[1:]:
        start = time.perf_counter()
        for f in feats:
            derive_stream(f, stream)
        ms = (time.perf_counter() - start) * 1e3 / args.samples
        print(f"| {stream} | {ms:.3f} | {ms / load_ms:.2f} | {size / 1024:.1f} KiB |")
    print()
    print(f"NTU RGB+D 60 (56,880 samples of ~{args.steps} frames): {size * 56_880 / 2**30:.1f} GiB per stored stream")
    return 0


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.skeleton",
        description="Time one NTU-sized training epoch (generated data) of the 3 x 100 EleAtt-GRU skeleton recipe "
                    "against the same stack without gates and nn.GRU (float32, CPU unless --device).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="time --batches batches (default 3) and extrapolate to the epoch (seconds)")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches timed per network (default: the whole epoch; with --quick 3); fewer than "
                             "the epoch's are extrapolated")
    parser.add_argument("--sequences", type=int, default=40_000, help="sequences per epoch (default: NTU 60's ~40k)")
    parser.add_argument("--steps", type=int, default=None, help="time steps per sequence (default 100; --gate 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (the paper's; --gate 64)")
    parser.add_argument("--hidden", type=int, default=100, help="units per layer (default 100)")
    parser.add_argument("--layers", type=int, default=3, help="recurrent layers (default 3)")
    parser.add_argument("--classes", type=int, default=None, help="default 60 (--gate 6)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    gate = parser.add_argument_group("--gate: accuracy of the gate on generated skeletons")
    gate.add_argument("--gate", action="store_true", help="measure the gate's accuracy instead of the epoch's time")
    gate.add_argument("--seeds", type=int, default=3, help="seeds (data and initialisation) averaged (default 3)")
    gate.add_argument("--train", type=int, default=600, help="training sequences (default 600)")
    gate.add_argument("--test", type=int, default=300, help="test sequences (default 300)")
    gate.add_argument("--epochs", type=int, default=40, help="default 40")
    gate.add_argument("--informative", type=int, default=2,
                      help="joints that carry the class, of 25 (default 2: the hands)")
    gate.add_argument("--pattern", choices=PATTERNS, default="wave", help="the class's motion (default wave)")
    gate.add_argument("--amplitude", type=float, default=0.1, help="metres (default 0.1)")
    gate.add_argument("--jitter", type=float, default=0.03, help="noise per coordinate, metres (default 0.03)")
    gate.add_argument("--lr", type=float, default=5e-3, help="Adam's learning rate (default 5e-3, the recipe's)")
    parser.add_argument("--streams", action="store_true",
                        help="time deriving each skeleton stream against reading a stored sample, and its disk use")
    parser.add_argument("--samples", type=int, default=500, help="--streams: samples (default 500)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "streams" if args.streams else "gate" if args.gate else "epoch"
    steps, batch_size, classes = {"streams": (100, 256, 60), "gate": (20, 64, 6), "epoch": (100, 256, 60)}[mode]
    args.steps = steps if args.steps is None else args.steps
    args.classes = classes if args.classes is None else args.classes
    args.batch_size = batch_size if args.batch_size is None else args.batch_size  # --gate: ~10 steps an epoch
    checked = {"streams": ("samples", "steps"),
               "gate": ("seeds", "train", "test", "epochs", "informative", "classes", "steps", "batch_size", "hidden",
                        "layers"),
               "epoch": ("sequences", "steps", "batch_size", "hidden", "layers", "classes")}[mode]
    for name in checked:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if mode == "streams":
        if args.quick:
            args.samples = min(args.samples, 20)
        return streams_benchmark(args)
    if mode == "gate":
        if args.quick:  # seconds; its figures mean nothing
            args.seeds, args.train, args.test, args.epochs = 1, 60, 30, 2
        if args.informative > len(INFORMATIVE):
            parser.error(f"--informative: at most {len(INFORMATIVE)} joints")
        return gate_benchmark(args)
    epoch_batches = math.ceil(args.sequences / args.batch_size)
    batches = args.batches if args.batches is not None else (3 if args.quick else epoch_batches)
    if batches < 1:
        parser.error("--batches must be >= 1")
    batches = min(batches, epoch_batches)
    device = torch.device(args.device)
    torch.manual_seed(0)

    rows = build_rows(FEATURE_DIM, args.hidden, args.layers, args.classes, 5e-3, device)
    pool = [(torch.randn(args.batch_size, args.steps, FEATURE_DIM, device=device),
             torch.randint(args.classes, (args.batch_size,), device=device)) for _ in range(min(POOL, batches))]
    for row in rows:  # warm-up step (allocations, kernels), untimed
        train_step(row, *pool[0])
    for i in range(batches):
        feats, labels = pool[i % len(pool)]
        for row in rows:
            _sync(device)
            start = time.perf_counter()
            train_step(row, feats, labels)
            _sync(device)
            row.times.append(time.perf_counter() - start)

    # The augmentation runs per sample in the data loader: its cost per batch, on the CPU.
    rotate = SkeletonRotation(35.0)
    samples = [torch.randn(args.steps, FEATURE_DIM) for _ in range(args.batch_size)]
    start = time.perf_counter()
    for s in samples:
        rotate(s)
    rotation_ms = (time.perf_counter() - start) * 1e3

    extrapolated = batches < epoch_batches
    how = (f"extrapolated from {batches} timed batch(es) of {epoch_batches}" if extrapolated
           else f"all {epoch_batches} batches timed")
    reference = statistics.median(rows[-1].times)
    print(f"### One training epoch: {args.sequences} sequences x {args.steps} steps x {FEATURE_DIM}-d, batch "
          f"{args.batch_size}, {args.classes} classes ({how}; device {device}, {torch.get_num_threads()} threads)")
    print()
    print("| network | parameters | gate parameters | ms / batch (median) | epoch s | x nn.GRU |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        per_batch = statistics.median(row.times)
        epoch = per_batch * epoch_batches if extrapolated else sum(row.times)
        label = f"{epoch:.1f}" + (" (extrapolated)" if extrapolated else "")
        params = sum(p.numel() for p in row.model.parameters())
        print(f"| {row.name} | {params:,} | {row.gate_params:,} | {per_batch * 1e3:.1f} | {label} | "
              f"{per_batch / reference:.2f} |")
    print()
    print(f"rotation augmentation: {rotation_ms:.1f} ms per batch of {args.batch_size} samples "
          f"({rotation_ms * epoch_batches / 1e3:.1f} s per epoch, spread over the data-loader workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
