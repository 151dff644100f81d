"""Benchmark of the EleAtt recurrent kernel against torch's fused LSTM/GRU and the naive cell loop.

`python -m pipeline.benchmarks.rnn` prints, per set-up, forward and forward+backward milliseconds (median over
interleaved repeats, so that load from other processes hits every implementation alike) and ratios:
`x nn` = time / time of nn.LSTM (LSTM rows) or nn.GRU (GRU rows); `naive / this` = speed-up over the naive
EleAtt loop of public code (nn.LSTMCell / nn.GRUCell with a Linear on cat(x_t, h_{t-1}) for the gate), forward
and forward+backward. A last table times one streaming step at batch 1 (no grad): EleAttLSTMCell (the readable
cell) and one step of an EleAttLSTM stack with its state carried (what streaming classification runs), against
one nn.LSTMCell step plus the gate's two products (W_xa x_t and W_ha h_{t-1}), the floor of an EleAtt step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from pipeline.errors import quiet_broken_pipe
from pipeline.nn.eleatt import EleAttGRU, EleAttLSTM, EleAttLSTMCell

# (name, D, H, T, B): the paper's NTU RGB set-up (ResNet-50 features; batch 32 and the paper's 256) and skeletons.
SETUPS = [
    ("rgb-b32", 2048, 512, 25, 32),
    ("rgb-b256", 2048, 512, 25, 256),
    ("skeleton", 150, 100, 100, 256),
]
QUICK_SETUPS = [
    ("rgb-b32", 64, 32, 5, 4),
    ("rgb-b256", 64, 32, 5, 16),
    ("skeleton", 15, 10, 10, 16),
]


class NaiveEleAtt(nn.Module):
    """The public EleAtt recipe: a Linear on cat(x_t, h_{t-1}) for the gate, then nn.LSTMCell/nn.GRUCell, per step."""

    def __init__(self, cell: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lstm = cell == "lstm"
        self.attn = nn.Linear(input_size + hidden_size, input_size)
        self.cell = (nn.LSTMCell if self.lstm else nn.GRUCell)(input_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:  # x (T, B, D) -> (T, B, H)
        h = x.new_zeros(x.size(1), self.cell.hidden_size)
        c = torch.zeros_like(h)
        outs = []
        for x_t in x:
            a = torch.sigmoid(self.attn(torch.cat([x_t, h], 1)))
            if self.lstm:
                h, c = self.cell(a * x_t, (h, c))
            else:
                h = self.cell(a * x_t, h)
            outs.append(h)
        return torch.stack(outs)


@dataclass
class Row:
    name: str
    ref: str  # the torch module this row is compared with
    module: nn.Module  # called on x (T, B, D); a tuple result's first item is the output
    fwd: list[float] = field(default_factory=list)
    fwdbwd: list[float] = field(default_factory=list)

    def run(self, x: Tensor) -> Tensor:
        out = self.module(x)
        return out[0] if isinstance(out, tuple) else out


def _time(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure(rows: list[Row], x: Tensor, repeats: int, warmup: int) -> None:
    """Interleaved timing: every repeat runs every row once, forward (no grad) then forward+backward."""

    def forward(row: Row) -> None:
        with torch.no_grad():
            row.run(x)

    def forward_backward(row: Row) -> None:
        row.run(x).sum().backward()

    for i in range(warmup + repeats):
        for row in rows:
            f, fb = _time(lambda: forward(row), x.device), _time(lambda: forward_backward(row), x.device)
            if i >= warmup:
                row.fwd.append(f)
                row.fwdbwd.append(fb)


def build_rows(d: int, h: int, reference: bool, device: torch.device) -> list[Row]:
    rows = [
        Row("nn.LSTM", "nn.LSTM", nn.LSTM(d, h)),
        Row("EleAttLSTM", "nn.LSTM", EleAttLSTM(d, h)),
        Row("naive EleAtt-LSTM loop", "nn.LSTM", NaiveEleAtt("lstm", d, h)),
        Row("nn.GRU", "nn.GRU", nn.GRU(d, h)),
        Row("EleAttGRU", "nn.GRU", EleAttGRU(d, h)),
        Row("naive EleAtt-GRU loop", "nn.GRU", NaiveEleAtt("gru", d, h)),
    ]
    if reference:
        rows.insert(2, Row("EleAttLSTM (reference)", "nn.LSTM", EleAttLSTM(d, h, impl="reference")))
    for r in rows:
        r.module.to(device)
    return rows


def format_table(title: str, rows: list[Row]) -> str:
    med = {r.name: (statistics.median(r.fwd), statistics.median(r.fwdbwd)) for r in rows}
    naive = {"nn.LSTM": "naive EleAtt-LSTM loop", "nn.GRU": "naive EleAtt-GRU loop"}
    lines = [
        f"### {title}",
        "",
        "| implementation | fwd ms | fwd+bwd ms | fwd x nn | fwd+bwd x nn | fwd naive / this | fwd+bwd naive / this |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, fb = med[r.name]
        rf, rfb = med[r.ref]
        nf, nfb = med[naive[r.ref]]
        ours = r.name.startswith("EleAtt")
        speedup = f"{nf / f:.2f} | {nfb / fb:.2f}" if ours else "- | -"
        lines.append(f"| {r.name} | {f:.1f} | {fb:.1f} | {f / rf:.2f} | {fb / rfb:.2f} | {speedup} |")
    return "\n".join(lines)


class CellFloor(nn.Module):
    """One nn.LSTMCell step plus the gate's two products: what an EleAtt step cannot go below."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.xa = nn.Linear(input_size, input_size)
        self.ha = nn.Linear(hidden_size, input_size, bias=False)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.xa(x), self.ha(state[0])  # (B, D) each; values unused, the cost is the point
        return self.cell(x, state)


