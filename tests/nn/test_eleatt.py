"""The EleAtt recurrent core: parity with torch at a_t = 1, gradcheck, gates, packing, parameters (issue 2)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.nn.eleatt import (
    EleAttGRU,
    EleAttGRUCell,
    EleAttLSTM,
    EleAttLSTMCell,
    EleAttRNN,
    EleAttRNNCell,
)

D, H, T, B = 5, 4, 6, 3
LENGTHS = torch.tensor([4, 6, 2])  # unsorted on purpose: the packed path must restore the batch order
F64 = torch.float64

# (ours, torch's, extra constructor kwargs)
STACKS = [
    pytest.param(EleAttLSTM, nn.LSTM, {}, id="lstm"),
    pytest.param(EleAttGRU, nn.GRU, {}, id="gru"),
    pytest.param(EleAttRNN, nn.RNN, {}, id="rnn-tanh"),
    pytest.param(EleAttRNN, nn.RNN, {"nonlinearity": "relu"}, id="rnn-relu"),
]
CELLS = [
    pytest.param(EleAttLSTMCell, nn.LSTMCell, {}, id="lstm"),
    pytest.param(EleAttGRUCell, nn.GRUCell, {}, id="gru"),
    pytest.param(EleAttRNNCell, nn.RNNCell, {}, id="rnn-tanh"),
    pytest.param(EleAttRNNCell, nn.RNNCell, {"nonlinearity": "relu"}, id="rnn-relu"),
]


def set_gates(module: nn.Module, bias: float) -> None:
    """Gate weights 0 and gate bias `bias`: a_t = sigmoid(bias) everywhere (1 - 1e-13 for bias 30)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "_xa" in name or "_ha" in name:
                p.zero_()
            elif "bias_a" in name:
                p.fill_(bias)


def states(h) -> tuple[torch.Tensor, ...]:
    return h if isinstance(h, tuple) else (h,)


def random_hx(mode_lstm: bool, num_layers: int, batch: int):
    h0 = torch.randn(num_layers, batch, H, dtype=F64, requires_grad=True)
    if not mode_lstm:
        return h0, (h0,)
    c0 = torch.randn(num_layers, batch, H, dtype=F64, requires_grad=True)
    return (h0, c0), (h0, c0)


def run(module, x, lengths, batch_first, hx):
    """Forward (packed when lengths is given) -> (padded output, final states)."""
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, h = module(inp, hx)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    return out, states(h)


