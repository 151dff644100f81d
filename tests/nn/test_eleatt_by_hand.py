"""The cells and stacks against the paper's equations, computed by hand in plain tensor arithmetic.

Independent of the step functions in `pipeline.nn.eleatt` (which the reference layer and the fast kernel share):
a gate that ignored h_{t-1}, or was applied after the cell, would agree with itself everywhere else. Every check
starts from a non-zero h_{t-1} (and c_{t-1}) so the recurrent term of the gate counts.

    a_t  = sigmoid(W_xa x_t + W_ha h_{t-1} + b_a)    (softmax over the D elements for gate="softmax")
    x~_t = a_t * x_t
    h_t  = cell(x~_t, h_{t-1})
"""
from __future__ import annotations

import pytest
import torch

from pipeline.nn.eleatt import EleAttGRU, EleAttGRUCell, EleAttLSTM, EleAttLSTMCell, EleAttRNN, EleAttRNNCell

B, D, H = 3, 5, 4
TOL = dict(rtol=1e-10, atol=1e-12)  # float64: the hand computation and the module differ only by summation order


def sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def gate_by_hand(x, h, w_xa, w_ha, b_a, gate):
    z = x @ w_xa.T + h @ w_ha.T + b_a  # (B, D)
    if gate == "sigmoid":
        return sig(z)
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def cell_by_hand(mode, x, state, w_ih, w_hh, b_ih, b_hh):
    """One step of the plain cell on x (B, D); state (h,) or (h, c), each (B, H)."""
    h = state[0]
    if mode == "RNN":
        return (torch.tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh),)
    if mode == "LSTM":
        c = state[1]
        z = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H): i, f, g, o
        i, f, g, o = sig(z[:, :H]), sig(z[:, H:2 * H]), torch.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
        c_new = f * c + i * g
        return o * torch.tanh(c_new), c_new
    gi = x @ w_ih.T + b_ih  # (B, 3H): r, z, n
    gh = h @ w_hh.T + b_hh
    r = sig(gi[:, :H] + gh[:, :H])
    u = sig(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    return ((1 - u) * n + u * h,)


CELLS = {"RNN": EleAttRNNCell, "LSTM": EleAttLSTMCell, "GRU": EleAttGRUCell}
STACKS = {"RNN": EleAttRNN, "LSTM": EleAttLSTM, "GRU": EleAttGRU}


def _init_state(mode, gen):
    h = torch.randn(B, H, generator=gen, dtype=torch.float64)
    if mode == "LSTM":
        return h, torch.randn(B, H, generator=gen, dtype=torch.float64)
    return (h,)


def _perturb(module, gen):
    """Weights far from the init's small range, so that every term of the equations moves the result."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_cell_two_steps_by_hand(mode, gate):
    gen = torch.Generator().manual_seed(1)
    cell = CELLS[mode](D, H, gate=gate, dtype=torch.float64)
    _perturb(cell, gen)
    xs = torch.randn(2, B, D, generator=gen, dtype=torch.float64)  # (T=2, B, D)
    state = _init_state(mode, gen)
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    hand = state
    with torch.no_grad():
        for t in range(2):
            a_hand = gate_by_hand(xs[t], hand[0], cell.weight_xa, cell.weight_ha, cell.bias_a, gate)
            a_cell = cell.attention_weights(xs[t], hand[0])
            torch.testing.assert_close(a_cell, a_hand, **TOL)
            out = cell(xs[t], hand if mode == "LSTM" else hand[0])
            hand = cell_by_hand(mode, a_hand * xs[t], hand, *w)
            out = out if mode == "LSTM" else (out,)
            for got, want in zip(out, hand):
                torch.testing.assert_close(got, want, **TOL)
    # the gate really depends on h_{t-1}: with h = 0 it is another value
    a_zero = gate_by_hand(xs[0], torch.zeros(B, H, dtype=torch.float64), cell.weight_xa, cell.weight_ha,
                          cell.bias_a, gate)
    assert not torch.allclose(a_zero, gate_by_hand(xs[0], state[0], cell.weight_xa, cell.weight_ha, cell.bias_a,
                                                   gate))


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_stack_two_steps_two_layers_by_hand(mode, gate, impl):
    """Two layers (the first gated, the second gated too), two steps, from a non-zero (h_0, c_0); gates returned."""
    gen = torch.Generator().manual_seed(2)
    stack = STACKS[mode](D, H, num_layers=2, gate=gate, impl=impl, dtype=torch.float64)
    _perturb(stack, gen)
    x = torch.randn(2, B, D, generator=gen, dtype=torch.float64)  # (T, B, D)
    h0 = torch.randn(2, B, H, generator=gen, dtype=torch.float64)  # (layers, B, H)
    c0 = torch.randn(2, B, H, generator=gen, dtype=torch.float64)
    hx = (h0, c0) if mode == "LSTM" else h0
    with torch.no_grad():
        out, final, gates = stack(x, hx, return_attention=True)

        inputs = x
        want_gates, finals = [], []
        for k in range(2):
            p = {n: getattr(stack, f"{n}_l{k}") for n in
                 ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_xa", "weight_ha", "bias_a")}
            state = (h0[k], c0[k]) if mode == "LSTM" else (h0[k],)
            outs, gs = [], []
            for t in range(2):
                a = gate_by_hand(inputs[t], state[0], p["weight_xa"], p["weight_ha"], p["bias_a"], gate)
                state = cell_by_hand(mode, a * inputs[t], state, p["weight_ih"], p["weight_hh"], p["bias_ih"],
                                     p["bias_hh"])
                outs.append(state[0])
                gs.append(a)
            inputs = torch.stack(outs)  # (T, B, H): the next layer's input
            want_gates.append(torch.stack(gs))  # (T, B, D_k)
            finals.append(state)

    torch.testing.assert_close(out, inputs, **TOL)
    assert len(gates) == 2
    for got, want in zip(gates, want_gates):
        torch.testing.assert_close(got, want, **TOL)
    h_n = final[0] if mode == "LSTM" else final
    torch.testing.assert_close(h_n, torch.stack([f[0] for f in finals]), **TOL)
    if mode == "LSTM":
        torch.testing.assert_close(final[1], torch.stack([f[1] for f in finals]), **TOL)
