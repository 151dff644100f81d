"""The maths of one step (pipeline.nn.steps): scriptable, one definition for every path (cells, the reference
layer, the torch.export scan, the export models), and the parameter layout the stacks hand it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pipeline.nn.eleatt as eleatt
from pipeline.nn import steps
from pipeline.nn.classifier import pool_steps
from pipeline.nn.eleatt import EleAttGRU, EleAttLSTM, EleAttRNN

D, H, B, T = 5, 4, 3, 6
MODES = [("LSTM", nn.LSTMCell, {}), ("GRU", nn.GRUCell, {}), ("RNN_TANH", nn.RNNCell, {}),
         ("RNN_RELU", nn.RNNCell, {"nonlinearity": "relu"})]


def test_eleatt_reexports_the_step_maths():
    for name in ("attention_gate", "rnn_step", "lstm_step", "gru_step", "reference_layer"):
        assert getattr(eleatt, name) is getattr(steps, name)
        assert name in eleatt.__all__


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode, torch_cell, kw", MODES, ids=[m[0] for m in MODES])
def test_scripted_cell_step_equals_eager_and_torch(mode, torch_cell, kw, bias):
    """cell_step (and so lstm/gru/rnn_step) compiles with torch.jit.script and gives torch's cells' values;
    c goes through unchanged except for the LSTM."""
    torch.manual_seed(0)
    cell = torch_cell(D, H, bias=bias, **kw).double()
    x, h, c = (torch.randn(*shape, dtype=torch.float64) for shape in ((B, D), (B, H), (B, H)))
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    scripted = torch.jit.script(steps.cell_step)
    with torch.no_grad():
        eager = steps.cell_step(mode, x, h, c, *weights)
        script = scripted(mode, x, h, c, *weights)
        want = cell(x, (h, c)) if mode == "LSTM" else (cell(x, h), c)
    for got in (eager, script):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)
    if mode != "LSTM":
        assert eager[1] is c


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_scripted_attention_gate_by_hand(gate):
    torch.manual_seed(0)
    x, h = torch.randn(B, D), torch.randn(B, H)
    w_xa, w_ha, b_a = torch.randn(D, D), torch.randn(D, H), torch.randn(D)
    z = x @ w_xa.T + h @ w_ha.T + b_a
    want = torch.sigmoid(z) if gate == "sigmoid" else torch.softmax(z, -1)
    scripted = torch.jit.script(steps.attention_gate)
    torch.testing.assert_close(scripted(x, h, w_xa, w_ha, b_a, gate), want)
    torch.testing.assert_close(steps.attention_gate(x, h, w_xa, w_ha, None, gate),
                               torch.sigmoid(z - b_a) if gate == "sigmoid" else torch.softmax(z - b_a, -1))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_scan_layer_equals_reference_layer(mode, gated):
    """The torch.export path's per-layer scan runs the reference layer's steps, from a non-zero state."""
    torch.manual_seed(0)
    g = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode] * H
    weights = (torch.randn(g, D), torch.randn(g, H), torch.randn(g), torch.randn(g))
    gate_weights = (torch.randn(D, D), torch.randn(D, H), torch.randn(D)) if gated else None
    state = (torch.randn(B, H), torch.randn(B, H)) if mode == "LSTM" else (torch.randn(B, H),)
    x = torch.randn(T, B, D)
    out, final, gates = steps.scan_layer(mode, x, state, weights, gate_weights, "sigmoid")
    ref_out, ref_final, ref_gates = steps.reference_layer(mode, x.reshape(T * B, D), [B] * T, state, weights,
                                                          gate_weights, "sigmoid")
    torch.testing.assert_close(out.reshape(T * B, H), ref_out)
    for got, want in zip(final, ref_final, strict=True):
        torch.testing.assert_close(got, want)
    if gated:
        torch.testing.assert_close(gates.reshape(T * B, D), ref_gates)
    else:
        assert gates is None and ref_gates is None


class _WithState(nn.Module):
    """A stack called with an initial state and return_attention, its outputs as a flat tuple (for torch.export)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, *hx):
        lstm = isinstance(self.rnn, EleAttLSTM)
        out, hidden, gates = self.rnn(x, hx if lstm else hx[0], return_attention=True)
        return (out, *(hidden if lstm else (hidden,)), *gates)


@pytest.mark.parametrize("cls", [EleAttLSTM, EleAttGRU, EleAttRNN])
def test_exported_stack_with_a_state_and_gates_equals_eager(cls):
    """torch.export of a 2-layer stack (both gated) that gets h_0 (c_0) and returns the gates: each layer starts
    from its own initial state, and the gates come back in the eager layout (B, T, D_l)."""
    torch.manual_seed(0)
    module = _WithState(cls(D, H, num_layers=2, batch_first=True)).eval()
    n_state = 2 if cls is EleAttLSTM else 1
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    dims = ({0: batch, 1: time}, ({1: batch},) * n_state)  # x, then the *hx tensors
    with torch.no_grad():
        # (a batch of 7: torch.export specialises a batch equal to a size in the graph, e.g. the GRU's 3 chunks)
        example = (torch.randn(7, T, D), *(torch.randn(2, 7, H) for _ in range(n_state)))
        exported = torch.export.export(module, example, dynamic_shapes=dims).module()
        for b, t in ((B, T), (2, 9)):
            xs = (torch.randn(b, t, D), *(torch.randn(2, b, H) for _ in range(n_state)))
            want, got = module(*xs), exported(*xs)
            assert len(got) == len(want)
            for w, g in zip(want, got):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_stack_parameters_keep_their_order():
    """nn.LSTM's parameters layer by layer, then the gates' layer by layer: reset_parameters draws in this order
    (a seed gives the same initial weights) and optimiser states in checkpoints follow it."""
    names = [n for n, _ in EleAttLSTM(D, H, num_layers=2).named_parameters()]
    assert names == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                     "weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1",
                     "weight_xa_l0", "weight_ha_l0", "bias_a_l0", "weight_xa_l1", "weight_ha_l1", "bias_a_l1"]
    names = [n for n, _ in EleAttGRU(D, H, num_layers=2, attention_layers=1, bias=False).named_parameters()]
    assert names == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1", "weight_xa_l0", "weight_ha_l0"]
    shapes = {n: tuple(p.shape) for n, p in EleAttLSTM(D, H, num_layers=2).named_parameters()}
    assert shapes["weight_ih_l1"] == (4 * H, H) and shapes["weight_xa_l1"] == (H, H)
    assert shapes["weight_ha_l0"] == (D, H) and shapes["bias_a_l0"] == (D,)


def test_pool_steps_by_hand_and_scripted():
    out = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1) + 1  # rows [1, 2, 3, 4], [5, 6, 7, 8]
    lengths = torch.tensor([2, 4])
    scripted = torch.jit.script(pool_steps)
    for run in (pool_steps, scripted):
        torch.testing.assert_close(run(out, lengths, "last"), torch.tensor([[2.0], [8.0]]))
        torch.testing.assert_close(run(out, lengths, "mean"), torch.tensor([[1.5], [6.5]]))
