"""Per-user clipping in one backward pass ("book-keeping", ``grad_sample_mode="bk"``).

Opacus computes the clipped gradient sum either from materialised per-example
gradients (``hooks``) or with two backward passes (``ghost``: one for the per-example
norms, one for the re-weighted loss). Book-keeping (Bu, Wang, Zha and Karypis,
"Differentially Private Optimization on Large Model at Small Cost", ICML 2023) needs
one: every supported layer's gradient is an outer product of what the layer saw in
the forward pass (its input ``a``) and what flows back into its output (``g``), so

1. one ``torch.autograd.grad`` of the summed per-example loss with respect to the
   layers' *outputs* gives every ``g`` (no parameter gradient is computed);
2. each example's squared gradient norm is read off ``a`` and ``g`` per layer
   (ghost norm ``sum_ts (a_t.a_s)(g_t.g_s)`` or the explicit per-example gradient,
   whichever is cheaper for the shapes at hand), summed over layers;
3. the clipped sum ``sum_i min(1, C / ||grad_i||) grad_i`` is one re-weighted product
   per layer, ``(c * g)^T a``: the cost of an ordinary weight gradient.

The result is written to ``p.grad`` as the *sum* of clipped per-example gradients,
which is what Opacus's ``DPOptimizerFastGradientClipping`` expects: Opacus still draws
the Poisson batches, adds the Gaussian noise, scales by the expected batch size and
accounts every step. Only the clipping is computed here, and it is checked against
brute-force per-example clipping in the tests (``tests/privacy/test_bookkeeping.py``,
``tests/federation/test_model_dp.py``).

Supported layers: ``nn.Linear``, ``nn.Embedding`` (without ``max_norm``,
``scale_grad_by_freq`` or ``sparse``), ``nn.LayerNorm`` over the last dimension, and
:class:`privacy.tied.TiedEmbedding`, whose rows are shared between a lookup at the input
and a scoring at the output (:mod:`privacy.bk_tied`: each example's gradient is the sum of
both uses, and its norm is taken of that sum). A module with trainable parameters of any
other kind, or any other layer called twice in a forward pass (shared weights), is
refused: the per-example norm would be wrong.

Activations keep the batch first (``(b, ...)``), as under Opacus, with one
exception that is the point of this module for sequence models: a ``Linear`` may be
applied to a *packed* 2-D input of rows drawn from the examples (e.g. only the
positions of a batch that have a target), if the input carries the example index of
every row (:func:`tag_rows`). Opacus cannot do that, because its hooks need the batch
dimension on every activation.
"""

from __future__ import annotations

import torch
from torch import nn

from privacy.bk_ops import gram_norm2 as _gram_norm2
from privacy.bk_ops import padded as _padded
from privacy.bk_tied import TiedGradients
from privacy.tied import TiedEmbedding

__all__ = ["BookKeeping", "tag_rows", "supports", "is_hooked"]

_OWNER = "_fedmart_row_owner"
_HOOKED = "_fedmart_bk_hooked"
_SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm, TiedEmbedding)
_SCORES = "scores"  # a record of TiedEmbedding.scores (the output use), not of forward


