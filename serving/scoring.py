"""Scoring: the traced last-position scorer, and the top-k ranking of a batch or of the fallback.

Sequences are left-padded to the model's ``max_len`` (index 0 is padding); scores are
``(b, n + 1)`` with column 0 never an item.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from federation.model import SASRec

if TYPE_CHECKING:
    from serving.snapshot import Snapshot

__all__ = ["Job", "make_job", "rank_batch", "fallback_top", "fast_scorer", "left_pad", "fit"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One ``/recommend`` request, ready to be ranked in a batch."""

    seq: np.ndarray  # (max_len,) int64, left-padded
    exclude: np.ndarray | None  # 1-based indices to drop
    department: str | None
    k: int
    snap: Any = None  # the Snapshot its indices were resolved against (engine.Server.job); None: the current one


def left_pad(seq: np.ndarray, max_len: int) -> np.ndarray:
    """A new ``(max_len,)`` int64 array: the last ``max_len`` items of ``seq``, zeros before them."""
    out = np.zeros(max_len, dtype=np.int64)
    tail = seq[-max_len:]
    out[max_len - len(tail) :] = tail
    return out


def fit(seq: np.ndarray, max_len: int) -> np.ndarray:
    """Left-pad or cut ``seq`` to ``max_len`` (a swapped-in model may have another max_len)."""
    if len(seq) == max_len:
        return seq
    return left_pad(seq, max_len)


def make_job(known: np.ndarray, max_len: int, *, k: int, exclude_seen: bool, department: str | None) -> Job:
    """A job for the known 1-based history ``known`` (oldest first)."""
    return Job(left_pad(known, max_len), known if exclude_seen else None, department, k)  # duplicates are harmless


