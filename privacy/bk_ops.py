"""Tensor helpers shared by the one-pass clipping layers (:mod:`privacy.bookkeeping`, :mod:`privacy.bk_tied`)."""

from __future__ import annotations

import torch

__all__ = ["padded", "gram_norm2"]


def padded(x: torch.Tensor, owner: torch.Tensor, b: int) -> torch.Tensor:
    """Packed rows (n, f) with sorted owners -> (b, t_max, f), zeros where an example has fewer rows."""
    counts = torch.bincount(owner, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(owner), device=owner.device) - starts[owner]
    out = x.new_zeros(b, int(counts.max()) if len(owner) else 0, x.shape[-1])
    out[owner, pos] = x
    return out


def gram_norm2(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||sum_t g_t a_t^T||_F^2 per example for (b, t, i) and (b, t, o): the cheaper way."""
    t, i, o = a.shape[1], a.shape[2], g.shape[2]
    if t * (i + o) < i * o:  # ghost norm: two (b, t, t) Gram matrices
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))  # explicit (b, o, i)
