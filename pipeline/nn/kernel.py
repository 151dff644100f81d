"""The fast EleAtt kernel: one custom autograd Function per gated layer; ungated layers run torch's fused kernel.

The gate reads h_{t-1}, so the fused cuDNN/oneDNN RNN cannot run a gated layer. Per gated layer this module
- computes W_xa x_t for a chunk of steps (about a thousand rows or more) in one matrix product;
- does one product per step on h_{t-1} for the gate and the cell together: h @ [W_ha; W_hh]^T;
- writes every per-step result into buffers allocated once per call (no per-step allocation of big tensors);
- in backward, runs only the data gradients step by step (dh_{t-1} again in one product with [W_ha; W_hh]),
  storing the pre-activation gradients of a chunk's steps, then adds that chunk's share of all weight gradients,
  the bias gradients and the input gradient through W_xa as a few large products.
Chunks keep the big temporaries (W_xa x, the pre-activation gradients) to a few MB that the allocator reuses,
instead of N-row buffers that are page-faulted afresh on every call, at no cost in product efficiency (these
products run as fast from ~800 rows up as at 6400).
On CPU in float32 the per-step products run through oneDNN on weights reordered once per call (or once per
weight version without grad) into its blocked layout: at the small row counts of a time step (a batch of 1-32
sequences) that runs 2-3x faster than the BLAS product of the same shapes, which is also what the fused
`nn.LSTM`/`nn.GRU` use on CPU. The backward's chunk products (the weight gradients, dL/dx through W_xa) run
through oneDNN too, on the transposed rows: MKL's product with a transposed operand reached half oneDNN's
throughput on the development CPU. Other dtypes and devices use `torch.mm`; `ELEATT_ONEDNN=0` forces that path.
Everything works in packed layout: x (N, D) holds the steps one after the other, step t holding the first
batch_sizes[t] sequences (an unpacked (T, B, D) input is the case batch_sizes = [B] * T).
`pipeline.nn.steps.reference_layer` is the definition this kernel is tested against.
"""
from __future__ import annotations

import functools
import os
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, _VF

from pipeline.nn.steps import State, compiler_flag, reference_layer


def _layout(batch_sizes: Sequence[int], device) -> tuple[list[int], bool, Tensor | None, Tensor | None]:
    """Row offsets of each step; for packed (shrinking) batches the gather indices of h_{t-1} and of the finals.

    Buffers hold [initial state (B rows); step 0; step 1; ...]. Returns (offsets, uniform, prev_index, last_index):
    prev_index (N,) picks h_{t-1} of every row of x from such a buffer, last_index (B,) the final state of each
    sequence (its last valid step). Both are None when all steps have the full batch.
    """
    offsets, total = [], 0
    for bs in batch_sizes:
        offsets.append(total)
        total += bs
    batch = batch_sizes[0]
    if all(bs == batch for bs in batch_sizes):
        return offsets, True, None, None
    bs_t = torch.tensor(batch_sizes, dtype=torch.long)  # (T,) rows of each step
    off_t = torch.tensor(offsets, dtype=torch.long)  # (T,) first row of each step in x
    prev_start = torch.cat([torch.zeros(1, dtype=torch.long), batch + off_t[:-1]])  # buffer row of h_{t-1}[0]
    row_in_step = torch.arange(total) - torch.repeat_interleave(off_t, bs_t)  # (N,)
    prev_index = torch.repeat_interleave(prev_start, bs_t) + row_in_step  # (N,)
    lengths = (bs_t.unsqueeze(1) > torch.arange(batch)).sum(0)  # (B,) steps of each sequence
    last_index = batch + off_t[lengths - 1] + torch.arange(batch)  # (B,)
    return offsets, False, prev_index.to(device), last_index.to(device)


_CHUNK_MIN_ROWS = 1024  # rows of a chunk's products: from here up they run at full speed
_CHUNK_FLOATS = 1 << 22  # ... or enough rows to fill ~16 MB of float32 at the buffer's width


