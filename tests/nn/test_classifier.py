"""SequenceClassifier: shapes, the EleAtt stack it builds, and that padding never changes a sequence's logits."""
from __future__ import annotations

import pytest
import torch

from pipeline.nn.classifier import SequenceClassifier
from pipeline.nn.eleatt import EleAttGRU, EleAttLSTM, EleAttRNN


@pytest.mark.parametrize("cell, kind", [("lstm", EleAttLSTM), ("gru", EleAttGRU), ("rnn", EleAttRNN)])
def test_builds_the_eleatt_stack_and_returns_logits(cell, kind):
    model = SequenceClassifier(6, 5, cell=cell, hidden_size=8, num_layers=2, dropout=0.5)
    assert isinstance(model.rnn, kind)
    assert (model.rnn.input_size, model.rnn.hidden_size, model.rnn.num_layers) == (6, 8, 2)
    assert model.rnn.batch_first and model.rnn.dropout == 0.5
    logits = model(torch.randn(3, 7, 6))
    assert logits.shape == (3, 5) and logits.dtype == torch.float32


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padded_batch_matches_each_sequence_alone(cell, pooling):
    torch.manual_seed(0)
    model = SequenceClassifier(4, 3, cell=cell, hidden_size=8, num_layers=2, pooling=pooling).eval()
    lengths = torch.tensor([5, 2, 7, 1])
    seqs = [torch.randn(n, 4) for n in lengths.tolist()]
    batch = torch.full((4, 7, 4), 1e3)  # garbage padding: must not leak into any output
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    with torch.no_grad():
        padded = model(batch, lengths)
        alone = torch.cat([model(s[None]) for s in seqs])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_pooling_reads_the_last_valid_step_or_the_mean():
    model = SequenceClassifier(2, 2, cell="gru", hidden_size=4, dropout=0.0).eval()
    feats = torch.randn(1, 6, 2)
    out, _ = model.rnn(feats)  # (1, 6, H)
    with torch.no_grad():
        torch.testing.assert_close(model(feats, torch.tensor([4])), model.head(out[:, 3]))
        model.pooling = "mean"
        torch.testing.assert_close(model(feats, torch.tensor([4])), model.head(out[:, :4].mean(1)))


def test_projection_and_plain_baseline():
    model = SequenceClassifier(10, 3, hidden_size=8, proj_size=4, attention_layers=0)
    assert model.proj.weight.shape == (4, 10) and model.rnn.input_size == 4
    assert not [n for n, _ in model.rnn.named_parameters() if "weight_xa" in n]  # no attention gate
    assert model(torch.randn(2, 3, 10)).shape == (2, 3)
    gated = SequenceClassifier(10, 3, hidden_size=8, num_layers=2, attention_layers=1)
    names = {n for n, _ in gated.rnn.named_parameters()}
    assert "weight_xa_l0" in names and "weight_xa_l1" not in names


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'lstmx'"):
        SequenceClassifier(4, 2, cell="lstmx")
    with pytest.raises(ValueError, match="'max'"):
        SequenceClassifier(4, 2, pooling="max")
    with pytest.raises(ValueError, match="num_classes=0"):
        SequenceClassifier(4, 0)
