"""One-pass clipping of a tied table (``privacy.tied`` + ``privacy.bk_tied``) against brute force.

The table's projection and residual are used at the input (lookup) and at the output (scores
over every row): each example's gradient is the sum of both uses, and bk's per-example norm
and clipped sum must equal one-example-at-a-time autograd, clipped and summed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from privacy.bookkeeping import BookKeeping, supports, tag_rows
from privacy.tied import TiedEmbedding

ROWS, FEAT, D, T = 21, 12, 6, 5  # rows (row 0 padding), feature width, hidden width, positions


class TiedSeq(nn.Module):
    """Tied lookup -> LayerNorm -> Linear -> tied scores over the packed positions that have a target."""

    def __init__(self, bias: bool = True, packed: bool = True) -> None:
        super().__init__()
        feats = torch.randn(ROWS, FEAT)
        feats[0] = 0
        self.table = TiedEmbedding(feats, D, bias=bias)
        self.norm = nn.LayerNorm(D)
        self.mix = nn.Linear(D, D)
        self.packed = packed

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.norm(self.table(x))))  # (b, t, d)
        valid = y > 0
        if self.packed:
            owner = valid.nonzero()[:, 0]
            ce = F.cross_entropy(self.table.scores(tag_rows(h[valid], owner)), y[valid] - 1, reduction="none")
            return torch.zeros(len(x)).index_add(0, owner, ce)  # (b,)
        logits = self.table.scores(h)  # (b, t, rows - 1): batch-first
        ce = F.cross_entropy(logits.flatten(0, 1), (y - 1).clamp(min=0).flatten(), reduction="none").view(y.shape)
        return (ce * valid).sum(1)


def _model(seed: int, scale: float, **kw) -> TiedSeq:
    torch.manual_seed(seed)
    model = TiedSeq(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3).mul_(scale)  # a trained-looking residual and bias, not zeros
    return model


def _data(b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, ROWS, (b, T), generator=g)
    x[0, 1] = x[0, 3]  # one example looks the same row up twice
    y = torch.randint(1, ROWS, (b, T), generator=g)
    y[0, 2] = x[0, 1]  # and is scored against a row it looked up
    for i in range(b):  # left padding, at least one target per example
        pad = int(torch.randint(0, T - 1, (1,), generator=g))
        x[i, :pad] = 0
        y[i, :pad] = 0
    return x, y


def _brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    params = [p for p in model.parameters() if p.requires_grad]
    norms, total = [], [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        model.zero_grad()
        model(x[i : i + 1], y[i : i + 1]).sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms.append(norm)
        for t, g in zip(total, grads, strict=True):
            t += g * min(1.0, clip / (norm + 1e-6))
    return torch.tensor(norms), total


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 6),
    clip=st.floats(1e-3, 5.0),
    scale=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**16),
    bias=st.booleans(),
    packed=st.booleans(),
)
def test_tied_norms_and_clipped_sum_equal_brute_force(batch, clip, scale, seed, bias, packed):
    model = _model(seed, scale, bias=bias, packed=packed)
    x, y = _data(batch, seed)
    want_norms, want = _brute_force(copy.deepcopy(model), x, y, clip)
    bk = BookKeeping(model, max_grad_norm=clip)
    norms = bk.clip_and_sum(model(x, y))
    torch.testing.assert_close(norms, want_norms.float(), rtol=1e-4, atol=1e-6)
    atol = max(1e-6, 8 * torch.finfo(torch.float32).eps * clip * batch)
    for p, w in zip([p for p in model.parameters() if p.requires_grad], want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=atol)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 6),
    clip=st.floats(1e-3, 5.0),
    seed=st.integers(0, 2**16),
    bias=st.booleans(),
    packed=st.booleans(),
)
def test_id_dropout_norms_and_clipped_sum_equal_brute_force(batch, clip, seed, bias, packed):
    """ID dropout drops a step's rows' residual and bias at both ends: bk must clip what autograd sees."""
    model = _model(seed, 1.0, bias=bias, packed=packed)
    x, y = _data(batch, seed)
    model.table.id_dropout = 0.5
    model.table.sample_keep()
    keep = model.table.keep
    keep[x[0, 1]] = 0.0  # the row example 0 looks up twice and is scored against: dropped
    keep[int(y[-1, -1])] = 1.0  # and some target kept
    want_norms, want = _brute_force(copy.deepcopy(model), x, y, clip)
    bk = BookKeeping(model, max_grad_norm=clip)
    norms = bk.clip_and_sum(model(x, y))
    torch.testing.assert_close(norms, want_norms.float(), rtol=1e-4, atol=1e-6)
    atol = max(1e-6, 8 * torch.finfo(torch.float32).eps * clip * batch)
    for p, w in zip([p for p in model.parameters() if p.requires_grad], want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=atol)
    assert torch.all(model.table.residual.grad[keep == 0] == 0)  # a dropped row's residual learns nothing


def test_id_dropout_is_drawn_per_step_in_training_only():
    table = TiedEmbedding(torch.randn(200, FEAT), D, id_dropout=0.3)
    table.sample_keep()
    first = table.keep.clone()
    assert 0.15 < 1 - first.mean().item() < 0.45  # about 30% dropped
    table.sample_keep()
    assert not torch.equal(first, table.keep)  # a new mask each step
    table.eval()
    table.sample_keep()
    assert table.keep is None  # evaluation and serving use every row's residual and bias
    with pytest.raises(ValueError, match="id_dropout"):
        TiedEmbedding(torch.randn(5, FEAT), D, id_dropout=1.0)


def _one_use_grads(model: TiedSeq, x: torch.Tensor, y: torch.Tensor, use: str) -> list[torch.Tensor]:
    """The table's parameter gradients through one use only (the other use's rows detached)."""
    t = model.table
    params = [t.proj, t.residual]
    if use == "input":
        h = torch.tanh(model.mix(model.norm(t(x))))
        e = (t.features[1:] @ t.proj.T + t.residual[1:]).detach()
    else:
        h = torch.tanh(model.mix(model.norm(t(x).detach())))
        e = t.features[1:] @ t.proj.T + t.residual[1:]
    valid = y > 0
    loss = F.cross_entropy(h[valid] @ e.T + t.bias[1:].detach(), y[valid] - 1, reduction="sum")
    return list(torch.autograd.grad(loss, params))


def test_the_norm_is_that_of_the_sum_of_both_uses():
    """Row 3 is looked up and is also the target: its two contributions interact, so treating the
    two uses as separate layers (adding squared norms) would give a wrong per-user norm."""
    model = _model(0, 1.0, bias=True)
    model.table.bias.requires_grad_(False)
    model.norm.requires_grad_(False)
    model.mix.requires_grad_(False)
    x = torch.tensor([[0, 0, 3, 5, 3]])
    y = torch.tensor([[0, 0, 5, 3, 3]])
    g_in = _one_use_grads(copy.deepcopy(model), x, y, "input")
    g_out = _one_use_grads(copy.deepcopy(model), x, y, "output")
    true = math.sqrt(sum(float((a + b).pow(2).sum()) for a, b in zip(g_in, g_out, strict=True)))
    separate = math.sqrt(sum(float(a.pow(2).sum() + b.pow(2).sum()) for a, b in zip(g_in, g_out, strict=True)))
    assert abs(true - separate) > 1e-3 * true  # the cross term matters here
    want_norms, _ = _brute_force(copy.deepcopy(model), x, y, clip=1e9)
    assert float(want_norms[0]) == pytest.approx(true, rel=1e-5)
    norms = BookKeeping(model, max_grad_norm=1e9).clip_and_sum(model(x, y))
    assert float(norms[0]) == pytest.approx(true, rel=1e-5)


def test_frozen_projection_counts_in_no_norm():
    model = _model(3, 1.0)
    model.table.proj.requires_grad_(False)
    x, y = _data(4, 3)
    want_norms, want = _brute_force(copy.deepcopy(model), x, y, clip=0.05)
    norms = BookKeeping(model, max_grad_norm=0.05).clip_and_sum(model(x, y))
    assert model.table.proj.grad is None
    torch.testing.assert_close(norms, want_norms.float(), rtol=1e-4, atol=1e-6)
    for p, w in zip([p for p in model.parameters() if p.requires_grad], want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_padding_row_gets_no_gradient_and_looks_up_as_zero():
    model = _model(1, 1.0)
    x, y = _data(5, 1)
    assert (x == 0).any()
    assert torch.equal(model.table(torch.tensor([0, 0])), torch.zeros(2, D))
    assert torch.equal(model.table.rows()[0], torch.zeros(D))
    BookKeeping(model, max_grad_norm=0.1).clip_and_sum(model(x, y))
    assert torch.equal(model.table.residual.grad[0], torch.zeros(D))
    assert float(model.table.bias.grad[0]) == 0.0


def test_tied_layer_is_supported_only_with_padding_zero_or_none():
    assert supports(TiedSeq()) is None
    with pytest.raises(ValueError, match="padding_idx must be 0 or None"):
        TiedEmbedding(torch.randn(4, 3), 2, padding_idx=2)