def _chunks(batch_sizes: Sequence[int], offsets: Sequence[int], width: int) -> list[tuple[int, int, int, int]]:
    """Consecutive step ranges of about equal rows: [(t0, t1, r0, r1)] for steps t0..t1-1 = rows r0..r1-1.

    width: floats per row of the largest chunk buffer. A sequence under ~2 chunks' rows is one chunk.
    """
    steps = len(batch_sizes)
    n = offsets[-1] + batch_sizes[-1]
    count = max(1, n // max(_CHUNK_MIN_ROWS, _CHUNK_FLOATS // max(width, 1)))
    share = n / count
    out, t0 = [], 0
    for t in range(steps):
        r0, r1 = offsets[t0], offsets[t] + batch_sizes[t]
        if r1 - r0 >= share and len(out) < count - 1 and t + 1 < steps:
            out.append((t0, t + 1, r0, r1))
            t0 = t + 1
    out.append((t0, steps, offsets[t0], n))
    return out


def _accumulate(acc: Tensor | None, dy: Tensor, x: Tensor, onednn: bool = False) -> Tensor:
    """acc + dy^T x (acc None: dy^T x) for dy (n, M), x (n, K): a weight's gradient summed over rows, chunk by chunk.

    onednn (CPU float32, see `_uses_onednn`): oneDNN's linear on the transposed views, (M, n) rows times the (K, n)
    weight: 2x the throughput of MKL's product on the development CPU (AMD EPYC: ~215 vs ~106 GFLOP/s on one
    thread, M, K in {512, 1536, 2048, 3584} at 800 rows), transposing copies included.
    Otherwise one product with the transposed left operand: MKL runs it as fast as the swapped form (x^T dy)^T
    and saves that form's transposing copy.
    """
    if onednn:
        y = torch.ops.mkldnn._linear_pointwise(dy.t().contiguous(), x.t().contiguous(), None, "none", [], "")
        return y if acc is None else acc.add_(y)
    return dy.t() @ x if acc is None else acc.addmm_(dy.t(), x)


def _gate_forward(z: Tensor, gate: str) -> None:
    """In place: pre-activation -> gate value."""
    if gate == "sigmoid":
        z.sigmoid_()
    else:
        z.copy_(torch.softmax(z, dim=-1))


def _gate_backward(da: Tensor, a: Tensor, gate: str, out: Tensor) -> None:
    """dL/dz from dL/da for a = gate(z), written into out (da may be overwritten)."""
    if gate == "sigmoid":
        torch.mul(da.mul_(a), 1 - a, out=out)
    else:
        torch.mul(a, da - (da * a).sum(-1, keepdim=True), out=out)


# The inputs of EleAttLayerFunction.forward after ctx, in order: backward returns one gradient per slot.
_SLOTS = ("mode", "gate", "batch_sizes", "x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_xa", "w_ha", "b_a")


_ONEDNN: list[bool] = []  # filled on first use


def _onednn_available() -> bool:
    """Whether oneDNN's prepacked linear works in this torch build (checked once, on a tiny product)."""
    if not _ONEDNN:
        works = os.environ.get("ELEATT_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
        if works:
            try:
                w, x = torch.randn(3, 4), torch.randn(2, 4)
                packed = torch.ops.mkldnn._reorder_linear_weight(w)
                y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                works = bool(torch.allclose(y, x @ w.t(), atol=1e-5))
            except (AttributeError, RuntimeError):
                works = False
        _ONEDNN.append(works)
    return _ONEDNN[0]


class _Rows:
    """A weight W (M, K) prepared for many products with rows: y (n, M) = x (n, K) @ W^T (+ bias (M,)).

    CPU float32: W reordered once into oneDNN's blocked layout (`pack=True`; cheaper than a transpose) or used
    as it is for a one-off product. Elsewhere: W^T made contiguous for `torch.mm` (at small row counts MKL runs
    h @ W.t() on an (M, K) weight up to 2x slower than on its contiguous transpose).
    """

    __slots__ = ("onednn", "weight")

    def __init__(self, w: Tensor, pack: bool = True):
        self.onednn = _uses_onednn(w)
        if self.onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.contiguous()) if pack else w  # (M, K)
        else:
            self.weight = w.t().contiguous() if pack else w.t()  # (K, M)

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (n, K) -> (n, M), a new contiguous tensor."""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
        return torch.mm(x, self.weight) if bias is None else torch.addmm(bias, x, self.weight)

    def add_to(self, out: Tensor, x: Tensor) -> None:
        """out (n, M) += x (n, K) @ W^T."""
        if self.onednn:
            out.add_(torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], ""))
        else:
            out.addmm_(x, self.weight)


def _uses_onednn(t: Tensor) -> bool:
    """Whether the products on `t` (a weight, or a gradient's rows) run through oneDNN: CPU float32, not under
    torch.compile (inductor lowers oneDNN's linear only for weights that are graph constants, and these are
    parameters), a torch build where it works and `ELEATT_ONEDNN` is not 0."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and not compiler_flag("is_compiling")
            and _onednn_available())


# Inference (streaming above all: one step per call) would otherwise rebuild the step weights on every call,
# which costs more than the step itself at small sizes. An entry is served only to the same weights, unchanged:
# - weak references to the weight objects (a freed or replaced Parameter misses; a freed one drops its entry);
# - their version counters (an in-place change under no_grad, as optimisers and load_state_dict make);
# - their data (address, shape, strides, dtype, device), against detached aliases the entry keeps, so that the
#   old storage cannot be freed and its address reused: `.data = ...` (vector_to_parameters, module.to(),
#   .double()) swaps a Parameter's tensor without touching its object or its version counter.
# Not seen: an in-place change through `.data` (`p.data.add_(...)`), which bypasses the version counter by design;
# change weights in place under `torch.no_grad()` instead.
_STEP_WEIGHTS: dict[tuple[int, ...], tuple[tuple, tuple[int, ...], tuple, tuple[_Rows, _Rows, _Rows]]] = {}
_STEP_WEIGHTS_MAX = 32


def _step_weights(w_ih: Tensor, w_hh: Tensor, w_ha: Tensor, w_xa: Tensor, cache: bool, pack_xa: bool
                  ) -> tuple[_Rows, _Rows, _Rows]:
    """Prepared weights: [W_ha; W_hh] (D + G, H) for h_{t-1} rows, W_ih for x~_t rows, W_xa for x rows.

    cache (inference): keep them for the next call with the same, unchanged weights. W_xa is reordered only when
    cached or used for several chunks (for one product the reorder costs more than it saves).
    """
    weights = (w_ih, w_hh, w_ha, w_xa)
    cache = cache and not torch.is_grad_enabled()
    if cache:
        key = tuple(id(w) for w in weights)
        versions = tuple(w._version for w in weights)
        hit = _STEP_WEIGHTS.get(key)
        if (hit is not None and hit[1] == versions and all(r() is w for r, w in zip(hit[0], weights))
                and all(_same_data(a, w) for a, w in zip(hit[2], weights))):
            return hit[3]
    w_cat = torch.cat([w_ha, w_hh])  # (D + G, H): the one product on h_{t-1} per step
    prepared = (_Rows(w_cat), _Rows(w_ih), _Rows(w_xa, pack=pack_xa or cache))
    if cache:
        if key not in _STEP_WEIGHTS and len(_STEP_WEIGHTS) >= _STEP_WEIGHTS_MAX:
            _STEP_WEIGHTS.pop(next(iter(_STEP_WEIGHTS)))
        # When a weight is freed (its model deleted), its entry goes with it: the prepared copies are not kept
        # for the remaining entries' sake (a sweep over models in one process would otherwise hold 32 of them).
        refs = tuple(weakref.ref(w, functools.partial(_forget_step_weights, key)) for w in weights)
        aliases = tuple(w.detach() for w in weights)  # the data as prepared (shares storage: no copy)
        _STEP_WEIGHTS[key] = (refs, versions, aliases, prepared)
    return prepared


def _same_data(alias: Tensor, w: Tensor) -> bool:
    """Whether `w` still holds the data `alias` was taken from (not swapped by `w.data = ...`)."""
    return (alias.data_ptr() == w.data_ptr() and alias.stride() == w.stride() and alias.shape == w.shape
            and alias.dtype == w.dtype and alias.device == w.device)


def _forget_step_weights(key: tuple[int, ...], dead_ref) -> None:
    entry = _STEP_WEIGHTS.get(key)
    if entry is not None and any(r is dead_ref for r in entry[0]):  # not a newer entry under a reused id
        del _STEP_WEIGHTS[key]


def _run_layer(mode: str, gate: str, batch_sizes: Sequence[int], x: Tensor, h0: Tensor, c0: Tensor,
               w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
               w_xa: Tensor, w_ha: Tensor, b_a: Tensor | None, keep: bool) -> dict:
    """The forward time loop of one gated layer (packed layout), shared by training and inference.

    keep=True stores what backward reads for every step (the activations `acts` (N, G or 4H) and the modulated
    inputs `xt` (N, D)); keep=False (inference) writes them into one step's scratch rows instead, which keeps
    the working set in cache and saves two N-row buffers. Returns a dict of the buffers (see the code).
    """
    n, d = x.shape  # x (N, D)
    batch, hid = h0.shape  # h0 (B, H)
    lstm, gru = mode == "LSTM", mode == "GRU"
    g = w_ih.size(0)  # G = chunks * H
    offsets, uniform, prev_index, last_index = _layout(batch_sizes, x.device)
    chunks = _chunks(batch_sizes, offsets, d + g)
    cat_rows, ih_rows, xa_rows = _step_weights(w_ih, w_hh, w_ha, w_xa, cache=not keep, pack_xa=len(chunks) > 1)
    b_cat = _cat_bias(mode, d, g, b_ih, b_hh, b_a, x)  # (D + G,)

    gates = x.new_empty(n, d)  # (N, D) a_t
    acts_rows = 4 * hid if gru else g  # LSTM: i,f,g,o; GRU: r,z,n,W_hn h+b_hn; RNN: unused (h is in hbuf)
    xt = x.new_empty(n if keep else batch, d)  # (N or B, D) x~_t = a_t * x_t
    acts = x.new_empty(n if keep else batch, acts_rows)  # (N or B, 4H | G)
    hbuf = x.new_empty(batch + n, hid)  # (B + N, H): [h0; h_0..h_{T-1}]
    hbuf[:batch] = h0
    cbuf = None
    if lstm:
        # (B + N, H) [c0; c_0..]; inference keeps two (B, H) halves and swaps them step by step
        cbuf = x.new_empty(batch + n, hid) if keep else x.new_empty(2, batch, hid)
        (cbuf[:batch] if keep else cbuf[0]).copy_(c0)
    prev = 0  # buffer row of h_{t-1}[0]
    for t0, t1, r0, r1 in chunks:
        xa = xa_rows(x[r0:r1])  # (rows, D): W_xa x_t for the chunk's steps at once
        for t in range(t0, t1):
            bs, o = batch_sizes[t], offsets[t]
            rows, nxt = slice(o, o + bs), slice(batch + o, batch + o + bs)
            srows = rows if keep else slice(0, bs)  # this step's rows of xt and acts
            h_prev = hbuf[prev:prev + bs]  # (bs, H)
            z = cat_rows(h_prev, b_cat)  # (bs, H) -> (bs, D + G) [W_ha h + b_a | W_hh h (+ b)]
            a = gates[rows]  # (bs, D)
            torch.add(xa[o - r0:o - r0 + bs], z[:, :d], out=a)  # (bs, D) gate pre-activation
            _gate_forward(a, gate)
            x_t = xt[srows]  # (bs, D)
            torch.mul(a, x[rows], out=x_t)  # (bs, D)
            h_new = hbuf[nxt]  # (bs, H)
            if lstm:
                ifgo = acts[srows]  # (bs, 4H) pre-activations, then activations in place
                torch.add(ih_rows(x_t), z[:, d:], out=ifgo)  # (bs, D) -> (bs, 4H), plus the h side
                ifgo[:, :2 * hid].sigmoid_()
                ifgo[:, 2 * hid:3 * hid].tanh_()
                ifgo[:, 3 * hid:].sigmoid_()
                i, f, gg, og = ifgo.chunk(4, 1)  # each (bs, H)
                if keep:
                    c_prev, c_new = cbuf[prev:prev + bs], cbuf[nxt]  # (bs, H)
                else:
                    c_prev, c_new = cbuf[t % 2, :bs], cbuf[(t + 1) % 2, :bs]
                    if bs < batch:  # ended sequences keep their c (only their h row is read at the end)
                        cbuf[(t + 1) % 2, bs:] = cbuf[t % 2, bs:]
                torch.mul(f, c_prev, out=c_new)
                c_new.addcmul_(i, gg)
                torch.tanh(c_new, out=h_new)
                h_new.mul_(og)
            elif gru:
                act = acts[srows]  # (bs, 4H)
                r_z, nn_, hn = act[:, :2 * hid], act[:, 2 * hid:3 * hid], act[:, 3 * hid:]  # (bs, 2H), (bs, H), (bs, H)
                gi = ih_rows(x_t, b_ih)  # (bs, D) -> (bs, 3H) W_ih x~ + b_ih
                torch.add(gi[:, :2 * hid], z[:, d:d + 2 * hid], out=r_z).sigmoid_()  # (bs, 2H) r, z
                hn.copy_(z[:, d + 2 * hid:])  # (bs, H) W_hn h + b_hn
                torch.addcmul(gi[:, 2 * hid:], r_z[:, :hid], hn, out=nn_).tanh_()  # (bs, H) n
                # h = (1 - z) n + z h_prev = n + z (h_prev - n)
                torch.sub(h_prev, nn_, out=h_new)
                h_new.mul_(r_z[:, hid:]).add_(nn_)
            else:
                torch.add(ih_rows(x_t), z[:, d:], out=h_new)  # (bs, D) -> (bs, H), plus the h side
                h_new.tanh_() if mode == "RNN_TANH" else h_new.relu_()
            prev = batch + o

    out = hbuf[batch:]  # (N, H)
    if uniform:
        h_n = hbuf[n:].clone()  # (B, H) last step's rows
        c_n = (cbuf[n:] if keep else cbuf[len(batch_sizes) % 2]).clone() if lstm else x.new_empty(0)
    else:
        h_n = hbuf.index_select(0, last_index)  # (B, H)
        if not lstm:
            c_n = x.new_empty(0)
        elif keep:
            c_n = cbuf.index_select(0, last_index)
        else:
            c_n = cbuf[len(batch_sizes) % 2].clone()  # rows of ended sequences were carried along
    return dict(out=out, h_n=h_n, c_n=c_n, gates=gates, hbuf=hbuf, cbuf=cbuf, acts=acts, xt=xt,
                offsets=offsets, uniform=uniform, prev_index=prev_index, last_index=last_index)


class EleAttLayerFunction(torch.autograd.Function):
    """One gated layer over a packed sequence: (x, h0, c0, weights...) -> (out, h_n, c_n, gates).

    mode in {"LSTM", "GRU", "RNN_TANH", "RNN_RELU"}; c0/c_n are empty tensors except for the LSTM.
    x (N, D), h0/c0 (B, H), out (N, H), h_n/c_n (B, H), gates (N, D). The inputs are `_SLOTS`.
    Double backward (create_graph=True) differentiates the reference definition instead (see backward).
    """

    @staticmethod
    def forward(ctx, mode: str, gate: str, batch_sizes: tuple[int, ...], x: Tensor, h0: Tensor, c0: Tensor,
                w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                w_xa: Tensor, w_ha: Tensor, b_a: Tensor | None):
        ctx.set_materialize_grads(False)
        with torch.autocast(x.device.type, enabled=False):  # the buffers have one dtype; see gated_layer
            r = _run_layer(mode, gate, batch_sizes, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_xa, w_ha, b_a, keep=True)
        ctx.mode, ctx.gate, ctx.batch_sizes, ctx.offsets = mode, gate, batch_sizes, r["offsets"]
        ctx.prev_index, ctx.uniform = r["prev_index"], r["uniform"]
        ctx.has_bias, ctx.has_gate_bias = b_ih is not None, b_a is not None
        # The inputs themselves (no copies) are kept for double backward through the reference definition.
        ctx.save_for_backward(r["hbuf"], r["cbuf"], r["acts"], r["gates"], r["xt"],
                              x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_xa, w_ha, b_a)
        # out: a tensor of its own, callers may modify it
        return r["out"].clone(), r["h_n"], r["c_n"], r["gates"]

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, d_gates):
        hbuf, cbuf, acts, gates, xt, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must themselves be differentiable
            return _reference_backward(ctx, inputs, (d_out, d_hn, d_cn, d_gates))
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_xa, w_ha, b_a = inputs
        mode, gate, batch_sizes, offsets = ctx.mode, ctx.gate, ctx.batch_sizes, ctx.offsets
        lstm, gru = mode == "LSTM", mode == "GRU"
        n, d = x.shape  # x (N, D)
        batch, hid = hbuf.size(0) - n, hbuf.size(1)  # hbuf (B + N, H)
        g = w_ih.size(0)  # G

        # Running dL/dh and dL/dc (B, H) of every sequence: a sequence that ended at step t keeps its d_hn until then.
        dh = d_hn.clone() if d_hn is not None else x.new_zeros(batch, hid)
        dc = (d_cn.clone() if d_cn is not None else x.new_zeros(batch, hid)) if lstm else None
        need = dict(zip(_SLOTS, ctx.needs_input_grad))
        dx = x.new_empty(n, d) if need["x"] else None  # (N, D) dL/dx
        grad_ih = _Rows(w_ih.t())  # dL/dx~ = dL/d(W_ih x~) @ W_ih: rows (bs, G) -> (bs, D)
        # dL/dh_{t-1} = [dz_a | dz_h] @ [W_ha; W_hh]: rows (bs, D + G) -> (bs, H); one pass builds the transpose
        grad_cat = _Rows(torch.cat([w_ha.t(), w_hh.t()], 1))  # (H, D + G)
        chunks = _chunks(batch_sizes, offsets, d + g)
        # dL/dx through W_xa, after each chunk: rows (rows, D) -> (rows, D); reordered only for several chunks
        grad_xa = _Rows(w_xa.t(), pack=len(chunks) > 1) if dx is not None else None
        onednn = _uses_onednn(x)  # the weight gradients' products
        most = max(r1 - r0 for _, _, r0, r1 in chunks)
        dz_buf = x.new_empty(most, d + g)  # a chunk's [dL/d(gate pre-activation) | dL/d(h-side pre-activations)]
        dgi_buf = x.new_empty(most, g) if gru else None  # GRU: dL/d(W_ih x~ + b_ih) differs from the h side
        bias = ctx.has_bias or ctx.has_gate_bias
        sums = sums_gi = d_w_cat = d_w_ih = d_w_xa = None  # accumulated over the chunks
        for t0, t1, r0, r1 in reversed(chunks):
            dz, dgi = dz_buf[:r1 - r0], (dgi_buf[:r1 - r0] if gru else None)  # (rows, D + G), (rows, 3H)
            for t in range(t1 - 1, t0 - 1, -1):
                bs, o = batch_sizes[t], offsets[t]
                rows, crows = slice(o, o + bs), slice(o - r0, o - r0 + bs)  # in x and in the chunk buffers
                prev = 0 if t == 0 else batch + offsets[t - 1]
                dh_t = dh[:bs]  # (bs, H)
                if d_out is not None:
                    dh_t.add_(d_out[rows])
                if lstm:
                    i, f, gg, og = acts[rows].chunk(4, 1)  # each (bs, H)
                    c_t = cbuf[batch + o:batch + o + bs]  # (bs, H)
                    tc = torch.tanh(c_t)  # (bs, H)
                    dc_t = dc[:bs]  # (bs, H)
                    dc_t.addcmul_(dh_t * og, 1 - tc * tc)
                    dg = dz[crows, d:]  # (bs, 4H)
                    di, df, dgg, do = dg.chunk(4, 1)
                    torch.mul(dc_t * gg, i * (1 - i), out=di)
                    torch.mul(dc_t * cbuf[prev:prev + bs], f * (1 - f), out=df)
                    torch.mul(dc_t * i, 1 - gg * gg, out=dgg)
                    torch.mul(dh_t * tc, og * (1 - og), out=do)
                    dc_t.mul_(f)
                    dgi_t = dg
                    dh_direct = None
                elif gru:
                    act = acts[rows]  # (bs, 4H)
                    r, zg, nn_, hn = act[:, :hid], act[:, hid:2 * hid], act[:, 2 * hid:3 * hid], act[:, 3 * hid:]
                    h_prev = hbuf[prev:prev + bs]  # (bs, H)
                    dgi_t = dgi[crows]  # (bs, 3H)
                    d_r, d_z, d_n = dgi_t.chunk(3, 1)
                    torch.mul(dh_t * (1 - zg), 1 - nn_ * nn_, out=d_n)  # dL/d(n pre-activation)
                    torch.mul(dh_t * (h_prev - nn_), zg * (1 - zg), out=d_z)
                    torch.mul(d_n * hn, r * (1 - r), out=d_r)
                    dg = dz[crows, d:]  # (bs, 3H)
                    dg[:, :2 * hid] = dgi_t[:, :2 * hid]
                    torch.mul(d_n, r, out=dg[:, 2 * hid:])
                    dh_direct = dh_t * zg  # (bs, H)
                else:
                    h_t = hbuf[batch + o:batch + o + bs]  # (bs, H)
                    dg = dz[crows, d:]  # (bs, H)
                    if mode == "RNN_TANH":
                        torch.mul(dh_t, 1 - h_t * h_t, out=dg)
                    else:
                        torch.mul(dh_t, h_t > 0, out=dg)
                    dgi_t = dg
                    dh_direct = None
                a = gates[rows]  # (bs, D)
                dxt_t = grad_ih(dgi_t)  # dL/dx~ (bs, D)
                if dx is not None:
                    torch.mul(dxt_t, a, out=dx[rows])  # the path through x~ = a * x; W_xa's part after the chunk
                da = dxt_t.mul_(x[rows])  # dL/da (bs, D)
                if d_gates is not None:
                    da.add_(d_gates[rows])
                _gate_backward(da, a, gate, out=dz[crows, :d])
                if dh_direct is None:
                    dh_t.copy_(grad_cat(dz[crows]))  # dL/dh_{t-1} (bs, H)
                else:
                    torch.add(grad_cat(dz[crows]), dh_direct, out=dh_t)  # (bs, H), plus the direct path through z

            # The chunk's share of the products over all steps.
            rows = slice(r0, r1)
            dz_a = dz[:, :d]  # (rows, D)
            dgi_c = dgi if gru else dz[:, d:]  # (rows, G)
            if dx is not None:
                grad_xa.add_to(dx[rows], dz_a)  # (rows, D) @ (D, D)
            if need["w_hh"] or need["w_ha"]:
                h_prev = hbuf[r0:r1] if ctx.uniform else hbuf.index_select(0, ctx.prev_index[r0:r1])  # (rows, H)
                d_w_cat = _accumulate(d_w_cat, dz, h_prev, onednn)  # (D + G, H)
            if need["w_ih"]:
                d_w_ih = _accumulate(d_w_ih, dgi_c, xt[rows], onednn)  # (G, D)
            if need["w_xa"]:
                d_w_xa = _accumulate(d_w_xa, dz_a, x[rows], onednn)  # (D, D)
            if bias:
                # column sums as (1, rows) @ (rows, .): a matrix product runs ~5x faster than dz.sum(0) here
                ones = x.new_ones(r1 - r0, 1)
                sums = _accumulate(sums, ones, dz)  # (1, D + G)
                if gru and ctx.has_bias and need["b_ih"]:
                    sums_gi = _accumulate(sums_gi, ones, dgi)  # (1, 3H)

        grads: dict[str, Tensor | None] = {}
        grads["x"] = dx  # (N, D)
        grads["h0"] = dh if need["h0"] else None  # (B, H)
        grads["c0"] = dc if lstm and need["c0"] else None  # (B, H)
        grads["w_ha"] = d_w_cat[:d] if need["w_ha"] else None  # (D, H)
        grads["w_hh"] = d_w_cat[d:] if need["w_hh"] else None  # (G, H)
        grads["w_ih"] = d_w_ih  # (G, D)
        grads["w_xa"] = d_w_xa  # (D, D)
        if bias:
            grads["b_a"] = sums[0, :d] if ctx.has_gate_bias and need["b_a"] else None  # (D,)
            grads["b_hh"] = sums[0, d:] if ctx.has_bias and need["b_hh"] else None  # (G,)
            if ctx.has_bias and need["b_ih"]:
                # b_ih and b_hh get the same values, but each its own tensor: autograd may adopt a returned
                # gradient as .grad and accumulate into it in place later.
                grads["b_ih"] = sums_gi[0] if gru else sums[0, d:].clone()  # (G,)
        return tuple(grads.get(name) for name in _SLOTS)


