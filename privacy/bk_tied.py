"""Exact per-example clipping of a :class:`~privacy.tied.TiedEmbedding` in one backward pass (mode ``bk``).

The layer's rows ``E = F P^T + R`` (features ``F``, N x f, fixed) are used twice: looked up at
the input (``x_t = E[s_t]``) and scored against at the output (``z_r = E h_r + bias``). Every
parameter enters the loss only through ``E`` (and the bias), so one example's gradient is
read off its gradient with respect to the whole table,

    D = sum_t onehot(s_t) g_t^T  +  sum_r G_r h_r^T                          (N x d)

with ``g_t = dL/dx_t`` (the lookups) and ``G_r = dL/dz_r`` (a scored row's gradient over the
catalog, zero at the padding row): ``dL/dR = D``, ``dL/dP = D^T F`` (d x f) and
``dL/dbias = sum_r G_r``. Both uses of ``P`` and ``R`` are in the same ``D``, so the norm
taken is that of the *sum* of the input and output contributions, as brute-force autograd
gives it.

``D`` is a sum of ``m`` outer products ``a_j b_j^T`` (``a_j`` a one-hot row or a score
gradient, ``b_j`` a ``g_t`` or an ``h_r``), so its squared norm never needs the (N x d)
matrix per example: ``||D||^2 = sum_jk (a_j.a_k)(b_j.b_k)`` (Gram matrices of one example's
``m`` rows: one-hot against one-hot is equality of indices, one-hot against ``G_r`` is a
gather, ``G_r`` against ``G_r'`` a dot product), and ``||D^T F||^2`` is the same identity with
``a_j`` replaced by ``F^T a_j`` (a feature row, or ``G_r F``), or the explicit d x f product
when that is cheaper. The clipped sum ``sum_b c_b D_b`` is one scatter plus one product, the
cost of an ordinary gradient; ``P``'s and the bias's follow from it.

With ID dropout (the layer's ``keep`` mask ``k`` of this step, ``K = diag(k)``) the rows are
``F P^T + K R`` and the bias enters as ``K bias``: ``dL/dR = K D`` and ``dL/dbias = K sum_r G_r``,
while ``dL/dP = D^T F`` is unchanged. ``||K D||^2`` is the same Gram identity with every
``a_j`` replaced by ``K a_j`` (a dropped row's one-hot becomes zero, ``G_r`` loses the dropped
columns).
"""

from __future__ import annotations

import torch

from privacy.bk_ops import gram_norm2, padded
from privacy.tied import TiedEmbedding

__all__ = ["TiedGradients"]


