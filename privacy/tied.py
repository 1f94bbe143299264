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

**ID dropout** (``id_dropout=p``, the cold-start dropout of DropoutNet): while training, each
step (:meth:`TiedEmbedding.sample_keep`) drops the residual and bias of a random share ``p`` of
the rows, at both ends, so that ``P f_i`` alone must rank row ``i``: what a row no one has
trained (a new catalog item, residual and bias zero) looks like. The mask is drawn from
``torch``'s generator, independent of the data, so it changes the function being trained, not
the privacy analysis; :mod:`privacy.bk_tied` clips the masked gradients exactly.
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
    id_dropout : float
        Share of rows whose residual and bias a training step drops (module docstring); 0: none.
    """

    def __init__(
        self,
        features: torch.Tensor,
        dim: int,
        *,
        padding_idx: int | None = 0,
        bias: bool = True,
        id_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if features.dim() != 2:
            raise ValueError(f"features must be (rows, width), got shape {tuple(features.shape)}")
        if padding_idx not in (0, None):
            raise ValueError(f"padding_idx must be 0 or None, not {padding_idx}")
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), not {id_dropout}")
        n, f = features.shape
        self.padding_idx = padding_idx
        self.first = 1 if padding_idx == 0 else 0  # the first scored row
        self.register_buffer("features", features.float(), persistent=False)
        # nn.Linear's default init, without the Linear: the projection is not called as a module
        self.proj = nn.Parameter(nn.Linear(f, dim, bias=False).weight.detach().clone())  # (dim, f)
        self.residual = nn.Parameter(torch.zeros(n, dim))  # (N, dim): the rows start as projected features
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None  # (N,)
        self._scores_hooks: OrderedDict[int, ScoresHook] = OrderedDict()
        self.id_dropout = id_dropout
        self._keep: torch.Tensor | None = None  # (N,) 0/1 of this training step, see sample_keep

    def sample_keep(self) -> None:
        """Draw this step's ID-dropout mask (training with ``id_dropout`` > 0); clear it otherwise.

        Call once per step, before the step's first use: lookups and scores of one step must
        see the same mask (the model's ``embed`` does it).
        """
        if self.training and self.id_dropout > 0:
            u = torch.rand(self.num_rows, device=self.residual.device)
            self._keep = (u >= self.id_dropout).to(self.residual.dtype)
        else:
            self._keep = None

    @property
    def keep(self) -> torch.Tensor | None:
        """The (N,) 0/1 mask of the rows whose residual and bias this training step uses; None: all."""
        return self._keep if self.training else None

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
        r = self.residual[idx]  # (..., dim)
        if self.keep is not None:
            r = r * self.keep[idx].unsqueeze(-1)
        x = self.features[idx] @ self.proj.T + r  # (..., dim)
        if self.padding_idx is not None:
            x = x * (idx != self.padding_idx).unsqueeze(-1).to(x.dtype)
        return x

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(..., dim) hidden states -> (..., N - first) scores against rows ``first..N-1``.

        Rows of ``h`` may be packed (only some positions of each example) when tagged with
        their example by :func:`privacy.bookkeeping.tag_rows`.
        """
        keep = self.keep
        r = self.residual[self.first :]  # (N - first, dim)
        if keep is not None:
            r = r * keep[self.first :].unsqueeze(-1)
        e = self.features[self.first :] @ self.proj.T + r  # (N - first, dim)
        out = h @ e.T
        if self.bias is not None:
            out = out + (self.bias[self.first :] if keep is None else self.bias[self.first :] * keep[self.first :])
        for hook in list(self._scores_hooks.values()):
            hook(self, (h,), out)
        return out

    def register_scores_hook(self, hook: ScoresHook) -> RemovableHandle:
        """Call ``hook(module, (h,), scores)`` after every :meth:`scores` (as a forward hook after ``forward``)."""
        handle = RemovableHandle(self._scores_hooks)
        self._scores_hooks[handle.id] = hook
        return handle
