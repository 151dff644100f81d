"""The maths of one step, written like the paper, and the step-by-step reference layer.

One gated step of an EleAtt layer (Zhang et al., ECCV 2018):

    a_t  = sigmoid(W_xa x_t + W_ha h_{t-1} + b_a)          # (B, D) the element-wise attention gate
    x~_t = a_t * x_t                                       # the modulated input
    h_t  = cell(x~_t, h_{t-1})                             # a plain RNN / LSTM / GRU cell on x~_t

- `attention_gate`, `rnn_step`, `lstm_step`, `gru_step` and their dispatch `cell_step` are TorchScript-scriptable
  (the export models of `pipeline.serving.export` script them);
- `reference_layer` runs one layer over a (packed) sequence one step at a time with plain autograd: the readable
  definition that the cells, the stacks' `impl="reference"` and the fast kernel (`pipeline.nn.kernel`) are held to;
- `scan_layer` runs the same steps as one `scan` over time, for torch.export (T stays dynamic).
The cells and stacks built on them are in `pipeline.nn.eleatt`.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_gate",
    "rnn_step",
    "lstm_step",
    "gru_step",
    "cell_step",
    "gated_step",
    "reference_layer",
    "scan_layer",
    "compiler_flag",
]

GateKind = Literal["sigmoid", "softmax"]
State = tuple[Tensor, ...]  # (h,) for RNN/GRU, (h, c) for LSTM; each (B, H)


def attention_gate(
    x: Tensor, h: Tensor, weight_xa: Tensor, weight_ha: Tensor, bias_a: Optional[Tensor], gate: str = "sigmoid"
) -> Tensor:
    """The element-wise attention gate a_t = sigma(W_xa x_t + W_ha h_{t-1} + b_a).

    x (B, D), h (B, H) -> a (B, D) in (0, 1). `gate="softmax"` normalises over the D input elements instead
    (the paper's ablation), so a_t sums to 1 per sample.
    """
    z = F.linear(x, weight_xa, bias_a) + F.linear(h, weight_ha)  # (B, D)
    return torch.sigmoid(z) if gate == "sigmoid" else torch.softmax(z, dim=-1)


def rnn_step(
    x: Tensor, state: Tuple[Tensor], weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor], nonlinearity: str = "tanh",
) -> Tuple[Tensor]:
    """Elman step h' = act(W_ih x + b_ih + W_hh h + b_hh); x (B, D), state (h,) each (B, H)."""
    h = state[0]
    pre = F.linear(x, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)  # (B, H)
    return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre),)


def lstm_step(
    x: Tensor, state: Tuple[Tensor, Tensor], weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """LSTM step (nn.LSTM's gate order i, f, g, o); x (B, D), state (h, c) each (B, H)."""
    h, c = state
    gates = F.linear(x, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)  # (B, 4H)
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    h = o * torch.tanh(c)
    return h, c


def gru_step(
    x: Tensor, state: Tuple[Tensor], weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
) -> Tuple[Tensor]:
    """GRU step as nn.GRU computes it (gate order r, z, n; r multiplies W_hn h + b_hn); state (h,) each (B, H)."""
    h = state[0]
    gi = F.linear(x, weight_ih, bias_ih)  # (B, 3H)
    gh = F.linear(h, weight_hh, bias_hh)  # (B, 3H)
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h,)


def cell_step(
    mode: str, x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The cell of `mode` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") on x (B, D), h and c (B, H) -> new (h, c);
    c is used and changed only by the LSTM (the others return it as it is)."""
    if mode == "LSTM":
        return lstm_step(x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh)
    if mode == "GRU":
        return gru_step(x, (h,), weight_ih, weight_hh, bias_ih, bias_hh)[0], c
    nonlinearity = "tanh" if mode == "RNN_TANH" else "relu"
    return rnn_step(x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity)[0], c


def gated_step(
    mode: str, x: Tensor, state: State, weights: Sequence[Tensor | None],
    gate_weights: Sequence[Tensor | None] | None, gate: str = "sigmoid",
) -> tuple[State, Tensor | None]:
    """One step of a layer: the gate (if gate_weights, (w_xa, w_ha, b_a), are given) on x (B, D), then the cell
    on x~ = a * x. state (h,) or (h, c); weights (w_ih, w_hh, b_ih, b_hh). Returns the new state and a (or None)."""
    a = None
    if gate_weights is not None:
        a = attention_gate(x, state[0], *gate_weights, gate=gate)  # (B, D)
        x = a * x
    h, c = cell_step(mode, x, state[0], state[-1], *weights)
    return ((h, c) if mode == "LSTM" else (h,)), a


def compiler_flag(name: str) -> bool:
    """torch.compiler.<name>() ("is_compiling", "is_exporting"), False on a torch that does not have it."""
    flag = getattr(torch.compiler, name, None)
    return bool(flag is not None and flag())


# --------------------------------------------------------------------------------------------------------------
# A layer over a whole sequence
# --------------------------------------------------------------------------------------------------------------
def reference_layer(
    mode: str,
    x: Tensor,
    batch_sizes: Sequence[int],
    state: State,
    weights: Sequence[Tensor | None],
    gate_weights: Sequence[Tensor | None] | None,
    gate: GateKind = "sigmoid",
) -> tuple[Tensor, State, Tensor | None]:
    """Run one layer over a sequence in packed layout.

    x (N, D): the steps one after the other, step t holding the first `batch_sizes[t]` sequences (non-increasing,
    as in a PackedSequence; an unpacked (T, B, D) input is x.view(T * B, D) with batch_sizes [B] * T).
    state: (h0,) or (h0, c0), each (B, H) with B = batch_sizes[0]. weights: (w_ih, w_hh, b_ih, b_hh);
    gate_weights: (w_xa, w_ha, b_a) or None for an ungated layer.
    Returns out (N, H), the final state of each sequence (its last valid step) and the gates (N, D) or None.
    Sequences that have ended keep their state: padded steps never touch valid ones.
    """
    outs, gates, offset = [], [], 0
    for bs in batch_sizes:
        prev = tuple(s[:bs] for s in state)
        new, a = gated_step(mode, x[offset:offset + bs], prev, weights, gate_weights, gate)  # x_t (bs, D)
        if a is not None:
            gates.append(a)
        state = tuple(torch.cat([n, s[bs:]]) if bs < s.size(0) else n for n, s in zip(new, state))
        outs.append(new[0])
        offset += bs
    return torch.cat(outs), state, (torch.cat(gates) if gate_weights is not None else None)


def scan_layer(
    mode: str,
    x: Tensor,
    state: State,
    weights: Sequence[Tensor | None],
    gate_weights: Sequence[Tensor | None] | None,
    gate: str = "sigmoid",
) -> tuple[Tensor, State, Tensor | None]:
    """`reference_layer`'s steps over x (T, B, D) (every sequence T steps) as one `scan`, for torch.export: it keeps
    T dynamic where a Python loop would unroll it. Returns out (T, B, H), the final state, the gates (T, B, D) or
    None."""
    from torch._higher_order_ops.scan import scan

    def combine(carry, x_t):
        new, a = gated_step(mode, x_t, carry, weights, gate_weights, gate)
        return new, (new[0].clone(), *(() if a is None else (a,)))  # outputs may not alias the carry

    final, ys = scan(combine, tuple(state), x)  # ys[0] (T, B, H), ys[1] (T, B, D)
    return ys[0], final, (ys[1] if gate_weights is not None else None)
