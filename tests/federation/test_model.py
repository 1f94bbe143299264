"""The recommender's contract: shapes, causality, per-example loss, Opacus-readiness."""

from __future__ import annotations

import pytest
import torch

from federation.model import SASRec, SASRecConfig


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=30, max_len=8, hidden=16, layers=2, heads=2, dropout=0.0, attn_dropout=0.0))


def _batch():
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    tgt = torch.tensor([[0, 0, 4, 5, 6, 7, 8, 9], [2, 3, 4, 5, 6, 7, 9, 10]])
    return seq, tgt


def test_forward_backward_shapes(model):
    seq, tgt = _batch()
    logits, loss = model(seq, tgt, reduction="none")
    assert logits.shape == (2, 8, 31)  # row 2 has no padding: nothing is trimmed
    assert loss.shape == (2,)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    logits, loss = model(seq, tgt)
    assert loss.dim() == 0
    assert logits.shape == (6 + 8, 31)  # only positions with a target are scored
    assert model.score_last(seq).shape == (2, 31)


def test_mean_loss_equals_token_average_of_per_example_path(model):
    seq, tgt = _batch()
    _, mean = model(seq, tgt)
    logits, _ = model(seq, tgt, reduction="none")
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 31), tgt.reshape(-1), ignore_index=0)
    assert mean.item() == pytest.approx(ce.item(), rel=1e-5)


def test_causal(model):
    model.eval()
    seq, _ = _batch()
    h = model.hidden_states(seq)
    future = seq.clone()
    future[:, -1] = 11
    assert torch.allclose(model.hidden_states(future)[:, :-1], h[:, :-1], atol=1e-6)
    assert not torch.allclose(model.hidden_states(future)[:, -1], h[:, -1], atol=1e-6)


def test_padded_positions_do_not_leak_into_real_ones(model):
    model.eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7]])
    base = model.hidden_states(seq)[0, 1:]
    # changing what sits at padded positions' embeddings must not change real positions
    with torch.no_grad():
        model.item_emb.weight[0].add_(1.0)
    assert torch.allclose(model.hidden_states(seq)[0, 1:], base, atol=1e-5)


def test_trimming_all_padding_columns_is_exact(model):
    model.eval()
    padded = torch.tensor([[0, 0, 0, 0, 3, 4, 5, 6]])  # trimmed to 4 columns inside the model
    untrimmed = torch.tensor([[0, 0, 0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert model.hidden_states(padded).shape[1] == 4
    assert torch.allclose(model.score_last(padded)[0, 1:], model.score_last(untrimmed)[0, 1:], atol=1e-5)
    tgt = torch.tensor([[0, 0, 0, 0, 4, 5, 6, 7]])
    _, a = model(padded, tgt, reduction="none")
    _, b = model(untrimmed, torch.cat([tgt, torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9]])]), reduction="none")
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_per_example_loss_of_a_trimmed_batch_of_several_rows(model):
    """Every row starts with padding, so the batch is trimmed and the targets become a
    column slice: the per-example (DP) path must still work and match the untrimmed batch."""
    model.eval()
    seq = torch.tensor([[0, 0, 0, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5, 7]])
    tgt = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 8], [0, 0, 2, 3, 4, 5, 7, 9]])
    full = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    full_tgt = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9]])
    _, trimmed = model(seq, tgt, reduction="none")
    _, reference = model(torch.cat([seq, full]), torch.cat([tgt, full_tgt]), reduction="none")
    assert trimmed.shape == (2,)
    assert torch.allclose(trimmed, reference[:2], atol=1e-5)


def test_padding_never_recommended(model):
    seq, _ = _batch()
    assert torch.isinf(model.score_last(seq)[:, 0]).all()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(num_items=3, hidden=10, heads=3)
