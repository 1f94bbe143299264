"""A tied table of rows built from fixed features: looked up at the input, scored against at the output.

Row ``i`` of the table is ``e_i = P f_i + r_i``: ``f_i`` a fixed feature vector (never
trained, not part of the state dict), ``P`` a learned projection shared by every row, ``r_i``
a learned residual that starts at zero. The same rows serve both ends of a model:

* ``layer(idx)`` looks rows up (an embedding; the padding row is zero),
* ``layer.scores(h)`` scores hidden states against every non-padding row,
  ``h . e_i + bias_i`` (a tied output layer).

Because ``P`` and ``r`` are used at both ends, a per-example gradient is the *sum* of both
uses' contributions. Opacus's modes cannot see that (the output use is not batch-first and
the weights are shared); fedmart's one-pass clipping can (``grad_sample_mode="bk"``,
:mod:`privacy.bk_tied`), and :func:`privacy.dp.make_private` refuses the other modes.

Only ``padding_idx`` 0 or None is supported: the scored rows are then ``1..N-1`` (or all).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["TiedEmbedding", "ScoresHook"]

ScoresHook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]


class TiedEmbedding(nn.Module):
    """Rows ``features @ proj.T + residual``, tied between lookup and scoring (see the module docstring).

    Parameters
    ----------
    features : (N, f) float tensor
        Fixed features of the N rows (a non-persistent buffer: rebuilt by whoever builds the layer).
    dim : int
        Width of a row.
    padding_idx : 0 or None
        Row 0 looks up as zeros and is never scored (its residual and bias are never read).
    bias : bool
        A learned per-row score offset, zero at the start.
    """

    def __init__(self, features: torch.Tensor, dim: int, *, padding_idx: int | None = 0, bias: bool = True) -> None:
        super().__init__()
        if features.dim() != 2:
            raise ValueError(f"features must be (rows, width), got shape {tuple(features.shape)}")
        if padding_idx not in (0, None):
            raise ValueError(f"padding_idx must be 0 or None, not {padding_idx}")
        n, f = features.shape
        self.padding_idx = padding_idx
        self.first = 1 if padding_idx == 0 else 0  # the first scored row
        self.register_buffer("features", features.float(), persistent=False)
        # nn.Linear's default init, without the Linear: the projection is not called as a module
        self.proj = nn.Parameter(nn.Linear(f, dim, bias=False).weight.detach().clone())  # (dim, f)
        self.residual = nn.Parameter(torch.zeros(n, dim))  # (N, dim): the rows start as projected features
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None  # (N,)
        self._scores_hooks: OrderedDict[int, ScoresHook] = OrderedDict()

    @property
    def num_rows(self) -> int:
        return self.features.shape[0]

    def rows(self) -> torch.Tensor:
        """The whole table (N, dim), padding row zero."""
        e = self.features @ self.proj.T + self.residual  # (N, dim)
        if self.padding_idx is not None:
            e = torch.cat([e.new_zeros(1, e.shape[1]), e[1:]])
        return e

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(...) row indices -> (..., dim) rows; padding positions are zeros."""
        x = self.features[idx] @ self.proj.T + self.residual[idx]  # (..., dim)
        if self.padding_idx is not None:
            x = x * (idx != self.padding_idx).unsqueeze(-1).to(x.dtype)
        return x

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(..., dim) hidden states -> (..., N - first) scores against rows ``first..N-1``.

        Rows of ``h`` may be packed (only some positions of each example) when tagged with
        their example by :func:`privacy.bookkeeping.tag_rows`.
        """
        e = self.features[self.first :] @ self.proj.T + self.residual[self.first :]  # (N - first, dim)
        out = h @ e.T
        if self.bias is not None:
            out = out + self.bias[self.first :]
        for hook in list(self._scores_hooks.values()):
            hook(self, (h,), out)
        return out

    def register_scores_hook(self, hook: ScoresHook) -> RemovableHandle:
        """Call ``hook(module, (h,), scores)`` after every :meth:`scores` (as a forward hook after ``forward``)."""
        handle = RemovableHandle(self._scores_hooks)
        self._scores_hooks[handle.id] = hook
        return handle
