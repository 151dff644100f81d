"""The time of one NTU-sized training epoch of the skeleton recipe, so that users can plan.

`python -m pipeline.benchmarks.skeleton` trains, on generated data, the paper's skeleton network (3 x 100
EleAtt-GRU on 150-d inputs, 60 classes, dropout 0.5, Adam lr 5e-3, gradients clipped at 1) for one epoch of NTU RGB+D
60's size (40,000 sequences of 100 steps, batch 256: 157 optimiser steps), and beside it the same stack without
gates (the `_gru` baseline) and torch's `nn.GRU`, interleaved batch by batch so that load from other processes hits
every network alike. `--quick` times a few batches and extrapolates to the epoch (and says so). The random rotation
augmentation's cost per batch is printed too.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.data.skeleton import FEATURE_DIM, SkeletonRotation
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
    parser.add_argument("--steps", type=int, default=100, help="time steps per sequence (default 100)")
    parser.add_argument("--batch-size", type=int, default=256, help="default 256 (the paper's)")
    parser.add_argument("--hidden", type=int, default=100, help="units per layer (default 100)")
    parser.add_argument("--layers", type=int, default=3, help="recurrent layers (default 3)")
    parser.add_argument("--classes", type=int, default=60, help="default 60")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    for name in ("sequences", "steps", "batch_size", "hidden", "layers", "classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    epoch_batches = math.ceil(args.sequences / args.batch_size)
    batches = args.batches if args.batches is not None else (3 if args.quick else epoch_batches)
    if batches < 1:
        parser.error("--batches must be >= 1")
    batches = min(batches, epoch_batches)
    if args.threads:
        torch.set_num_threads(args.threads)
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