# ------------------------------------------------------------------------------------------------------------
# Parity with torch at a_t = 1
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbd", "btd"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("ours, theirs, kw", STACKS)
def test_open_gate_equals_torch(ours, theirs, kw, num_layers, batch_first, packed, impl):
    ref = theirs(D, H, num_layers=num_layers, batch_first=batch_first, dtype=F64, **kw)
    ele = ours(D, H, num_layers=num_layers, batch_first=batch_first, impl=impl, dtype=F64, **kw)
    result = ele.load_state_dict(ref.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(
        f"{w}_l{k}" for k in range(num_layers) for w in ("weight_xa", "weight_ha", "bias_a"))
    set_gates(ele, 30.0)

    shape = (B, T, D) if batch_first else (T, B, D)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    lengths = LENGTHS if packed else None
    hx, hx_leaves = random_hx(theirs is nn.LSTM, num_layers, B)
    grads = []
    outputs = []
    for module in (ref, ele):
        out, final = run(module, x, lengths, batch_first, hx)
        loss = (out * out.cos()).sum() + sum((s * s.sin()).sum() for s in final)
        grads.append(torch.autograd.grad(loss, [x, *hx_leaves]))
        outputs.append((out, *final))
    for a, b in zip(outputs[0], outputs[1]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("ours, theirs, kw", STACKS)
def test_open_gate_weight_gradients_equal_torch(ours, theirs, kw, impl):
    ref = theirs(D, H, num_layers=2, dtype=F64, **kw)
    ele = ours(D, H, num_layers=2, impl=impl, dtype=F64, **kw)
    ele.load_state_dict(ref.state_dict(), strict=False)
    set_gates(ele, 30.0)
    x = torch.randn(T, B, D, dtype=F64)
    for module in (ref, ele):
        module(x)[0].pow(2).sum().backward()
    ours_grads = dict(ele.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ours_grads[name].grad, p.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ours, theirs, kw", STACKS)
def test_unbatched_input_equals_torch(ours, theirs, kw):
    ref = theirs(D, H, num_layers=2, dtype=F64, **kw)
    ele = ours(D, H, num_layers=2, dtype=F64, **kw)
    ele.load_state_dict(ref.state_dict(), strict=False)
    set_gates(ele, 30.0)
    x = torch.randn(T, D, dtype=F64)
    (out_r, h_r), (out_e, h_e) = ref(x), ele(x)
    assert out_e.shape == (T, H)
    torch.testing.assert_close(out_e, out_r, rtol=0, atol=1e-6)
    for a, b in zip(states(h_r), states(h_e)):
        assert b.shape == (2, H)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ours, theirs, kw", CELLS)
def test_cell_open_gate_equals_torch_cell(ours, theirs, kw):
    ref, ele = theirs(D, H, dtype=F64, **kw), ours(D, H, dtype=F64, **kw)
    missing = ele.load_state_dict(ref.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["bias_a", "weight_ha", "weight_xa"]
    set_gates(ele, 30.0)
    x = torch.randn(B, D, dtype=F64)
    hx = torch.randn(B, H, dtype=F64)
    hx = (hx, torch.randn(B, H, dtype=F64)) if theirs is nn.LSTMCell else hx
    for a, b in zip(states(ref(x, hx)), states(ele(x, hx))):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # unbatched and hx=None follow the torch cell too
    for a, b in zip(states(ref(x[0])), states(ele(x[0]))):
        assert b.shape == (H,)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Gradients of the cells
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("ours, theirs, kw", CELLS)
def test_cell_gradcheck(ours, theirs, kw, gate):
    cell = ours(3, 2, gate=gate, dtype=F64, **kw)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    h = torch.randn(2, 2, dtype=F64, requires_grad=True)
    c = torch.randn(2, 2, dtype=F64, requires_grad=True)
    lstm = theirs is nn.LSTMCell

    def f(x, h, c, *ps):
        out = functional_call(cell, dict(zip(names, ps)), (x, (h, c) if lstm else h))
        return out if lstm else (out,)

    assert gradcheck(f, (x, h, c, *params), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# The gate does something
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("ours, theirs, kw", STACKS)
def test_gate_changes_output(ours, theirs, kw, impl):
    ref = theirs(D, H, num_layers=2, dtype=F64, **kw)
    ele = ours(D, H, num_layers=2, impl=impl, dtype=F64, **kw)
    ele.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(T, B, D, dtype=F64)
    # A random (trained-like) gate: not the plain network.
    assert (ele(x)[0] - ref(x)[0]).abs().max() > 1e-3
    # A closed first-layer gate (a_t = 0) under an open second one hides the input: the plain network on zeros.
    set_gates(ele, 30.0)
    with torch.no_grad():
        ele.bias_a_l0.fill_(-40.0)
    torch.testing.assert_close(ele(x)[0], ref(torch.zeros_like(x))[0], rtol=0, atol=1e-9)


def test_return_attention_shapes_values_and_padding():
    lstm = EleAttLSTM(D, H, num_layers=3, attention_layers=2, batch_first=True, dtype=F64)
    x = torch.randn(B, T, D, dtype=F64)
    out, (h_n, c_n), gates = lstm(x, return_attention=True)
    assert out.shape == (B, T, H) and h_n.shape == c_n.shape == (3, B, H)
    assert [tuple(a.shape) for a in gates] == [(B, T, D), (B, T, H)]
    assert all(((a > 0) & (a < 1)).all() for a in gates)
    assert len(lstm(x)) == 2  # without the flag: exactly the torch contract

    packed = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
    out_p, _, gates_p = lstm(packed, return_attention=True)
    for a_p, a in zip(gates_p, gates):
        assert a_p.shape == a.shape
        for b, n in enumerate(LENGTHS.tolist()):
            assert (a_p[b, n:] == 0).all()
            assert (a_p[b, :n] > 0).all()
    # The first layer's gate at a sequence's valid steps is the gate of the unpacked run (same prefix).
    torch.testing.assert_close(gates_p[0][0, :4], gates[0][0, :4])


def test_softmax_gate_sums_to_one():
    gru = EleAttGRU(D, H, num_layers=2, gate="softmax", dtype=F64)
    x = torch.randn(T, B, D, dtype=F64)
    _, _, gates = gru(x, return_attention=True)
    for a in gates:
        torch.testing.assert_close(a.sum(-1), torch.ones(T, B, dtype=F64))


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("ours, theirs, kw", STACKS)
def test_padded_steps_never_change_valid_ones(ours, theirs, kw, impl):
    ele = ours(D, H, num_layers=2, impl=impl, dtype=F64, **kw)
    x = torch.randn(T, B, D, dtype=F64)
    x_garbage = x.clone()
    for b, n in enumerate(LENGTHS.tolist()):
        x_garbage[n:, b] = 1e3
    out, h, gates = ele(pack_padded_sequence(x_garbage, LENGTHS, enforce_sorted=False), return_attention=True)
    out, _ = pad_packed_sequence(out, total_length=T)
    for b, n in enumerate(LENGTHS.tolist()):
        alone_out, alone_h, alone_gates = ele(x[:n, b], return_attention=True)  # unbatched, its own length
        torch.testing.assert_close(out[:n, b], alone_out, rtol=0, atol=1e-12)
        assert (out[n:, b] == 0).all()
        for s, s_alone in zip(states(h), states(alone_h)):
            torch.testing.assert_close(s[:, b], s_alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(gates[0][:n, b], alone_gates[0], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs, kw", STACKS)
def test_paper_parameter_count(ours, theirs, kw):
    ele, ref = ours(150, 100, num_layers=3, **kw), theirs(150, 100, num_layers=3, **kw)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # sum_k D_k (D_k + H + 1) = 150 * 251 + 2 * 100 * 201
    assert count(ele) - count(ref) == 77_850


@pytest.mark.parametrize("ours, theirs, kw", STACKS)
def test_attention_layers_zero_is_the_plain_network(ours, theirs, kw):
    ref = theirs(D, H, num_layers=3, dtype=F64, **kw)
    ele = ours(D, H, num_layers=3, attention_layers=0, dtype=F64, **kw)
    assert [n for n, _ in ele.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ele.load_state_dict(ref.state_dict())  # strict: same names, same shapes
    x = torch.randn(T, B, D, dtype=F64)
    out, h, gates = ele(x, return_attention=True)
    torch.testing.assert_close(out, ref(x)[0], rtol=0, atol=1e-12)
    assert gates == []
    for impl in ("reference", "fast"):
        ele.impl = impl
        torch.testing.assert_close(ele(x)[0], ref(x)[0], rtol=0, atol=1e-12)


def test_partial_attention_layers_and_names():
    lstm = EleAttLSTM(D, H, num_layers=3, attention_layers=1, bias=False)
    names = {n for n, _ in lstm.named_parameters()}
    assert {"weight_xa_l0", "weight_ha_l0"} <= names
    assert not any(n.startswith(("weight_xa_l1", "weight_ha_l1", "weight_xa_l2", "bias")) for n in names)
    assert lstm.weight_xa_l0.shape == (D, D) and lstm.weight_ha_l0.shape == (D, H)


def test_init_like_torch():
    lstm = EleAttLSTM(32, 64, num_layers=2)
    bound = 1 / 64 ** 0.5
    for name, p in lstm.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.std() > bound / 3, name  # uniform over the whole range, not constant


# ------------------------------------------------------------------------------------------------------------
# Errors name the value and the fix
# ------------------------------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="gate='tanh'"):
        EleAttLSTM(D, H, gate="tanh")
    with pytest.raises(ValueError, match="attention_layers must be in"):
        EleAttGRU(D, H, num_layers=2, attention_layers=3)
    with pytest.raises(ValueError, match="bidirectional"):
        EleAttLSTM(D, H, bidirectional=True)
    with pytest.raises(ValueError, match="impl='slow'"):
        EleAttLSTM(D, H, impl="slow")
    with pytest.raises(ValueError, match="input_size=5"):
        EleAttLSTM(D, H)(torch.randn(T, B, D + 1))
    with pytest.raises(ValueError, match=r"hidden state of shape \(1, 3, 4\)"):
        EleAttGRU(D, H)(torch.randn(T, B, D), torch.randn(1, B + 1, H))
    with pytest.raises(ValueError, match=r"tuple \(h_0, c_0\)"):
        EleAttLSTM(D, H)(torch.randn(T, B, D), torch.randn(1, B, H))


def test_dtype_mismatch_is_refused_but_autocast_runs():
    lstm = EleAttLSTM(D, H, num_layers=2)
    x = torch.randn(T, B, D)
    with pytest.raises(ValueError, match="input is torch.float64 but the weights are torch.float32"):
        lstm(x.double())
    expected = lstm(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lstm(x.bfloat16())[0]  # the fast kernel computes in the weights' dtype
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-2)  # only the input was rounded to bfloat16
