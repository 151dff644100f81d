"""A sequence classifier for per-frame features: optional input dropout / projection, an EleAtt recurrent stack,
and a linear head on the last valid step (or the mean of the valid steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.nn.eleatt import EleAttGRU, EleAttLSTM, EleAttRNN
from pipeline.errors import UsageError

CELLS = {"lstm": EleAttLSTM, "gru": EleAttGRU, "rnn": EleAttRNN}
POOLINGS = ("last", "mean")


def pool_steps(out: torch.Tensor, lengths: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """out (B, T, H), lengths (B,) int64 valid steps (>= 1) -> (B, H): each sequence's output at its last valid
    step ("last") or the mean of its valid steps' outputs ("mean"); steps past a length are ignored.
    TorchScript-scriptable (the export models of `pipeline.serving.export` script it)."""
    if pooling == "last":
        return out[torch.arange(out.size(0), device=out.device), lengths - 1]
    valid = (torch.arange(out.size(1), device=out.device)[None, :] < lengths[:, None]).to(out.dtype)  # (B, T)
    return (out * valid[:, :, None]).sum(1) / lengths[:, None].to(out.dtype)


class SequenceClassifier(nn.Module):
    """EleAtt stack + head over feature sequences.

    Its arguments are the network's configuration, defined here once: the Lightning modules take them as
    `**network` (and the CLI offers them as `--model.<name>`), a trained stream's record stores them.

    Args:
        input_size: D, the feature dimension (linked from the data by the CLI).
        num_classes: C, the number of classes (linked from the data by the CLI).
        cell: recurrent cell: lstm, gru or rnn (EleAttLSTM / EleAttGRU / EleAttRNN).
        hidden_size: neurons per recurrent layer.
        num_layers: stacked recurrent layers.
        attention_layers: how many bottom layers get the element-wise attention gate (null = all, 0 = the plain
            RNN/LSTM/GRU baseline).
        dropout: dropout between recurrent layers and before the head (the paper: 0.5).
        input_dropout: dropout on the input features.
        proj_size: > 0 adds a linear projection D -> proj_size before the recurrent stack.
        pooling: the head reads the last valid step ("last") or the mean of the valid steps ("mean").
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        cell: Literal["lstm", "gru", "rnn"] = "lstm",
        hidden_size: int = 512,
        num_layers: int = 1,
        attention_layers: int | None = None,
        dropout: float = 0.5,
        input_dropout: float = 0.0,
        proj_size: int = 0,
        pooling: Literal["last", "mean"] = "last",
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise UsageError(f"cell {cell!r} is not one of {sorted(CELLS)} (set model.cell)")
        if pooling not in POOLINGS:
            raise UsageError(f"pooling {pooling!r} is not one of {list(POOLINGS)} (set model.pooling)")
        if input_size < 1 or num_classes < 1 or hidden_size < 1 or num_layers < 1 or proj_size < 0:
            raise UsageError(
                f"sizes must be positive: input_size={input_size}, num_classes={num_classes}, "
                f"hidden_size={hidden_size}, num_layers={num_layers}, proj_size={proj_size} (>= 0)"
            )
        # The configuration, as given: a trained stream's record stores it, and `SequenceClassifier(**config)`
        # builds the same network again (pipeline.trained).
        self.config = dict(input_size=input_size, num_classes=num_classes, cell=cell, hidden_size=hidden_size,
                           num_layers=num_layers, attention_layers=attention_layers, dropout=dropout,
                           input_dropout=input_dropout, proj_size=proj_size, pooling=pooling)
        self.pooling = pooling
        self.input_dropout = nn.Dropout(input_dropout)
        self.proj = nn.Linear(input_size, proj_size) if proj_size > 0 else nn.Identity()
        self.rnn = CELLS[cell](
            proj_size or input_size,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            attention_layers=attention_layers,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, D) float, lengths (B,) int64 valid steps per row (None = all T) -> logits (B, C)."""
        B, T, _ = feats.shape
        x = self.proj(self.input_dropout(feats))  # (B, T, D')
        ragged = lengths is not None and bool((lengths < T).any())
        if ragged:
            if bool((lengths < 1).any()):
                raise UsageError(f"every sequence needs at least one step, got lengths {lengths.tolist()}")
            # Packing keeps padding out of the recurrence (and out of the compute).
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=T)  # (B, T, H)
        else:
            out = self.rnn(x)[0]  # (B, T, H)
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=feats.device)
        pooled = pool_steps(out, lengths.to(out.device), self.pooling)  # (B, H)
        return self.head(self.dropout(pooled))  # (B, C)

    def video_probs(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, V, T, D) (or (B, T, D)), lengths (B,) -> class probabilities (B, C) averaged over the V views
        (what `test` scores a video with: the mean of its views' softmax, not of their logits)."""
        if feats.dim() == 3:
            feats = feats[:, None]
        B, V, T, D = feats.shape
        logits = self(feats.reshape(B * V, T, D), lengths.repeat_interleave(V))  # (B*V, C)
        return logits.float().softmax(-1).view(B, V, -1).mean(1)  # (B, C)

    @torch.no_grad()
    def stream(self, feats: torch.Tensor, state: StreamState | None = None, return_attention: bool = False
               ) -> tuple[torch.Tensor, StreamState] | tuple[torch.Tensor, StreamState, list[torch.Tensor]]:
        """Online classification: feats (B, T, D) are the next T steps of B running sequences, `state` what the
        earlier steps left (None = the start of the sequences). Returns the logits after each of the T steps
        (B, T, C), each what `forward` gives for the whole sequence seen so far, and the state to pass next time.

        The recurrent state (h, c of every layer) is carried through the stack's own `hx`, so chunks of any size
        give the per-step outputs of one pass over the whole sequence; "mean" pooling keeps the running sum of the
        outputs. `return_attention`: also the gate values of every gated layer, each (B, T, D_k).
        """
        B, T, _ = feats.shape
        x = self.proj(self.input_dropout(feats))  # (B, T, D')
        out, hx, *gates = self.rnn(x, None if state is None else state.hx, return_attention=return_attention)
        if self.pooling == "last":
            pooled, total = out, None  # (B, T, H): step t's output is what "last" pools after step t
        else:
            prior = torch.zeros_like(out[:, 0]) if state is None else state.total.to(out.dtype)  # (B, H)
            sums = prior[:, None] + out.cumsum(1)  # (B, T, H) running sums of the outputs
            count = 0 if state is None else state.steps
            pooled = sums / torch.arange(count + 1, count + T + 1, device=out.device, dtype=out.dtype)[None, :, None]
            total = sums[:, -1]
        steps = T + (0 if state is None else state.steps)
        logits = self.head(self.dropout(pooled))  # (B, T, C)
        return (logits, StreamState(hx, total, steps), *gates)


@dataclass
class StreamState:
    """What `SequenceClassifier.stream` carries between calls: the stack's `hx` (h_n, or (h_n, c_n) for the LSTM,
    each (num_layers, B, H)), the running sum of the outputs (B, H) ("mean" pooling; None otherwise) and the steps
    seen."""

    hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    total: torch.Tensor | None
    steps: int