class StackStep(nn.Module):
    """One step of an EleAttLSTM stack with its state carried (T=1), as streaming classification runs it."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.rnn = EleAttLSTM(input_size, hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        _, (h, c) = self.rnn(x.unsqueeze(0), (state[0].unsqueeze(0), state[1].unsqueeze(0)))  # (1, B, D) -> ...
        return h[0], c[0]


def streaming_table(d: int, h: int, steps: int, repeats: int, device: torch.device) -> str:
    """Per-step latency at batch 1 (no grad), interleaved: EleAttLSTMCell vs nn.LSTMCell + the gate's products."""
    cells = {"nn.LSTMCell + gate products": CellFloor(d, h), "EleAttLSTMCell": EleAttLSTMCell(d, h),
             "EleAttLSTM, one step (classify --stream)": StackStep(d, h), "nn.LSTMCell": nn.LSTMCell(d, h)}
    x = torch.randn(steps, 1, d, device=device)
    times: dict[str, list[float]] = {k: [] for k in cells}

    def run(cell: nn.Module) -> None:
        state = (x.new_zeros(1, h), x.new_zeros(1, h))
        with torch.no_grad():
            for x_t in x:
                state = cell(x_t, state)

    for i in range(repeats + 1):
        for name, cell in cells.items():
            cell.to(device)
            ms = _time(lambda: run(cell), device) / steps
            if i:  # the first round warms up
                times[name].append(ms)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["nn.LSTMCell + gate products"]
    lines = [f"### streaming: one step at B=1, D={d}, H={h} (median of {repeats} runs of {steps} steps)", "",
             "| implementation | ms / step | x (nn.LSTMCell + gate products) |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {v / floor:.2f} |" for k, v in med.items()]
    return "\n".join(lines)


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.rnn",
        description="Time EleAttLSTM/EleAttGRU against nn.LSTM/nn.GRU and the naive EleAtt cell loop "
                    "(forward without grad, and forward+backward; float32, CPU unless --device).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (seconds; for tests)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 1; quick 1)")
    parser.add_argument("--setups", nargs="+", choices=[s[0] for s in SETUPS] + ["streaming"], default=None,
                        help="which set-ups to run (default all)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--reference", action="store_true", help="also time the step-by-step reference path")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    if repeats < 1 or warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    setups = QUICK_SETUPS if args.quick else SETUPS
    if args.setups:
        setups = [s for s in setups if s[0] in args.setups]
    from pipeline.nn.kernel import _onednn_available

    products = "oneDNN" if device.type == "cpu" and _onednn_available() else "torch.mm"
    print(f"# EleAtt RNN benchmark: torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"median of {repeats} interleaved repeats{' (quick sizes)' if args.quick else ''}; the kernel's float32 "
          f"products: {products}")
    for name, d, h, t, b in setups:
        rows = build_rows(d, h, args.reference, device)
        x = torch.randn(t, b, d, device=device)
        measure(rows, x, repeats, warmup)
        print()
        print(format_table(f"{name}: D={d}, H={h}, T={t}, B={b}", rows))
        sys.stdout.flush()
    if not args.setups or "streaming" in args.setups:
        d, h = (64, 32) if args.quick else (2048, 512)
        print()
        print(streaming_table(d, h, 10 if args.quick else 50, max(repeats, 3), device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