def rank_batch(
    snap: Snapshot, jobs: list[Job], outside: dict[str, torch.Tensor], device: torch.device
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One forward of ``snap`` for all ``jobs`` -> [(1-based indices, scores)] best first, per job.

    ``outside[d]`` is True for the items not in department ``d``.
    """
    max_len = snap.max_len
    seqs = np.stack([fit(j.seq, max_len) for j in jobs])  # (b, t)
    with torch.inference_mode():
        scores = snap.infer(torch.from_numpy(seqs).to(device))  # (b, n + 1)
        for i, j in enumerate(jobs):
            if j.exclude is not None and len(j.exclude):
                scores[i, torch.from_numpy(j.exclude).to(device)] = -math.inf
            if j.department is not None:
                scores[i].masked_fill_(outside[j.department], -math.inf)
        kmax = min(max(j.k for j in jobs), scores.shape[1] - 1)
        top = torch.topk(scores, kmax, dim=1)
        vals, idx = top.values.cpu().numpy(), top.indices.cpu().numpy()
    out = []
    for i, j in enumerate(jobs):
        v, ix = vals[i, : j.k], idx[i, : j.k]
        keep = np.isfinite(v)
        out.append((ix[keep], v[keep]))
    return out


def fallback_top(
    snap: Snapshot, *, k: int, department: np.ndarray | None, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of ``snap``'s cold-start ranking -> (1-based indices, scores).

    ``department`` is the ``(n + 1,)`` bool mask of the items to keep, or None for all.
    """
    order = snap.fallback_order
    if department is not None:
        order = order[department[order]]
    if exclude is not None and len(exclude):
        order = order[~np.isin(order, exclude)]
    top = order[:k]
    return top, snap.fallback_scores[top]


class _LastScores(torch.nn.Module):
    """``SASRec.score_last`` with explicit position ids, so a batch's all-padding left columns can be cut.

    Cutting them is exact: pads neither attend nor are attended, and each real item
    keeps the position id it had in the full-length (training) layout.

    For the text tower (``TextTowerSASRec``) the item table ``features @ proj.T + residual``
    is precomputed here, once, as buffers (``table`` (n + 1, d) with a zero padding row, and
    ``bias`` (n + 1,)): eager ``score_last`` rebuilds it on every request (n x 384 x d
    multiply-adds, more than the rest of a forward at 10k items). A served model is frozen,
    so the table is exact for as long as this scorer serves it; it is stale for any other
    weights or catalog, which is why a new snapshot always builds a new scorer
    (``serving/snapshot.py``, ``VersionKeeper.load``). Build it under ``no_grad``, not
    ``inference_mode``: the buffers stay ordinary tensors, usable outside inference mode.
    """

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model
        tower = getattr(model, "tower", None) if model.config.tower else None
        self.tied = tower is not None
        self.has_bias = False
        if tower is not None:
            with torch.no_grad():
                table = tower.rows().detach().clone()  # (n + 1, d), padding row zero as in tower.forward
                bias = tower.bias
            self.register_buffer("table", table, persistent=False)
            if bias is not None:
                self.has_bias = True
                self.register_buffer("bias", bias.detach().clone(), persistent=False)  # (n + 1,)

    def forward(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.tied:
            x = self.table[seq]  # (b, t, d): a zero row at padding, as TiedEmbedding.forward
        else:
            x = m.item_emb(seq)  # (b, t, d)
            if m.config.text_dim:
                x = x + m.text_proj(m.text_emb[seq])
        h = m.encoder(
            inputs_embeds=x, attention_mask=(seq > 0).long(), position_ids=pos, token_type_ids=torch.zeros_like(seq)
        ).last_hidden_state[:, -1]  # (b, d)
        if not self.tied:
            return m.head(h)  # (b, n + 1)
        scores = h @ self.table.T  # (b, n + 1); column 0 (padding) is set to -inf by the caller
        return scores + self.bias if self.has_bias else scores


def fast_scorer(model: SASRec, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A faster ``model.score_last``: TorchScript-traced, with the batch's leading padding cut.

    For a model this small the Python overhead of the HF layers costs more than the
    arithmetic; tracing removes it (about 3x on a 2-core CPU). The text tower's item table
    is computed once here instead of on every request (:class:`_LastScores`), so ``model``
    must not change while the scorer serves it. The traced scorer is checked against
    ``score_last`` on random batches of several sizes and history lengths; on any mismatch
    (or if tracing fails) the eager ``score_last`` is used.
    """
    L = model.config.max_len
    n = model.config.num_items
    gen = torch.Generator().manual_seed(0)

    def sample(b: int, lengths: list[int]) -> torch.Tensor:
        seq = torch.zeros(b, L, dtype=torch.long)
        for i, k in enumerate(lengths):
            seq[i, L - k :] = torch.randint(1, n + 1, (k,), generator=gen)
        return seq.to(device)

    eager = model.score_last
    try:
        scorer = _LastScores(model).eval()  # outside inference_mode: see its docstring
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes about Python values; checked below
            example = sample(3, [L, L // 2, 1])
            traced = torch.jit.trace(scorer, (example, _positions(example, 0)), check_trace=False)

            def infer(seq: torch.Tensor) -> torch.Tensor:
                start = int((seq != 0).any(0).to(torch.int8).argmax())  # first column holding any item
                seq = seq[:, start:]
                scores = traced(seq, _positions(seq, start))
                scores[:, 0] = -math.inf
                return scores

            for b, lengths in [(1, [L]), (1, [1]), (1, [max(1, L // 3)]), (4, [1, 2, L, L - 1]), (16, [L] * 16)]:
                x = sample(b, lengths)
                want, got = eager(x)[:, 1:], infer(x)[:, 1:]
                if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
                    raise RuntimeError(f"traced scores differ by {(want - got).abs().max().item():.2e}")
            for b in (1, 16):  # warm-up: first calls allocate and pick kernels
                infer(sample(b, [L] * b))
        return infer, "traced, trimmed"
    except Exception as exc:  # tracing is an optimisation: never a reason not to serve
        log.warning("fast inference path unavailable (%s); using the eager model", str(exc).splitlines()[0][:200])
        with torch.inference_mode():
            eager(sample(1, [L]))
        return eager, "eager"


def _positions(seq: torch.Tensor, start: int) -> torch.Tensor:
    b, t = seq.shape
    return torch.arange(start, start + t, device=seq.device).repeat(b, 1)  # (b, t)