def _reference_backward(ctx, inputs, grad_outputs) -> tuple:
    """Gradients that are themselves differentiable (create_graph=True): the layer is run again through the
    readable reference definition on the saved inputs, and autograd differentiates that graph."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_xa, w_ha, b_a = inputs
    named = dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_xa=w_xa, w_ha=w_ha, b_a=b_a)
    wanted = [k for k, need in zip(_SLOTS, ctx.needs_input_grad) if need and named.get(k) is not None]
    lstm = ctx.mode == "LSTM"
    with torch.enable_grad():
        out, final, gates = reference_layer(ctx.mode, x, ctx.batch_sizes, (h0, c0) if lstm else (h0,),
                                            (w_ih, w_hh, b_ih, b_hh), (w_xa, w_ha, b_a), ctx.gate)
        outputs = [out, final[0], final[1] if lstm else None, gates]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None]
        found = torch.autograd.grad([o for o, _ in pairs], [named[k] for k in wanted], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    grads = dict(zip(wanted, found))
    return tuple(grads.get(name) for name in _SLOTS)


def infer_layer(mode: str, gate: str, batch_sizes: Sequence[int], x: Tensor, h0: Tensor, c0: Tensor,
                w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                w_xa: Tensor, w_ha: Tensor, b_a: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EleAttLayerFunction's forward without autograd (no grad needed): nothing kept for backward."""
    with torch.autocast(x.device.type, enabled=False):
        r = _run_layer(mode, gate, batch_sizes, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_xa, w_ha, b_a, keep=False)
    return r["out"], r["h_n"], r["c_n"], r["gates"]