def tag_rows(rows: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Mark a packed ``(n, features)`` activation with the example index of each row.

    ``owner`` is a ``(n,)`` long tensor of indices into the batch, non-decreasing (rows
    of one example are contiguous, as ``mask.nonzero()`` over a ``(b, t)`` mask gives
    them). Returns ``rows`` itself; a no-op for everything but :class:`BookKeeping`.
    """
    setattr(rows, _OWNER, owner)
    return rows


def is_hooked(module: nn.Module) -> bool:
    """Whether a :class:`BookKeeping` still has its hooks on ``module``."""
    return bool(getattr(module, _HOOKED, False))


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _tied(module: nn.Module) -> bool:
    return isinstance(module, TiedEmbedding) and bool(_trainable(module))


def supports(module: nn.Module) -> str | None:
    """None when every trainable layer of ``module`` is supported, else why not."""
    for name, m in module.named_modules():
        if not _trainable(m):
            continue
        if not isinstance(m, _SUPPORTED):
            return f"layer {name or '<root>'} ({type(m).__name__}) has trainable parameters bk cannot clip"
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
            return f"embedding {name} uses max_norm, scale_grad_by_freq or sparse gradients"
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
            return f"layer norm {name} normalises over more than the last dimension"
    return None


class BookKeeping:
    """Forward hooks on ``module`` plus :meth:`clip_and_sum`, which replaces ``backward``.

    Parameters
    ----------
    module : nn.Module
        The model; every layer with trainable parameters must be supported (:func:`supports`).
    max_grad_norm : float
        The clipping bound C on each example's flat gradient norm over all trainable
        parameters (Opacus's flat clipping: ``min(1, C / (norm + 1e-6))``).
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        reason = supports(module)
        if reason is not None:
            raise ValueError(f"grad_sample_mode 'bk' cannot clip this model: {reason}; use 'ghost' or 'hooks'")
        if getattr(module, _HOOKED, False):
            raise ValueError("the module already has bk hooks; remove() them (close the earlier training) first")
        setattr(module, _HOOKED, True)
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._records: list[tuple[nn.Module, torch.Tensor, torch.Tensor, str]] = []
        self._versions: list[int] = []  # each output's version: an in-place change would hide its gradient
        self._handles = [m.register_forward_hook(self._record) for m in module.modules() if _trainable(m)]
        self._handles += [m.register_scores_hook(self._record_scores) for m in module.modules() if _tied(m)]
        self.last_norms: torch.Tensor | None = None  # per-example norms of the last step, for tests

    def _record(self, m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, kind: str = "") -> None:
        if m.training and torch.is_grad_enabled():
            self._records.append((m, inputs[0], output, kind))
            self._versions.append(output._version)

    def _record_scores(self, m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._record(m, inputs, output, _SCORES)

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        if self._handles:
            setattr(self.module, _HOOKED, False)
        self._handles = []
        self.discard()

    def discard(self) -> None:
        """Forget the recorded forward pass (e.g. after an exception)."""
        self._records.clear()
        self._versions.clear()

    def clip_and_sum(self, per_example_loss: torch.Tensor) -> torch.Tensor:
        """Set ``p.grad`` to the sum over examples of their clipped gradients.

        ``per_example_loss`` is the ``(b,)`` loss of the forward pass just recorded, one
        entry per example. Returns the per-example gradient norms before clipping.
        """
        records, self._records = self._records, []
        versions, self._versions = self._versions, []
        if per_example_loss.dim() != 1:
            raise ValueError(f"need the per-example loss of shape (b,), got {tuple(per_example_loss.shape)}")
        for (m, _, out, _), version in zip(records, versions, strict=True):
            if out._version != version:
                raise ValueError(f"the output of a {type(m).__name__} was modified in place: bk cannot clip it")
        seen: set[int] = set()
        for m, _, _, _ in records:
            if id(m) in seen and not _tied(m):  # a tied layer sums its uses itself (privacy/bk_tied.py)
                raise ValueError(
                    f"{type(m).__name__} was called twice in one forward pass: bk cannot clip shared weights"
                )
            seen.add(id(m))
        b = per_example_loss.shape[0]
        outputs = [out for _, _, out, _ in records]
        grads = torch.autograd.grad(per_example_loss.sum(), outputs, allow_unused=True) if outputs else ()
        layers: list[_Layer | TiedGradients] = []
        tied: dict[int, TiedGradients] = {}
        for (m, a, _, kind), g in zip(records, grads, strict=True):
            if g is None:
                continue
            if isinstance(m, TiedEmbedding):  # every use of the layer adds to one per-example gradient
                if id(m) not in tied:
                    tied[id(m)] = TiedGradients(m, b)
                    layers.append(tied[id(m)])
                if kind == _SCORES:
                    tied[id(m)].add_scores(a.detach(), g.detach(), getattr(a, _OWNER, None))
                else:
                    tied[id(m)].add_lookup(a.detach(), g.detach())
                continue
            layers.append(_layer(m, a.detach(), g.detach(), b, getattr(a, _OWNER, None)))
        norm2 = per_example_loss.new_zeros(b, dtype=torch.float32)
        for layer in layers:
            norm2 += layer.norm2()
        norms = norm2.sqrt()
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad = torch.zeros_like(p)
        for layer in layers:
            layer.accumulate(coef)
        self.last_norms = norms
        return norms


class _Layer:
    def norm2(self) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, coef: torch.Tensor) -> None:
        raise NotImplementedError


def _layer(m: nn.Module, a: torch.Tensor, g: torch.Tensor, b: int, owner: torch.Tensor | None) -> _Layer:
    if isinstance(m, nn.Linear):
        return _Linear(m, a, g, b, owner)
    if isinstance(m, nn.Embedding):
        return _Embedding(m, a, g, b)
    return _LayerNorm(m, a, g, b)


class _Linear(_Layer):
    def __init__(self, m: nn.Linear, a: torch.Tensor, g: torch.Tensor, b: int, owner: torch.Tensor | None) -> None:
        self.m = m
        if a.dim() == 2 and owner is not None:
            self.row_coef_index = owner
            self.a3, self.g3 = _padded(a, owner, b), _padded(g, owner, b)
        else:
            if a.shape[0] != b:
                raise ValueError(f"Linear input of shape {tuple(a.shape)} is not batch-first for a batch of {b}")
            self.row_coef_index = None
            self.a3, self.g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        self.a, self.g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])

    def norm2(self) -> torch.Tensor:
        n2 = _gram_norm2(self.a3, self.g3) if self.m.weight.requires_grad else 0.0
        if self.m.bias is not None and self.m.bias.requires_grad:
            n2 = n2 + self.g3.sum(1).pow(2).sum(1)
        return n2

    def accumulate(self, coef: torch.Tensor) -> None:
        if self.row_coef_index is not None:
            row_coef = coef[self.row_coef_index]
        else:
            row_coef = coef.repeat_interleave(self.g.shape[0] // coef.shape[0])
        gc = self.g * row_coef[:, None]
        if self.m.weight.requires_grad:
            self.m.weight.grad += gc.T @ self.a
        if self.m.bias is not None and self.m.bias.requires_grad:
            self.m.bias.grad += gc.sum(0)


class _Embedding(_Layer):
    def __init__(self, m: nn.Embedding, idx: torch.Tensor, g: torch.Tensor, b: int) -> None:
        self.m = m
        idx = idx.reshape(b, -1)
        g = g.reshape(b, idx.shape[1], -1)
        if m.padding_idx is not None:  # PyTorch gives the padding row no gradient
            g = g * (idx != m.padding_idx).unsqueeze(-1)
        self.idx, self.g = idx, g

    def norm2(self) -> torch.Tensor:
        same = self.idx.unsqueeze(2) == self.idx.unsqueeze(1)  # (b, t, t): same row of the table
        return (torch.bmm(self.g, self.g.transpose(1, 2)) * same).sum((1, 2))

    def accumulate(self, coef: torch.Tensor) -> None:
        gc = (self.g * coef[:, None, None]).reshape(-1, self.g.shape[-1])
        self.m.weight.grad.index_add_(0, self.idx.reshape(-1), gc)


class _LayerNorm(_Layer):
    def __init__(self, m: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, b: int) -> None:
        self.m = m
        x = x.reshape(b, -1, x.shape[-1])
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        xhat = (x - mean) * torch.rsqrt(var + m.eps)
        g = g.reshape(b, -1, g.shape[-1])
        # per-example gradients are (b, d): cheap to hold explicitly
        self.gw = (g * xhat).sum(1) if m.weight is not None and m.weight.requires_grad else None
        self.gb = g.sum(1) if m.bias is not None and m.bias.requires_grad else None

    def norm2(self) -> torch.Tensor:
        n2 = 0.0
        for per_example in (self.gw, self.gb):
            if per_example is not None:
                n2 = n2 + per_example.pow(2).sum(1)
        return n2

    def accumulate(self, coef: torch.Tensor) -> None:
        if self.gw is not None:
            self.m.weight.grad += coef @ self.gw
        if self.gb is not None:
            self.m.bias.grad += coef @ self.gb
