"""The fast EleAtt kernel equals the reference path; its custom backward passes gradcheck; the benchmark runs."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_padded_sequence

from pipeline.benchmarks import rnn as bench
from pipeline.nn.eleatt import EleAttGRU, EleAttLSTM, EleAttRNN
from pipeline.nn.kernel import EleAttLayerFunction

D, H, T, B = 6, 5, 7, 4
LENGTHS = torch.tensor([5, 7, 2, 7])
LENGTHS_SIZES = (4, 4, 3, 3, 3, 2, 2)  # the packed batch sizes of LENGTHS, step by step
F64 = torch.float64

STACKS = [
    pytest.param(EleAttLSTM, {}, id="lstm"),
    pytest.param(EleAttGRU, {}, id="gru"),
    pytest.param(EleAttRNN, {}, id="rnn-tanh"),
    pytest.param(EleAttRNN, {"nonlinearity": "relu"}, id="rnn-relu"),
]


def input_and_state(ours, batch_first: bool):
    """x (B, T, D) or (T, B, D) and a 2-layer initial state, float64, all requiring grad."""
    x = torch.randn(*((B, T, D) if batch_first else (T, B, D)), dtype=F64, requires_grad=True)
    h0 = torch.randn(2, B, H, dtype=F64, requires_grad=True)
    return x, ((h0, torch.randn(2, B, H, dtype=F64, requires_grad=True)) if ours is EleAttLSTM else h0)


def forward_backward(module, x, lengths, hx, batch_first):
    """One forward + backward with a loss touching outputs, final states and gates. -> every value and grad."""
    inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, h, gates = module(inp, hx, return_attention=True)
    out = out if lengths is None else out.data
    finals = h if isinstance(h, tuple) else (h,)
    loss = (out * out.cos()).sum() + sum((s * s.sin()).sum() for s in finals) + sum((a * a).sum() for a in gates)
    leaves = [x, *(hx if isinstance(hx, tuple) else (hx,))]
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, leaves + params)
    return [out, *finals, *gates], grads


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("attention_layers", [None, 1], ids=["all-gated", "1-gated"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("ours, kw", STACKS)
def test_fast_equals_reference(ours, kw, packed, attention_layers, gate, bias):
    batch_first = packed  # both layouts, without doubling the cases
    module = ours(D, H, num_layers=2, attention_layers=attention_layers, gate=gate, bias=bias,
                  batch_first=batch_first, dtype=F64, **kw)
    x, hx = input_and_state(ours, batch_first)
    lengths = LENGTHS if packed else None
    results = {}
    for impl in ("reference", "fast"):
        module.impl = impl
        results[impl] = forward_backward(module, x, lengths, hx, batch_first)
    (ref_vals, ref_grads), (fast_vals, fast_grads) = results["reference"], results["fast"]
    assert len(ref_grads) == len(fast_grads) == 1 + (2 if ours is EleAttLSTM else 1) + len(list(module.parameters()))
    for a, b in zip(ref_vals, fast_vals):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    for a, b in zip(ref_grads, fast_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_layer_function_gradcheck(mode, gate, packed):
    """The custom backward against finite differences, for every input, weight and state."""
    d, h, n_chunks = 3, 2, {"LSTM": 4, "GRU": 3}.get(mode, 1)
    batch_sizes = (3, 3, 2, 1) if packed else (3, 3, 3)
    n = sum(batch_sizes)
    r = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)  # noqa: E731
    c0 = r(3, h) if mode == "LSTM" else torch.empty(0, dtype=F64)
    args = (r(n, d), r(3, h), c0, r(n_chunks * h, d), r(n_chunks * h, h), r(n_chunks * h), r(n_chunks * h),
            r(d, d), r(d, h), r(d))

    def f(*a):
        out, h_n, c_n, gates = EleAttLayerFunction.apply(mode, gate, batch_sizes, *a)
        return out, h_n, gates, *((c_n,) if mode == "LSTM" else ())

    assert gradcheck(f, args, eps=1e-6, atol=1e-7, fast_mode=True)


def test_fast_float32_close_to_reference():
    lstm = EleAttLSTM(64, 32, num_layers=2)
    x = torch.randn(10, 8, 64)
    out_fast, (h_fast, _) = lstm(x)
    lstm.impl = "reference"
    out_ref, (h_ref, _) = lstm(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_fast, h_ref, rtol=1e-5, atol=1e-5)


def test_fast_output_is_its_own_tensor():
    """Outputs can be modified in place (e.g. by a later in-place op) without corrupting the backward."""
    gru = EleAttGRU(D, H, dtype=F64)
    x = torch.randn(T, B, D, dtype=F64)
    out, _ = gru(x)
    expected = torch.autograd.grad(out.sum(), gru.weight_ih_l0)[0]
    out2, _ = gru(x)
    y = out2 * 1.0
    y.add_(1.0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), gru.weight_ih_l0)[0], expected)


# ------------------------------------------------------------------------------------------------------------
# The benchmark program
# ------------------------------------------------------------------------------------------------------------
def test_benchmark_quick_prints_the_table(capsys):
    assert bench.main(["--quick", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    titles = [line for line in text.splitlines() if line.startswith("### ")]
    assert [t.split(":")[0] for t in titles] == ["### rgb-b32", "### rgb-b256", "### skeleton", "### streaming"]
    names = ["nn.LSTM", "EleAttLSTM", "naive EleAtt-LSTM loop", "nn.GRU", "EleAttGRU", "naive EleAtt-GRU loop"]
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    body = [[c.strip() for c in r] for r in rows if r[0].strip() != "implementation"]
    streaming, body = body[18:], body[:18]
    assert [r[0] for r in body] == names * 3
    assert [r[0] for r in streaming] == ["nn.LSTMCell + gate products", "EleAttLSTMCell",
                                         "EleAttLSTM, one step (classify --stream)", "nn.LSTMCell"]
    assert float(streaming[0][2]) == 1.0 and all(float(r[1]) > 0 for r in streaming)
    for r in body:
        fwd, fwdbwd, ratio_f, ratio_fb = map(float, r[1:5])
        assert min(fwd, fwdbwd, ratio_f, ratio_fb) >= 0
        if r[0].startswith("nn."):
            assert ratio_f == ratio_fb == 1.0  # the reference row of its group
        assert (r[5] == "-") == (r[6] == "-") != r[0].startswith("EleAtt")  # naive-loop speed-ups: our rows only


def test_benchmark_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("ours, kw", STACKS)
def test_fast_gradients_accumulate_like_reference(ours, kw):
    """Two backward passes into .grad: no parameter's gradient may share memory with another's."""
    module = ours(D, H, num_layers=2, dtype=F64, **kw)
    x = torch.randn(T, B, D, dtype=F64)
    grads = {}
    for impl in ("reference", "fast"):
        module.impl = impl
        module.zero_grad(set_to_none=True)
        for scale in (1.0, 2.0):
            (module(x)[0] * scale).pow(2).sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in module.named_parameters()}
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["fast"][name], g, rtol=0, atol=1e-10, msg=name)


# --------------------------------------------------------------------------------------------------------------
# Forward only, double backward, capture (trace / export / compile)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("ours, kw", STACKS)
def test_forward_only_equals_reference(ours, kw, packed):
    """Without grad the kernel runs its lean loop (nothing kept for backward): the same values in float64."""
    module = ours(D, H, num_layers=2, attention_layers=1, batch_first=True, dtype=F64, **kw)
    x = torch.randn(B, T, D, dtype=F64)
    inp = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False) if packed else x
    results = {}
    for impl in ("reference", "fast"):
        module.impl = impl
        with torch.no_grad():
            out, h, gates = module(inp, return_attention=True)
        results[impl] = [out.data if packed else out, *(h if isinstance(h, tuple) else (h,)), *gates]
    for a, b in zip(results["reference"], results["fast"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ours, kw", STACKS[:2])
def test_double_backward(ours, kw):
    """create_graph=True: the fast path's gradients are differentiable and equal the reference path's."""
    module = ours(3, 2, num_layers=1, dtype=F64, **kw)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    results = {}
    for impl in ("reference", "fast"):
        module.impl = impl
        (gx,) = torch.autograd.grad(module(x)[0].pow(2).sum(), x, create_graph=True)
        penalty = gx.pow(2).sum()  # a gradient penalty needs the second derivative
        results[impl] = (gx, *torch.autograd.grad(penalty, [x, *module.parameters()]))
    for a, b in zip(results["reference"], results["fast"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    gradgradcheck_module = ours(2, 2, dtype=F64, **kw)
    xs = torch.randn(2, 1, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda inp: gradgradcheck_module(inp)[0], (xs,))


def test_proj_size_is_refused_clearly():
    with pytest.raises(ValueError, match="proj_size=3 is not supported"):
        EleAttLSTM(D, H, proj_size=3)
    assert EleAttLSTM(D, H, proj_size=0).proj_size == 0


@pytest.mark.parametrize("ours, kw", STACKS[:3])
def test_jit_trace_and_export(ours, kw):
    """torch.jit.trace and torch.export.export of a stack in eval mode (fast impl) record the reference path;
    the exported program keeps batch and time dynamic (its time loop is a scan), the trace holds for its shape."""
    module = ours(D, H, num_layers=2, attention_layers=1, batch_first=True, **kw).eval()
    assert module.impl == "fast"
    x = torch.randn(2, 3, D)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("time")},)
    with torch.no_grad():
        traced = torch.jit.trace(module, (x,), check_trace=False)
        exported = torch.export.export(module, (x,), dynamic_shapes=dims).module()
        for shape, runs in (((2, 3, D), (traced, exported)), ((1, 1, D), (exported,)), ((4, 7, D), (exported,))):
            x = torch.randn(*shape)
            want = module(x)
            for run in runs:
                got = run(x)
                torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
                torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
        assert module.impl == "fast"


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_torch_compile_forward_backward(impl):
    """torch.compile (aot_eager: dynamo + AOT autograd, without inductor's minutes of C++ compile on this CPU)
    gives the eager values and gradients; the fast kernel may be a graph break."""
    torch._dynamo.reset()
    module = EleAttLSTM(5, 4, impl=impl)
    compiled = torch.compile(module, backend="aot_eager")
    x = torch.randn(3, 2, 5, requires_grad=True)
    out, (h, c) = compiled(x)
    (out.sum() + c.sum()).backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in module.parameters())]
    x.grad = None
    module.zero_grad()
    out2, (h2, c2) = module(x)
    (out2.sum() + c2.sum()).backward()
    torch.testing.assert_close(out, out2)
    for a, b in zip(grads, [x.grad, *(p.grad for p in module.parameters())]):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("ours", [EleAttLSTM, EleAttGRU])
def test_torch_compile_inductor(ours):
    """The default backend (inductor) too: minutes on a small CPU, hence slow."""
    torch._dynamo.reset()
    module = ours(5, 4, num_layers=2)
    x = torch.randn(3, 2, 5, requires_grad=True)
    out = torch.compile(module)(x)[0]
    out.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    module(x)[0].sum().backward()
    torch.testing.assert_close(out, module(x)[0])
    torch.testing.assert_close(gx, x.grad)


def test_inference_reuses_step_weights_but_never_stale_ones():
    """No-grad calls reuse the prepared step weights (streaming: one step per call), yet an in-place change of a
    weight, or a new model, is seen at once: the result always equals the reference path."""
    from pipeline.nn import kernel as eleatt_fast

    torch.manual_seed(0)
    m = EleAttLSTM(12, 8, batch_first=True).eval()
    x = torch.randn(2, 3, 12)  # (B, T, D): T > 1, so h_{t-1} and the recurrent weights matter
    with torch.no_grad():
        first = m(x)[0]
        key = (id(m.weight_ih_l0), id(m.weight_hh_l0), id(m.weight_ha_l0), id(m.weight_xa_l0))
        assert key in eleatt_fast._STEP_WEIGHTS  # prepared once, kept for the next step
        cached = eleatt_fast._STEP_WEIGHTS[key][-1]
        assert m(x)[0].equal(first) and eleatt_fast._STEP_WEIGHTS[key][-1] is cached
        m.weight_hh_l0.add_(0.05)  # an in-place update (an optimiser step) bumps the version
        m.weight_ha_l0.mul_(1.5)
        changed = m(x)[0]
        m.impl = "reference"
        assert torch.allclose(changed, m(x)[0], atol=1e-6) and not torch.allclose(changed, first)
        m.impl = "fast"
        m.weight_hh_l0 = torch.nn.Parameter(torch.randn_like(m.weight_hh_l0))  # a replaced tensor
        replaced = m(x)[0]
        m.impl = "reference"
        assert torch.allclose(replaced, m(x)[0], atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Chunks of steps, and the oneDNN products
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_sizes", [(4,) * 7, (4, 4, 3, 3, 2, 1, 1), (1,), (5, 2)], ids=str)
@pytest.mark.parametrize("min_rows", [1, 3, 5, 100])
def test_chunks_cover_every_step_once(batch_sizes, min_rows, monkeypatch):
    from pipeline.nn import kernel as eleatt_fast

    monkeypatch.setattr(eleatt_fast, "_CHUNK_MIN_ROWS", min_rows)
    monkeypatch.setattr(eleatt_fast, "_CHUNK_FLOATS", 1)
    offsets = [sum(batch_sizes[:t]) for t in range(len(batch_sizes))]
    chunks = eleatt_fast._chunks(batch_sizes, offsets, width=8)
    assert [c[0] for c in chunks] == [0] + [c[1] for c in chunks[:-1]] and chunks[-1][1] == len(batch_sizes)
    for t0, t1, r0, r1 in chunks:
        assert t0 < t1 and r0 == offsets[t0] and r1 == offsets[t1 - 1] + batch_sizes[t1 - 1]
    count = max(1, sum(batch_sizes) // min_rows)  # as many chunks as full min_rows fit, at most
    assert len(chunks) <= count
    assert all(r1 - r0 >= sum(batch_sizes) / count for _, _, r0, r1 in chunks[:-1])  # about equal shares
    if min_rows == 100:
        assert len(chunks) == 1  # short sequences: one chunk, the products over all rows at once
    if min_rows == 1 and len(batch_sizes) > 1:
        assert len(chunks) > 1


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("ours, kw", STACKS)
def test_fast_in_chunks_equals_reference(ours, kw, packed, monkeypatch):
    """Long inputs run in chunks of steps (forward W_xa x, backward weight gradients): forcing chunks of a few
    rows, values and every gradient still equal the reference path, with and without grad."""
    from pipeline.nn import kernel as eleatt_fast

    monkeypatch.setattr(eleatt_fast, "_CHUNK_MIN_ROWS", 5)
    monkeypatch.setattr(eleatt_fast, "_CHUNK_FLOATS", 1)
    for sizes in (LENGTHS_SIZES, (B,) * T):
        assert len(eleatt_fast._chunks(sizes, [sum(sizes[:t]) for t in range(T)], 8)) > 2
    module = ours(D, H, num_layers=2, batch_first=True, dtype=F64, **kw)
    x, hx = input_and_state(ours, batch_first=True)
    lengths = LENGTHS if packed else None
    results = {}
    for impl in ("reference", "fast"):
        module.impl = impl
        results[impl] = forward_backward(module, x, lengths, hx, True)
        with torch.no_grad():
            results[impl] += (module(x)[0],)
    (ref_vals, ref_grads, ref_nograd), (fast_vals, fast_grads, fast_nograd) = results["reference"], results["fast"]
    for a, b in zip([*ref_vals, *ref_grads, ref_nograd], [*fast_vals, *fast_grads, fast_nograd]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ours, kw", STACKS)
def test_onednn_and_blas_products_agree_in_float32(ours, kw, monkeypatch):
    """In float32 on CPU the per-step products run through oneDNN (when this torch has it); the torch.mm path
    (other dtypes and devices, ELEATT_ONEDNN=0) gives the same values and gradients up to float32 rounding."""
    from pipeline.nn import kernel as eleatt_fast

    torch.manual_seed(0)
    module = ours(24, 16, num_layers=2, **kw)
    x = torch.randn(9, 5, 24)
    runs = {}
    for onednn in (True, False):
        monkeypatch.setattr(eleatt_fast, "_ONEDNN", [onednn and eleatt_fast._onednn_available()])
        module.zero_grad()
        out, _ = module(x)
        (out * out.cos()).sum().backward()
        with torch.no_grad():
            runs[onednn] = [out, module(x)[0], *(p.grad.clone() for p in module.parameters())]
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_onednn_can_be_switched_off(monkeypatch):
    from pipeline.nn import kernel as eleatt_fast

    monkeypatch.setattr(eleatt_fast, "_ONEDNN", [])
    monkeypatch.setenv("ELEATT_ONEDNN", "0")
    assert eleatt_fast._onednn_available() is False
    assert not eleatt_fast._Rows(torch.randn(3, 2)).onednn


def test_prepared_step_weights_are_dropped_with_their_model():
    """The no-grad cache of prepared weights does not outlive the model: deleting it frees its entries."""
    import gc

    from pipeline.nn import kernel as eleatt_fast

    m = EleAttGRU(12, 8, num_layers=2).eval()
    with torch.no_grad():
        m(torch.randn(3, 2, 12))
    keys = [k for k in eleatt_fast._STEP_WEIGHTS if id(m.weight_ih_l0) in k or id(m.weight_ih_l1) in k]
    assert len(keys) == 2  # one entry per gated layer
    del m
    gc.collect()
    assert not any(k in eleatt_fast._STEP_WEIGHTS for k in keys)


# --------------------------------------------------------------------------------------------------------------
# The no-grad cache of prepared step weights: never stale, tensor by tensor
# --------------------------------------------------------------------------------------------------------------
CACHED_STACKS = [pytest.param(EleAttLSTM, id="lstm"), pytest.param(EleAttGRU, id="gru")]
TENSORS = ["weight_xa", "weight_ih", "weight_hh", "weight_ha", "bias_ih", "bias_hh", "bias_a"]


def _cached_model(ours):
    """A 2-layer all-gated float32 stack (float32 on CPU: the oneDNN-reordered weights are the cached ones) and
    an input long enough (T=5) for h_{t-1}, hence W_hh and W_ha, to matter."""
    torch.manual_seed(0)
    return ours(6, 5, num_layers=2).eval(), torch.randn(5, 3, 6)


def _no_grad_and_reference(m, x):
    """(out, h_n) of the fast path without grad, and of the reference path, on the module's current weights."""
    with torch.no_grad():
        fast = m(x)
        m.impl = "reference"
        ref = m(x)
        m.impl = "fast"
    flat = lambda r: torch.cat([r[0].flatten(), *(s.flatten() for s in (r[1] if isinstance(r[1], tuple)  # noqa
                                                                          else (r[1],)))])
    return flat(fast), flat(ref)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", TENSORS)
@pytest.mark.parametrize("ours", CACHED_STACKS)
def test_no_grad_cache_sees_an_in_place_change_of_each_tensor(ours, name, layer, monkeypatch):
    from pipeline.nn import kernel as eleatt_fast

    prepared = []  # every weight prepared for the step products (3 per gated layer and cache miss)

    class Counted(eleatt_fast._Rows):
        def __init__(self, *args, **kwargs):
            prepared.append(args[0].shape)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(eleatt_fast, "_Rows", Counted)
    m, x = _cached_model(ours)
    before, ref = _no_grad_and_reference(m, x)
    torch.testing.assert_close(before, ref, atol=1e-5, rtol=1e-5)
    assert len(prepared) == 6
    assert _no_grad_and_reference(m, x)[0].equal(before) and len(prepared) == 6  # a second call: all from the cache
    p = getattr(m, f"{name}_l{layer}")
    with torch.no_grad():
        p.add_(0.5)  # as an optimiser step or load_state_dict would: in place, under no_grad
    after, ref = _no_grad_and_reference(m, x)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", ["weight_xa", "weight_ih", "weight_hh", "weight_ha"])
@pytest.mark.parametrize("ours", CACHED_STACKS)
@pytest.mark.parametrize("how", ["parameter", "data"])
def test_no_grad_cache_sees_a_replaced_weight(ours, name, layer, how):
    """A new Parameter (module.weight_ih_l0 = nn.Parameter(...)), or new contents through `.data = ...` (what
    `vector_to_parameters` and `module.to()` do: same Parameter object, same version counter)."""
    m, x = _cached_model(ours)
    before, _ = _no_grad_and_reference(m, x)
    attr = f"{name}_l{layer}"
    old = getattr(m, attr)  # still referenced (as an optimiser would): its cache entry is not freed with it
    new = old.detach() + torch.randn_like(old) * 0.5
    if how == "parameter":
        setattr(m, attr, torch.nn.Parameter(new))
    else:
        old.data = new
    after, ref = _no_grad_and_reference(m, x)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-3
    del old


def test_no_grad_cache_sees_whole_model_changes():
    """vector_to_parameters (every weight's `.data` replaced), a transposed view of the same storage (same
    address, other strides), and a dtype change (`.double()`) after float32 calls: each is seen at once."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    m, x = _cached_model(EleAttLSTM)
    before, _ = _no_grad_and_reference(m, x)
    vector_to_parameters(parameters_to_vector(m.parameters()).detach() * 1.5, m.parameters())
    scaled, ref = _no_grad_and_reference(m, x)
    torch.testing.assert_close(scaled, ref, atol=1e-5, rtol=1e-5)
    assert (scaled - before).abs().max() > 1e-3
    w = m.weight_xa_l0  # (6, 6): its transpose is a view of the same storage
    w.data = w.data.t()
    assert w.data_ptr() == m.weight_xa_l0.data_ptr()
    transposed, ref = _no_grad_and_reference(m, x)
    torch.testing.assert_close(transposed, ref, atol=1e-5, rtol=1e-5)
    assert (transposed - scaled).abs().max() > 1e-3
    m.double()
    double, ref = _no_grad_and_reference(m, x.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(double, ref)
    torch.testing.assert_close(double, transposed.double(), atol=1e-5, rtol=1e-5)


def test_no_grad_cache_holds_at_most_32_entries_and_a_refresh_evicts_no_other(monkeypatch):
    """The cache is bounded (32 gated layers; the oldest go first), and refreshing a stale entry replaces it
    without pushing out another model's."""
    from pipeline.nn import kernel as eleatt_fast

    cache: dict = {}
    monkeypatch.setattr(eleatt_fast, "_STEP_WEIGHTS", cache)
    torch.manual_seed(0)
    models = [EleAttGRU(4, 3).eval() for _ in range(40)]  # all kept alive: nothing is freed
    x = torch.randn(2, 1, 4)
    key = lambda m: (id(m.weight_ih_l0), id(m.weight_hh_l0), id(m.weight_ha_l0), id(m.weight_xa_l0))  # noqa
    with torch.no_grad():
        for m in models:
            m(x)
    assert len(cache) == 32 and set(cache) == {key(m) for m in models[8:]}  # the first 8 went
    with torch.no_grad():
        models[20].weight_hh_l0.add_(0.5)
        refreshed = models[20](x)[0]
        models[20].impl = "reference"
        torch.testing.assert_close(refreshed, models[20](x)[0], atol=1e-5, rtol=1e-5)
    assert len(cache) == 32 and set(cache) == {key(m) for m in models[8:]}


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("ours, kw", STACKS)
def test_float32_gradients_through_onednn_equal_the_float64_reference(ours, kw, packed, chunked, monkeypatch):
    """In float32 on CPU the weight gradients and dL/dx through W_xa are oneDNN products on transposed rows (summed
    over chunks of steps): every value and gradient, of the input and initial state too, equals the float64
    reference definition on the same weights up to float32 rounding."""
    import copy

    from pipeline.nn import kernel as eleatt_fast

    if not eleatt_fast._onednn_available():
        pytest.skip("this torch build has no working oneDNN linear")
    if chunked:
        monkeypatch.setattr(eleatt_fast, "_CHUNK_MIN_ROWS", 5)
        monkeypatch.setattr(eleatt_fast, "_CHUNK_FLOATS", 1)
    torch.manual_seed(0)
    fast = ours(D, H, num_layers=2, batch_first=True, **kw)
    assert fast.impl == "fast" and eleatt_fast._uses_onednn(next(fast.parameters()))
    reference = copy.deepcopy(fast).double()
    reference.impl = "reference"
    x64, hx64 = input_and_state(ours, batch_first=True)
    x32 = x64.detach().float().requires_grad_()
    hx32 = tuple(h.detach().float().requires_grad_() for h in hx64) if isinstance(hx64, tuple) else \
        hx64.detach().float().requires_grad_()
    lengths = LENGTHS if packed else None
    vals32, grads32 = forward_backward(fast, x32, lengths, hx32, True)
    vals64, grads64 = forward_backward(reference, x64, lengths, hx64, True)
    assert len(grads32) == len(grads64) > 3
    for a, b in zip([*vals32, *grads32], [*vals64, *grads64]):
        assert a.dtype == torch.float32 and b.dtype == F64
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