def _cat_bias(mode: str, d: int, g: int, b_ih, b_hh, b_a, like: Tensor) -> Tensor:
    """The bias of the per-step h product [W_ha h | W_hh h]: (D + G,) = [b_a | b_hh (+ b_ih, except for the GRU)]."""
    a = b_a if b_a is not None else like.new_zeros(d)
    h = like.new_zeros(g) if b_hh is None else (b_hh if mode == "GRU" else b_ih + b_hh)
    return torch.cat([a, h])


def gated_layer(mode: str, gate: str, x: Tensor, batch_sizes: Sequence[int], state: State,
                weights: Sequence[Tensor | None], gate_weights: Sequence[Tensor | None]
                ) -> tuple[Tensor, State, Tensor]:
    """One gated layer, same contract as `pipeline.nn.steps.reference_layer` (packed layout)."""
    dtype = weights[0].dtype
    if x.dtype != dtype:  # under autocast: the kernel computes in the weights' dtype (it disables autocast)
        x, state = x.to(dtype), tuple(s.to(dtype) for s in state)
    h0 = state[0]
    c0 = state[1] if mode == "LSTM" else h0.new_empty(0)
    tensors = (x, h0, c0, *weights, *gate_weights)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, h_n, c_n, gates = EleAttLayerFunction.apply(mode, gate, tuple(batch_sizes), *tensors)
    else:  # forward only (evaluation, streaming): the leaner loop that keeps nothing for backward
        out, h_n, c_n, gates = infer_layer(mode, gate, tuple(batch_sizes), *tensors)
    return out, ((h_n, c_n) if mode == "LSTM" else (h_n,)), gates


