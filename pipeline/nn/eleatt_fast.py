"""The fast EleAtt kernel: one custom autograd Function per gated layer; ungated layers run torch's fused kernel.

The gate reads h_{t-1}, so the fused cuDNN/oneDNN RNN cannot run a gated layer. Per gated layer this module
- computes W_xa x_t for every step in one matrix product before the loop;
- does one product per step on h_{t-1} for the gate and the cell together: h @ [W_ha; W_hh]^T;
- writes every per-step result into buffers allocated once per call (no per-step allocation of big tensors);
- in backward, runs only the data gradients step by step (dh_{t-1} again in one product with [W_ha; W_hh]),
  storing the pre-activation gradients of every step, then computes all weight gradients, the bias gradients and
  the input gradient through W_xa as a few large products over all steps at once.
Everything works in packed layout: x (N, D) holds the steps one after the other, step t holding the first
batch_sizes[t] sequences (an unpacked (T, B, D) input is the case batch_sizes = [B] * T).
`pipeline.nn.eleatt.reference_layer` is the definition this kernel is tested against.
"""
from __future__ import annotations

import weakref

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, _VF

State = tuple[Tensor, ...]


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


def _gate_forward(z: Tensor, gate: str) -> None:
    """In place: pre-activation -> gate value."""
    if gate == "sigmoid":
        z.sigmoid_()
    else:
        z.copy_(torch.softmax(z, dim=-1))


def _gate_backward(da: Tensor, a: Tensor, gate: str) -> Tensor:
    """dL/dz from dL/da for a = gate(z)."""
    if gate == "sigmoid":
        return da * a * (1 - a)
    return a * (da - (da * a).sum(-1, keepdim=True))


# The inputs of EleAttLayerFunction.forward after ctx, in order: backward returns one gradient per slot.
_SLOTS = ("mode", "gate", "batch_sizes", "x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_xa", "w_ha", "b_a")


# Inference (streaming above all: one step per call) would otherwise rebuild the step weights on every call,
# which costs more than the step itself at small sizes. Entries hold weak references to the weights and their
# version counters, so a freed, replaced or modified weight is never served from the cache.
_STEP_WEIGHTS: dict[tuple[int, int, int], tuple[tuple, tuple[int, int, int], tuple[Tensor, Tensor, Tensor]]] = {}
_STEP_WEIGHTS_MAX = 32


