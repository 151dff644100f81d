"""EleAtt-RNNs: recurrent networks with an element-wise attention gate on the input (Zhang et al., ECCV 2018).

Each gated layer computes, at every step,

    a_t  = sigmoid(W_xa x_t + W_ha h_{t-1} + b_a)          # (B, D) the element-wise attention gate
    x~_t = a_t * x_t                                       # the modulated input
    h_t  = cell(x~_t, h_{t-1})                             # a plain RNN / LSTM / GRU cell on x~_t

h_{t-1} and c_{t-1} are not modulated; the gate is shared by all the neurons of the layer. With a_t = 1 every
module here computes exactly what its torch counterpart computes.

Layout (Step -> Cell -> Layer -> Stack):
- step functions (`attention_gate`, `rnn_step`, `lstm_step`, `gru_step`) hold the maths, written like the paper
  (in `pipeline.nn.steps`, re-exported here);
- cells (`EleAttRNNCell`, `EleAttLSTMCell`, `EleAttGRUCell`) are drop-in for `nn.RNNCell`/`nn.LSTMCell`/`nn.GRUCell`;
- `reference_layer` (`pipeline.nn.steps`) runs one layer over a (packed) sequence, one step at a time, with plain
  autograd;
- stacks (`EleAttRNN`, `EleAttLSTM`, `EleAttGRU`) are drop-in for `nn.RNN`/`nn.LSTM`/`nn.GRU`. They run the fast
  kernel of `pipeline.nn.kernel` by default (`impl="fast"`); `impl="reference"` runs `reference_layer`, the
  readable definition the fast kernel is tested against.

GRU note: the GRU cells compute what `nn.GRU` computes, n = tanh(W_in x~ + b_in + r * (W_hn h + b_hn)), so that
trained `nn.GRU` weights load and the fused kernel can serve the ungated layers. The paper's Eq. 7 puts r inside
the product, n = tanh(W_in x~ + W_hn (r * h) + b_n); the two differ only in where the reset gate is applied.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from pipeline.errors import UsageError
from pipeline.nn.kernel import fast_stack
from pipeline.nn.steps import (
    GateKind, State, attention_gate, compiler_flag, gated_step, gru_step, lstm_step, reference_layer, rnn_step,
    scan_layer,
)

__all__ = [
    "EleAttRNNCell",
    "EleAttLSTMCell",
    "EleAttGRUCell",
    "EleAttRNN",
    "EleAttLSTM",
    "EleAttGRU",
    "attention_gate",
    "rnn_step",
    "lstm_step",
    "gru_step",
    "reference_layer",
]

Impl = Literal["fast", "reference"]

_GATES = ("sigmoid", "softmax")
_NUM_CHUNKS = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _exporting() -> bool:
    return compiler_flag("is_exporting")


def _capturing() -> bool:
    """True while torch.jit.trace or torch.export captures a graph: they record the readable reference path (the
    fast kernel writes into preallocated buffers with out= products, which neither can record)."""
    return torch.jit.is_tracing() or _exporting()


def _check_gate(gate: str) -> None:
    if gate not in _GATES:
        raise UsageError(f"gate={gate!r} is not supported; use 'sigmoid' (the paper) or 'softmax' (its ablation)")


# --------------------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------------------
class _EleAttCellBase(nn.Module):
    """Shared parts of the cells: torch's cell parameters plus the gate's `weight_xa`, `weight_ha`, `bias_a`."""

    mode: str = ""

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, attention: bool = True,
        gate: GateKind = "sigmoid", device=None, dtype=None,
    ) -> None:
        super().__init__()
        _check_gate(gate)
        kw = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.attention, self.gate = attention, gate
        g = _NUM_CHUNKS[self.mode] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(g, hidden_size, **kw))
        self.bias_ih = nn.Parameter(torch.empty(g, **kw)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(g, **kw)) if bias else None
        if attention:
            self.weight_xa = nn.Parameter(torch.empty(input_size, input_size, **kw))
            self.weight_ha = nn.Parameter(torch.empty(input_size, hidden_size, **kw))
            self.bias_a = nn.Parameter(torch.empty(input_size, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(H), 1/sqrt(H)) for every weight and bias, gate included, as torch does."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    def _weights(self) -> tuple[Tensor | None, ...]:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def attention_weights(self, input: Tensor, h: Tensor) -> Tensor:
        """The gate a_t (B, D) for input (B, D) and previous hidden state h (B, H); ones when attention=False."""
        if not self.attention:
            return torch.ones_like(input)
        return attention_gate(input, h, self.weight_xa, self.weight_ha, self.bias_a, self.gate)

    def _run(self, input: Tensor, state: State) -> State:
        gate_weights = (self.weight_xa, self.weight_ha, self.bias_a) if self.attention else None
        return gated_step(self.mode, input, state, self._weights(), gate_weights, self.gate)[0]

    def _prepare(self, input: Tensor, hx, n_state: int) -> tuple[State, bool]:
        if input.dim() not in (1, 2):
            raise UsageError(f"{type(self).__name__}: expected input (B, {self.input_size}) or ({self.input_size},), "
                             f"got shape {tuple(input.shape)}")
        if input.size(-1) != self.input_size:
            raise UsageError(f"{type(self).__name__}: input has {input.size(-1)} features, the cell was built for "
                             f"input_size={self.input_size}")
        batched = input.dim() == 2
        b = input.size(0) if batched else 1
        if hx is None:
            zeros = input.new_zeros(b, self.hidden_size)
            return (zeros,) * n_state, batched
        if n_state == 2 and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise UsageError(f"{type(self).__name__}: hx must be a tuple (h, c), got {type(hx).__name__}")
        state = tuple(hx) if n_state == 2 else (hx,)
        want = (b, self.hidden_size) if batched else (self.hidden_size,)
        for st in state:
            if tuple(st.shape) != want:
                raise UsageError(f"{type(self).__name__}: expected hidden state of shape {want}, "
                                 f"got {tuple(st.shape)}")
        if not batched:
            state = tuple(s.unsqueeze(0) for s in state)
        return state, batched

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + (f", gate={self.gate!r}" if self.attention else ", attention=False")


class EleAttRNNCell(_EleAttCellBase):
    """Drop-in `nn.RNNCell` with an EleAtt gate: `forward(input (B, D), hx (B, H) | None) -> h' (B, H)`."""

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
        attention: bool = True, gate: GateKind = "sigmoid", device=None, dtype=None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise UsageError(f"nonlinearity={nonlinearity!r} is not supported; use 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(input_size, hidden_size, bias, attention, gate, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        state, batched = self._prepare(input, hx, 1)
        (h,) = self._run(input if batched else input.unsqueeze(0), state)
        return h if batched else h.squeeze(0)


class EleAttLSTMCell(_EleAttCellBase):
    """Drop-in `nn.LSTMCell` with an EleAtt gate: `forward(input (B, D), (h, c) | None) -> (h', c')`, each (B, H)."""

    mode = "LSTM"

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        state, batched = self._prepare(input, hx, 2)
        h, c = self._run(input if batched else input.unsqueeze(0), state)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class EleAttGRUCell(_EleAttCellBase):
    """Drop-in `nn.GRUCell` with an EleAtt gate: `forward(input (B, D), hx (B, H) | None) -> h' (B, H)`.

    Computes nn.GRUCell's formula on x~ (r multiplies W_hn h + b_hn); see the module docstring for Eq. 7.
    """

    mode = "GRU"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        state, batched = self._prepare(input, hx, 1)
        (h,) = self._run(input if batched else input.unsqueeze(0), state)
        return h if batched else h.squeeze(0)


# --------------------------------------------------------------------------------------------------------------
# Stacks
# --------------------------------------------------------------------------------------------------------------
class _EleAttRNNBase(nn.Module):
    """A stack of EleAtt layers with nn.RNN/nn.LSTM/nn.GRU's constructor, forward contract and parameter names."""

    mode: str = ""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        attention_layers: int | None = None,
        gate: GateKind = "sigmoid",
        impl: Impl = "fast",
        device=None,
        dtype=None,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if input_size <= 0 or hidden_size <= 0:
            raise UsageError(f"{name}: input_size and hidden_size must be positive, got {input_size}, {hidden_size}")
        if num_layers < 1:
            raise UsageError(f"{name}: num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout <= 1.0:
            raise UsageError(f"{name}: dropout must be in [0, 1], got {dropout}")
        if bidirectional:
            raise UsageError(f"{name}: bidirectional=True is not supported (the gate reads h_(t-1) of one direction); "
                             "run two stacks, one on the reversed sequence, and concatenate their outputs")
        if proj_size:
            raise UsageError(f"{name}: proj_size={proj_size} is not supported (the gate and the next step read the "
                             "full hidden state h_(t-1)); use a smaller hidden_size, or an nn.Linear on the outputs")
        if attention_layers is None:
            attention_layers = num_layers
        if not 0 <= attention_layers <= num_layers:
            raise UsageError(f"{name}: attention_layers must be in [0, num_layers={num_layers}] (how many bottom "
                             f"layers get a gate; None = all), got {attention_layers}")
        _check_gate(gate)
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{name}: dropout={dropout} has no effect with num_layers=1 (it acts between layers)",
                          stacklevel=2)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = False, 0
        self.attention_layers, self.gate = attention_layers, gate
        self.impl = impl
        kw = {"device": device, "dtype": dtype}
        g = _NUM_CHUNKS[self.mode] * hidden_size
        shapes = []  # (name, shape) in nn.LSTM's names and order, then the gates'
        for k in range(num_layers):
            d = input_size if k == 0 else hidden_size
            shapes += [(f"weight_ih_l{k}", (g, d)), (f"weight_hh_l{k}", (g, hidden_size))]
            shapes += [(f"bias_ih_l{k}", (g,)), (f"bias_hh_l{k}", (g,))] if bias else []
        for k in range(attention_layers):
            d = input_size if k == 0 else hidden_size
            shapes += [(f"weight_xa_l{k}", (d, d)), (f"weight_ha_l{k}", (d, hidden_size))]
            shapes += [(f"bias_a_l{k}", (d,))] if bias else []
        for name, shape in shapes:
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **kw)))
        self.reset_parameters()

    # -- parameters -------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(H), 1/sqrt(H)) for every weight and bias, gates included, as nn.LSTM does."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    def layer_weights(self, k: int) -> tuple[Tensor | None, ...]:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of layer k (biases None when bias=False)."""
        get = lambda n: getattr(self, f"{n}_l{k}", None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")

    def gate_weights(self, k: int) -> tuple[Tensor | None, ...] | None:
        """(weight_xa, weight_ha, bias_a) of layer k's gate, or None for an ungated layer."""
        if k >= self.attention_layers:
            return None
        return getattr(self, f"weight_xa_l{k}"), getattr(self, f"weight_ha_l{k}"), getattr(self, f"bias_a_l{k}", None)

    def flatten_parameters(self) -> None:
        """No-op, for code written against nn.RNNBase (the weights are used as they are)."""

    @property
    def impl(self) -> Impl:
        """"fast" (default: the kernel of pipeline.nn.kernel) or "reference" (step-by-step autograd)."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in ("fast", "reference"):
            raise UsageError(f"impl={value!r} is not supported; use 'fast' or 'reference' (for tests)")
        self._impl = value

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.attention_layers != self.num_layers:
            s += f", attention_layers={self.attention_layers}"
        if self.attention_layers and self.gate != "sigmoid":
            s += f", gate={self.gate!r}"
        return s

    # -- forward ----------------------------------------------------------------------------------------------
    def _state_from_hx(self, hx, batch: int, like: Tensor, batched: bool, sorted_indices: Tensor | None) -> State:
        """hx as the torch module takes it -> a tuple of (num_layers, B, H) tensors in sorted batch order."""
        n_state = 2 if self.mode == "LSTM" else 1
        name = type(self).__name__
        if hx is None:
            zeros = like.new_zeros(self.num_layers, batch, self.hidden_size)
            return (zeros,) * n_state
        if n_state == 2:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise UsageError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            state = tuple(hx)
        else:
            if not isinstance(hx, Tensor):
                raise UsageError(f"{name}: hx must be a tensor h_0, got {type(hx).__name__}")
            state = (hx,)
        want = (self.num_layers, batch, self.hidden_size) if batched else (self.num_layers, self.hidden_size)
        for s in state:
            if tuple(s.shape) != want:
                raise UsageError(f"{name}: expected hidden state of shape {want}, got {tuple(s.shape)}")
        if not batched:
            state = tuple(s.unsqueeze(1) for s in state)
        if sorted_indices is not None:
            state = tuple(s.index_select(1, sorted_indices) for s in state)
        return state

    def forward(self, input: Tensor | PackedSequence, hx=None, return_attention: bool = False):
        """Same contract as the torch module.

        input: (T, B, D) ((B, T, D) when batch_first), unbatched (T, D), or a PackedSequence.
        hx: h_0 (num_layers, B, H), or (h_0, c_0) for the LSTM; zeros when None.
        Returns (output, h_n) or, for the LSTM, (output, (h_n, c_n)); output (T, B, H) / (B, T, H) / packed.
        With return_attention=True a third output follows: a list with the gate values of each gated layer,
        each (T, B, D_l) ((B, T, D_l) when batch_first, (T, D_l) unbatched), zero at padded steps.
        """
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            batch_sizes = batch_sizes_t.tolist()
            batch, batched = batch_sizes[0], True
            steps = len(batch_sizes)
        else:
            if input.dim() not in (2, 3):
                raise UsageError(f"{name}: expected input of 2 or 3 dimensions ((T, D) or (T, B, D)), "
                                 f"got shape {tuple(input.shape)}")
            batched = input.dim() == 3
            seq = input if not batched else (input.transpose(0, 1) if self.batch_first else input)
            if not batched:
                seq = seq.unsqueeze(1)
            steps, batch = seq.shape[:2]  # seq (T, B, D)
            data = seq.reshape(steps * batch, seq.size(2))  # (T*B, D): the packed layout with equal batch sizes
            # (torch.export keeps T symbolic: no per-step list there, the scan path below needs none)
            batch_sizes = None if _exporting() else [batch] * steps
            sorted_indices, unsorted_indices = None, None
        if data.size(-1) != self.input_size:
            raise UsageError(f"{name}: input has {data.size(-1)} features, the module was built for "
                             f"input_size={self.input_size}")
        weight = self.weight_ih_l0
        if data.dtype != weight.dtype and not _autocast_enabled(data.device.type):
            raise UsageError(f"{name}: input is {data.dtype} but the weights are {weight.dtype}; convert one of "
                             f"them (e.g. module.to({data.dtype}) or input.to({weight.dtype}))")
        state = self._state_from_hx(hx, batch, data, batched, sorted_indices)

        if batch_sizes is None:
            out, final, gates = self._scan_stack(data.view(steps, batch, data.size(-1)), state)
        elif self.impl == "fast" and not _capturing():
            out, final, gates = fast_stack(self, data, batch_sizes, state)
        else:
            out, final, gates = self._reference_stack(data, batch_sizes, state)

        if unsorted_indices is not None:
            final = tuple(s.index_select(1, unsorted_indices) for s in final)
        if packed:
            output = PackedSequence(out, batch_sizes_t, sorted_indices, unsorted_indices)
        else:
            output = out.view(steps, batch, self.hidden_size)
            if not batched:
                output, final = output.squeeze(1), tuple(s.squeeze(1) for s in final)
            elif self.batch_first:
                output = output.transpose(0, 1)
        hidden = final if self.mode == "LSTM" else final[0]
        if not return_attention:
            return output, hidden
        attention = []
        for a in gates:
            if packed:
                a, _ = pad_packed_sequence(PackedSequence(a, batch_sizes_t, sorted_indices, unsorted_indices),
                                           batch_first=self.batch_first)
            else:
                a = a.view(steps, batch, a.size(-1))
                a = a.squeeze(1) if not batched else (a.transpose(0, 1) if self.batch_first else a)
            attention.append(a)
        return output, hidden, attention

    def _scan_stack(self, x: Tensor, state: State):
        """The reference maths over x (T, B, D) with the time loop as one `scan` per layer (`scan_layer`), for
        torch.export: it keeps T dynamic where a Python loop would unroll it. Same returns as `_reference_stack`."""
        finals, gates = [], []
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x, final, a = scan_layer(self.mode, x, tuple(s[k] for s in state), self.layer_weights(k),
                                     self.gate_weights(k), self.gate)  # x (T, B, H), a (T, B, D) or None
            finals.append(final)
            if a is not None:
                gates.append(a.reshape(-1, a.size(-1)))
        final = tuple(torch.stack([f[i] for f in finals]) for i in range(len(state)))
        return x.reshape(-1, self.hidden_size), final, gates

    def _reference_stack(self, x: Tensor, batch_sizes: list[int], state: State):
        finals, gates = [], []
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x, final, a = reference_layer(self.mode, x, batch_sizes, tuple(s[k] for s in state),
                                          self.layer_weights(k), self.gate_weights(k), self.gate)
            finals.append(final)
            if a is not None:
                gates.append(a)
        final = tuple(torch.stack([f[i] for f in finals]) for i in range(len(state)))
        return x, final, gates


class EleAttRNN(_EleAttRNNBase):
    """Drop-in `nn.RNN` (tanh or relu) whose bottom `attention_layers` layers have an EleAtt gate."""

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
        bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        attention_layers: int | None = None, gate: GateKind = "sigmoid", impl: Impl = "fast", device=None, dtype=None,
        proj_size: int = 0,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise UsageError(f"EleAttRNN: nonlinearity={nonlinearity!r} is not supported; use 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         attention_layers, gate, impl, device, dtype, proj_size)


class EleAttLSTM(_EleAttRNNBase):
    """Drop-in `nn.LSTM` whose bottom `attention_layers` layers (default all) have an EleAtt gate.

    Example::

        lstm = EleAttLSTM(150, 100, num_layers=3, batch_first=True)
        out, (h_n, c_n), gates = lstm(x, return_attention=True)   # x (B, T, 150); gates[k] (B, T, D_k)
    """

    mode = "LSTM"


class EleAttGRU(_EleAttRNNBase):
    """Drop-in `nn.GRU` (nn.GRU's formula; see the module docstring) with EleAtt gates on the bottom layers."""

    mode = "GRU"