_FUSED = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}


def fused_layers(module, first: int, x: Tensor, batch_sizes: Sequence[int], state: State
                 ) -> tuple[Tensor, State]:
    """Layers `first`.. of `module` (all ungated) in one call of torch's fused kernel, as nn.LSTM runs them."""
    weights = [w for k in range(first, module.num_layers) for w in module.layer_weights(k) if w is not None]
    num = module.num_layers - first
    hx = tuple(s[first:] for s in state)
    hx_arg = hx if module.mode == "LSTM" else hx[0]
    fn = _FUSED[module.mode]
    dropout, training = module.dropout, module.training
    batch = batch_sizes[0]
    if all(bs == batch for bs in batch_sizes):
        seq = x.reshape(len(batch_sizes), batch, x.size(-1))  # (T, B, D)
        result = fn(seq, hx_arg, weights, module.bias, num, dropout, training, False, False)
        out = result[0].reshape(-1, module.hidden_size)
    else:
        sizes = torch.tensor(batch_sizes, dtype=torch.long)
        result = fn(x, sizes, hx_arg, weights, module.bias, num, dropout, training, False)
        out = result[0]
    return out, tuple(result[1:])


def fast_stack(module, x: Tensor, batch_sizes: list[int], state: State) -> tuple[Tensor, State, list[Tensor]]:
    """Run a whole `_EleAttRNNBase` stack: gated layers through EleAttLayerFunction, the rest fused.

    x (N, D) packed layout; state tuple of (num_layers, B, H). Returns out (N, H), final state tuple of
    (num_layers, B, H), the gates of each gated layer (N, D_l).
    """
    finals: list[State] = []
    gates: list[Tensor] = []
    for k in range(module.attention_layers):
        if k > 0 and module.dropout > 0 and module.training:
            x = F.dropout(x, module.dropout, training=True)
        x, final, a = gated_layer(module.mode, module.gate, x, batch_sizes, tuple(s[k] for s in state),
                                  module.layer_weights(k), module.gate_weights(k))
        finals.append(final)
        gates.append(a)
    final_state = tuple(torch.stack([f[i] for f in finals]) for i in range(len(state))) if finals else None
    first = module.attention_layers
    if first < module.num_layers:
        if first > 0 and module.dropout > 0 and module.training:
            x = F.dropout(x, module.dropout, training=True)
        x, rest = fused_layers(module, first, x, batch_sizes, state)
        final_state = rest if final_state is None else tuple(torch.cat([a, b]) for a, b in zip(final_state, rest))
    return x, final_state, gates