def _step_weights(w_ih: Tensor, w_hh: Tensor, w_ha: Tensor, cache: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(w_cat (D + G, H) = [W_ha; W_hh], its contiguous transpose (H, D + G), W_ih^T (D, G) contiguous)."""
    weights = (w_ih, w_hh, w_ha)
    if cache and not torch.is_grad_enabled():
        key = tuple(id(w) for w in weights)
        versions = tuple(w._version for w in weights)
        hit = _STEP_WEIGHTS.get(key)
        if hit is not None and hit[1] == versions and all(r() is w for r, w in zip(hit[0], weights)):
            return hit[2]
    # Per-step products read contiguous (K, N) right-hand sides: at small batches MKL runs h @ W.t() on a
    # (N, K) weight up to 2x slower than h @ W_t on its contiguous transpose. Backward uses the (N, K) forms.
    w_cat = torch.cat([w_ha, w_hh])  # (D + G, H): the one product on h_{t-1} per step
    prepared = (w_cat, w_cat.t().contiguous(), w_ih.t().contiguous())  # (D + G, H), (H, D + G), (D, G)
    if cache and not torch.is_grad_enabled():
        if len(_STEP_WEIGHTS) >= _STEP_WEIGHTS_MAX:
            _STEP_WEIGHTS.pop(next(iter(_STEP_WEIGHTS)))
        _STEP_WEIGHTS[key] = (tuple(weakref.ref(w) for w in weights), versions, prepared)
    return prepared


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
    w_cat, w_cat_t, w_ih_t = _step_weights(w_ih, w_hh, w_ha, cache=not keep)
    b_cat = _cat_bias(mode, d, g, b_ih, b_hh, b_a, x)  # (D + G,)
    xa = x @ w_xa.t()  # (N, D): W_xa x_t for every step at once

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
    zbuf = x.new_empty(batch, d + g)  # (B, D + G) [W_ha h + b_a | W_hh h (+ b)] of one step
    gibuf = x.new_empty(batch, g) if gru else None  # (B, 3H) W_ih x~ + b_ih of one step
    prev = 0  # buffer row of h_{t-1}[0]
    for t, bs in enumerate(batch_sizes):
        o = offsets[t]
        rows, nxt = slice(o, o + bs), slice(batch + o, batch + o + bs)
        srows = rows if keep else slice(0, bs)  # this step's rows of xt and acts
        h_prev = hbuf[prev:prev + bs]  # (bs, H)
        z = zbuf[:bs]  # (bs, D + G)
        torch.addmm(b_cat, h_prev, w_cat_t, out=z)  # (bs, H) @ (H, D + G) -> (bs, D + G)
        a = gates[rows]  # (bs, D)
        torch.add(xa[rows], z[:, :d], out=a)  # (bs, D) gate pre-activation
        _gate_forward(a, gate)
        x_t = xt[srows]  # (bs, D)
        torch.mul(a, x[rows], out=x_t)  # (bs, D)
        h_new = hbuf[nxt]  # (bs, H)
        if lstm:
            ifgo = acts[srows]  # (bs, 4H) pre-activations, then activations in place
            torch.addmm(z[:, d:], x_t, w_ih_t, out=ifgo)  # (bs, D) @ (D, 4H) + (bs, 4H)
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
            gi = gibuf[:bs]  # (bs, 3H) = W_ih x~ + b_ih
            torch.addmm(b_ih, x_t, w_ih_t, out=gi) if b_ih is not None else torch.mm(x_t, w_ih_t, out=gi)  # (bs, 3H)
            torch.add(gi[:, :2 * hid], z[:, d:d + 2 * hid], out=r_z).sigmoid_()  # (bs, 2H) r, z
            hn.copy_(z[:, d + 2 * hid:])  # (bs, H) W_hn h + b_hn
            torch.addcmul(gi[:, 2 * hid:], r_z[:, :hid], hn, out=nn_).tanh_()  # (bs, H) n
            # h = (1 - z) n + z h_prev = n + z (h_prev - n)
            torch.sub(h_prev, nn_, out=h_new)
            h_new.mul_(r_z[:, hid:]).add_(nn_)
        else:
            torch.addmm(z[:, d:], x_t, w_ih_t, out=h_new)  # (bs, D) @ (D, H) + (bs, H)
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
    return dict(out=out, h_n=h_n, c_n=c_n, gates=gates, hbuf=hbuf, cbuf=cbuf, acts=acts, xt=xt, w_cat=w_cat,
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
        ctx.save_for_backward(r["hbuf"], r["cbuf"], r["acts"], r["gates"], r["xt"], r["w_cat"],
                              x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_xa, w_ha, b_a)
        # out: a tensor of its own, callers may modify it
        return r["out"].clone(), r["h_n"], r["c_n"], r["gates"]

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, d_gates):
        hbuf, cbuf, acts, gates, xt, w_cat, *inputs = ctx.saved_tensors
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
        dz = x.new_empty(n, d + g)  # (N, D + G) [dL/d(gate pre-activation) | dL/d(h-side pre-activations)]
        dgi = x.new_empty(n, g) if gru else None  # (N, 3H) GRU: dL/d(W_ih x~ + b_ih) differs from the h side
        dx = x.new_empty(n, d)  # (N, D) dL/dx through x~ = a * x (the W_xa part is added after the loop)
        dxt = x.new_empty(batch, d)  # (B, D) dL/dx~ of one step
        for t in range(len(batch_sizes) - 1, -1, -1):
            bs, o = batch_sizes[t], offsets[t]
            rows = slice(o, o + bs)
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
                dg = dz[rows, d:]  # (bs, 4H)
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
                dgi_t = dgi[rows]  # (bs, 3H)
                d_r, d_z, d_n = dgi_t.chunk(3, 1)
                torch.mul(dh_t * (1 - zg), 1 - nn_ * nn_, out=d_n)  # dL/d(n pre-activation)
                torch.mul(dh_t * (h_prev - nn_), zg * (1 - zg), out=d_z)
                torch.mul(d_n * hn, r * (1 - r), out=d_r)
                dg = dz[rows, d:]  # (bs, 3H)
                dg[:, :2 * hid] = dgi_t[:, :2 * hid]
                torch.mul(d_n, r, out=dg[:, 2 * hid:])
                dh_direct = dh_t * zg  # (bs, H)
            else:
                h_t = hbuf[batch + o:batch + o + bs]  # (bs, H)
                dg = dz[rows, d:]  # (bs, H)
                if mode == "RNN_TANH":
                    torch.mul(dh_t, 1 - h_t * h_t, out=dg)
                else:
                    torch.mul(dh_t, h_t > 0, out=dg)
                dgi_t = dg
                dh_direct = None
            a, dxt_t = gates[rows], dxt[:bs]  # (bs, D) each
            torch.mm(dgi_t, w_ih, out=dxt_t)  # dL/dx~: (bs, G) @ (G, D) -> (bs, D)
            torch.mul(dxt_t, a, out=dx[rows])
            da = dxt_t.mul_(x[rows])  # dL/da (bs, D)
            if d_gates is not None:
                da.add_(d_gates[rows])
            dz[rows, :d] = _gate_backward(da, a, gate)
            if dh_direct is None:
                # dL/dh_{t-1} = [dz_a | dz_h] @ [W_ha; W_hh]: (bs, D + G) @ (D + G, H)
                torch.mm(dz[rows], w_cat, out=dh_t)
            else:
                torch.addmm(dh_direct, dz[rows], w_cat, out=dh_t)  # (bs, H), plus the direct path through z

        # Everything below is over all steps at once.
        need = dict(zip(_SLOTS, ctx.needs_input_grad))
        h_prev_all = None
        if need["w_hh"] or need["w_ha"]:
            h_prev_all = hbuf[:n] if ctx.uniform else hbuf.index_select(0, ctx.prev_index)  # (N, H)
        dz_a, dz_h = dz[:, :d], dz[:, d:]  # (N, D), (N, G)
        dgi_all = dgi if gru else dz_h  # (N, G)
        grads: dict[str, Tensor | None] = {}
        grads["x"] = torch.addmm(dx, dz_a, w_xa) if need["x"] else None  # (N, D)
        grads["h0"] = dh if need["h0"] else None  # (B, H)
        grads["c0"] = dc if lstm and need["c0"] else None  # (B, H)
        d_w_cat = _weight_grad(dz, h_prev_all) if h_prev_all is not None else None  # (D + G, H)
        grads["w_ha"] = d_w_cat[:d] if need["w_ha"] else None  # (D, H)
        grads["w_hh"] = d_w_cat[d:] if need["w_hh"] else None  # (G, H)
        grads["w_ih"] = _weight_grad(dgi_all, xt) if need["w_ih"] else None  # (G, D)
        grads["w_xa"] = _weight_grad(dz_a, x) if need["w_xa"] else None  # (D, D)
        if ctx.has_bias or ctx.has_gate_bias:
            ones = x.new_ones(n)  # (N,)
            sums = ones @ dz  # (D + G,) column sums: a matrix-vector product runs ~5x faster than dz.sum(0) here
            grads["b_a"] = sums[:d] if ctx.has_gate_bias and need["b_a"] else None  # (D,)
            grads["b_hh"] = sums[d:] if ctx.has_bias and need["b_hh"] else None  # (G,)
            if ctx.has_bias and need["b_ih"]:
                # b_ih and b_hh get the same values, but each its own tensor: autograd may adopt a returned
                # gradient as .grad and accumulate into it in place later.
                grads["b_ih"] = ones @ dgi if gru else sums[d:].clone()  # (G,)
        return tuple(grads.get(name) for name in _SLOTS)


def _reference_backward(ctx, inputs, grad_outputs) -> tuple:
    """Gradients that are themselves differentiable (create_graph=True): the layer is run again through the
    readable reference definition on the saved inputs, and autograd differentiates that graph."""
    from pipeline.nn.eleatt import reference_layer

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


def _weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """dy^T x (M, K) for dy (N, M), x (N, K): the gradient of a weight applied to x's rows, summed over all N.

    With N large (every step of every sequence), MKL runs this product up to ~1.5x faster with the narrower
    operand on the left, so for K < M it computes (x^T dy)^T and makes that contiguous.
    """
    if x.size(1) < dy.size(1):
        return (x.t() @ dy).t().contiguous()
    return dy.t() @ x


def _cat_bias(mode: str, d: int, g: int, b_ih, b_hh, b_a, like: Tensor) -> Tensor:
    """The bias of the per-step h product [W_ha h | W_hh h]: (D + G,) = [b_a | b_hh (+ b_ih, except for the GRU)]."""
    a = b_a if b_a is not None else like.new_zeros(d)
    h = like.new_zeros(g) if b_hh is None else (b_hh if mode == "GRU" else b_ih + b_hh)
    return torch.cat([a, h])


def gated_layer(mode: str, gate: str, x: Tensor, batch_sizes: Sequence[int], state: State,
                weights: Sequence[Tensor | None], gate_weights: Sequence[Tensor | None]
                ) -> tuple[Tensor, State, Tensor]:
    """One gated layer, same contract as `pipeline.nn.eleatt.reference_layer` (packed layout)."""
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