class TiedGradients:
    """The recorded uses of one :class:`TiedEmbedding` in a forward pass; its per-example norms and clipped sum.

    ``add_lookup`` and ``add_scores`` take what :class:`privacy.bookkeeping.BookKeeping` recorded
    (the layer's input and the gradient at its output); then :meth:`norm2` and :meth:`accumulate`
    follow bk's per-layer protocol.
    """

    def __init__(self, m: TiedEmbedding, b: int) -> None:
        self.m, self.b = m, b
        self._lookups: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._scores: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._ready = False

    def add_lookup(self, idx: torch.Tensor, g: torch.Tensor) -> None:
        """A lookup ``m(idx)``: ``idx`` batch-first (b, ...), ``g`` the gradient at its output (b, ..., d)."""
        if idx.shape[0] != self.b:
            raise ValueError(f"tied lookup of shape {tuple(idx.shape)} is not batch-first for a batch of {self.b}")
        idx = idx.reshape(self.b, -1)
        g = g.reshape(self.b, idx.shape[1], -1)
        if self.m.padding_idx is not None:  # padding looks up as zeros: no gradient
            g = g * (idx != self.m.padding_idx).unsqueeze(-1).to(g.dtype)
        self._lookups.append((idx, g))

    def add_scores(self, h: torch.Tensor, g: torch.Tensor, owner: torch.Tensor | None) -> None:
        """A scoring ``m.scores(h)``: packed rows (v, d) with their example ``owner``, or batch-first (b, ..., d)."""
        if h.dim() == 2 and owner is not None:
            self._scores.append((h, g, owner))
            return
        if h.shape[0] != self.b:
            raise ValueError(f"tied scores input of shape {tuple(h.shape)} is not batch-first for a batch of {self.b}")
        per = h[0].numel() // h.shape[-1]  # rows per example
        owner = torch.arange(self.b, device=h.device).repeat_interleave(per)
        self._scores.append((h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1]), owner))

    def _prepare(self) -> None:
        if self._ready:
            return
        self._ready = True
        m, b = self.m, self.b
        d = m.proj.shape[0]
        dev, dtype = m.proj.device, m.proj.dtype
        if self._lookups:
            self.l_idx = torch.cat([i for i, _ in self._lookups], 1)  # (b, T)
            self.l_g = torch.cat([g for _, g in self._lookups], 1)  # (b, T, d)
        else:
            self.l_idx = torch.zeros(b, 0, dtype=torch.long, device=dev)
            self.l_g = torch.zeros(b, 0, d, dtype=dtype, device=dev)
        if self._scores:
            owner = torch.cat([o for _, _, o in self._scores])
            order = torch.argsort(owner, stable=True)  # padded() needs each example's rows together
            self.owner = owner[order]  # (v,)
            self.h = torch.cat([h for h, _, _ in self._scores])[order]  # (v, d)
            self.g = torch.cat([g for _, g, _ in self._scores])[order]  # (v, N - first)
        else:
            self.owner = torch.zeros(0, dtype=torch.long, device=dev)
            self.h = torch.zeros(0, d, dtype=dtype, device=dev)
            self.g = torch.zeros(0, m.num_rows - m.first, dtype=dtype, device=dev)

    def norm2(self) -> torch.Tensor:
        """Each example's squared gradient norm over the layer's trainable parameters, (b,)."""
        self._prepare()
        m, b = self.m, self.b
        n2 = self.l_g.new_zeros(b)
        hp = padded(self.h, self.owner, b)  # (b, K, d)
        gp = padded(self.g, self.owner, b)  # (b, K, N - first)
        keep = m.keep
        if keep is not None:  # ID dropout: the residual's and bias's gradients lose the dropped rows
            gk = gp * keep[m.first :]
            lk = self.l_g * keep[self.l_idx].unsqueeze(-1)
        else:
            gk, lk = gp, self.l_g
        if m.bias is not None and m.bias.requires_grad:
            n2 = n2 + gk.sum(1).pow(2).sum(1)  # sum_r G_r per example
        if m.residual.requires_grad:
            n2 = n2 + self._table_norm2(hp, gk, lk)
        if m.proj.requires_grad:
            f = m.features
            u_look = f[self.l_idx]  # (b, T, f): F^T of a one-hot row
            u_score = padded(self.g @ f[m.first :], self.owner, b)  # (b, K, f): F^T G_r
            n2 = n2 + gram_norm2(torch.cat([u_look, u_score], 1), torch.cat([self.l_g, hp], 1))
        return n2

    def _table_norm2(self, hp: torch.Tensor, gp: torch.Tensor, l_g: torch.Tensor) -> torch.Tensor:
        """||D||_F^2 per example from the Gram identities (module docstring); D is never formed.

        ``gp`` and ``l_g`` are the score and lookup gradients (masked by ID dropout when it is on).
        """
        b, k, t = self.b, hp.shape[1], self.l_idx.shape[1]
        ss = (torch.bmm(gp, gp.transpose(1, 2)) * torch.bmm(hp, hp.transpose(1, 2))).sum((1, 2))
        if t == 0:
            return ss
        same = (self.l_idx.unsqueeze(2) == self.l_idx.unsqueeze(1)).to(hp.dtype)  # (b, T, T)
        ll = (same * torch.bmm(l_g, l_g.transpose(1, 2))).sum((1, 2))
        if k == 0:
            return ll
        # G_r at the looked-up row s_t; padding positions carry g_t = 0, so any column does
        col = (self.l_idx - self.m.first).clamp(min=0)  # (b, T)
        g_at = gp.gather(2, col.unsqueeze(1).expand(b, k, t))  # (b, K, T)
        ls = (g_at * torch.bmm(hp, l_g.transpose(1, 2))).sum((1, 2))
        return ss + 2 * ls + ll

    def accumulate(self, coef: torch.Tensor) -> None:
        """Add ``sum_b coef_b * grad_b`` to the parameters' ``.grad``."""
        self._prepare()
        m = self.m
        gc = self.g * coef[self.owner].unsqueeze(1)  # (v, N - first)
        table = self.l_g.new_zeros(m.num_rows, m.proj.shape[0])  # sum_b c_b D_b, (N, d)
        table[m.first :] += gc.T @ self.h
        if self.l_idx.numel():
            lc = self.l_g * coef[:, None, None]
            table.index_add_(0, self.l_idx.reshape(-1), lc.reshape(-1, lc.shape[-1]))
        keep = m.keep
        if m.residual.requires_grad:
            m.residual.grad += table if keep is None else table * keep.unsqueeze(1)
        if m.proj.requires_grad:
            m.proj.grad += table.T @ m.features
        if m.bias is not None and m.bias.requires_grad:
            gb = gc.sum(0)
            m.bias.grad[m.first :] += gb if keep is None else gb * keep[m.first :]
