"""fedmart's one-pass per-user clipping (``privacy.bookkeeping``) against brute force.

Brute force: one example at a time through an ordinary backward pass, its flat gradient
norm over all trainable parameters, scaled by ``min(1, C / (norm + 1e-6))`` (Opacus's
flat clipping), summed. Every layer kind bk supports is in the model, including a
packed ``Linear`` over only some positions of each example (``tag_rows``).
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

from privacy.bookkeeping import BookKeeping, is_hooked, supports, tag_rows


class Seq(nn.Module):
    """Embedding (with padding) + positions + LayerNorm + Linear over (b, t, d) + packed head."""

    def __init__(self, vocab: int = 30, d: int = 8, t: int = 6, classes: int = 25) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(t, d)
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        pos = torch.arange(t).repeat(b, 1)
        h = torch.tanh(self.mix(self.norm(self.emb(x) + self.pos(pos))))  # (b, t, d)
        valid = y > 0
        owner = valid.nonzero()[:, 0]
        ce = F.cross_entropy(self.head(tag_rows(h[valid], owner)), y[valid], reduction="none")
        return torch.zeros(b).index_add(0, owner, ce)  # (b,) per-example loss


def _data(b: int, seed: int, t: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 30, (b, t), generator=g)
    y = torch.randint(1, 25, (b, t), generator=g)
    for i in range(b):  # left padding of varying length; at least one target per example
        pad = int(torch.randint(0, t - 1, (1,), generator=g))
        x[i, :pad] = 0
        y[i, :pad] = 0
    return x, y


def _scaled(seed: int, scale: float) -> Seq:
    """A seeded model with every weight times ``scale``: large weights give large gradients
    (clipping binds), small ones small gradients (nothing to clip)."""
    torch.manual_seed(seed)
    model = Seq()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    params = [p for p in model.parameters() if p.requires_grad]
    norms, total = [], [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        model.zero_grad()
        model(x[i : i + 1], y[i : i + 1]).sum().backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
        norms.append(norm)
        for t, p in zip(total, params, strict=True):
            t += p.grad * min(1.0, clip / (norm + 1e-6))
    return torch.tensor(norms), total


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 7),
    clip=st.floats(1e-3, 10.0),
    scale=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**16),
)
def test_norms_and_clipped_sum_equal_brute_force(batch, clip, scale, seed):
    model = _scaled(seed, scale)
    x, y = _data(batch, seed)
    want_norms, want = _brute_force(copy.deepcopy(model), x, y, clip)
    bk = BookKeeping(model, max_grad_norm=clip)
    norms = bk.clip_and_sum(model(x, y))
    # bk takes each norm from float32 Gram products of activations and output gradients, whose
    # terms cancel: at weight scales near 20 that costs up to ~2e-4 of relative precision against
    # the per-example brute force (seen: 1.8e-4). An algorithmic error would be O(1).
    torch.testing.assert_close(norms, want_norms.float(), rtol=1e-3, atol=1e-6)
    # A coordinate of the clipped sum adds `batch` float32 terms of size up to `clip`: where they
    # cancel, float32 rounding alone leaves an absolute error of a few eps * clip * batch (a fixed
    # 1e-6 failed at clip 3, batch 7 by 1.3e-6: rounding, not a clipping error).
    atol = max(1e-6, 8 * torch.finfo(torch.float32).eps * clip * batch)
    for p, w in zip([p for p in model.parameters() if p.requires_grad], want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=atol)


@settings(max_examples=25, deadline=None)
@given(clip=st.floats(1e-3, 10.0), scale=st.floats(0.05, 20.0), seed=st.integers(0, 2**16))
def test_one_examples_clipped_gradient_never_exceeds_the_bound(clip, scale, seed):
    model = _scaled(seed, scale)
    x, y = _data(1, seed)
    bk = BookKeeping(model, max_grad_norm=clip)
    raw = float(bk.clip_and_sum(model(x, y))[0])
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert clipped <= clip * (1 + 1e-5)
    if raw <= clip:  # below the bound nothing changes
        assert clipped == pytest.approx(raw, rel=1e-4, abs=1e-7)


def test_frozen_parameters_get_no_gradient_and_count_in_no_norm():
    torch.manual_seed(0)
    model = Seq()
    model.pos.weight.requires_grad_(False)
    x, y = _data(4, 1)
    _, want = _brute_force(copy.deepcopy(model), x, y, clip=0.1)
    BookKeeping(model, max_grad_norm=0.1).clip_and_sum(model(x, y))
    assert model.pos.weight.grad is None
    for p, w in zip([p for p in model.parameters() if p.requires_grad], want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_an_unsupported_layer_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 3))
    assert "Conv1d" in supports(model)
    with pytest.raises(ValueError, match=r"layer 1 \(Conv1d\).*use 'ghost' or 'hooks'"):
        BookKeeping(model, max_grad_norm=1.0)


def test_a_layer_called_twice_is_refused():
    lin = nn.Linear(3, 3)
    bk = BookKeeping(lin, max_grad_norm=1.0)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="called twice"):
        bk.clip_and_sum(lin(lin(x)).sum(1))


def test_a_packed_input_without_row_owners_is_refused():
    lin = nn.Linear(3, 2)
    bk = BookKeeping(lin, max_grad_norm=1.0)
    out = lin(torch.randn(5, 3))  # 5 rows for a batch of 2: which row is whose?
    with pytest.raises(ValueError, match="not batch-first"):
        bk.clip_and_sum(out[:2].sum(1))


def test_hooks_are_removed_and_the_module_can_be_wrapped_again():
    model = Seq()
    bk = BookKeeping(model, max_grad_norm=1.0)
    assert is_hooked(model)
    with pytest.raises(ValueError, match="already has bk hooks"):
        BookKeeping(model, max_grad_norm=1.0)
    bk.remove()
    assert not is_hooked(model)
    x, y = _data(2, 0)
    model(x, y)  # no hook records anything now
    assert bk._records == []
    BookKeeping(model, max_grad_norm=1.0).remove()


def test_an_output_changed_in_place_is_refused():
    lin = nn.Linear(3, 3)
    bk = BookKeeping(lin, max_grad_norm=1.0)
    out = lin(torch.randn(2, 3))
    out.mul_(2)  # the gradient at the layer's output is no longer what autograd would give for it
    with pytest.raises(ValueError, match="modified in place"):
        bk.clip_and_sum(out.sum(1))
