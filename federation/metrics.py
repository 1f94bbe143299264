"""Full-ranking metrics over the whole catalog, with already-seen items masked.

The rank of the held-out item is the number of *other* unmasked items that score
at least as high (ties count against the model, so a constant scorer gets no
credit). HR@K = 1[rank < K], NDCG@K = 1/log2(rank + 2) if rank < K, MRR = 1/(rank + 1).
No sampled negatives: these numbers are comparable to full-ranking results only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = ["ranks", "RankingMetrics", "popularity_scores"]


def ranks(scores: torch.Tensor, targets: torch.Tensor, seen: Sequence[np.ndarray] | None = None) -> torch.Tensor:
    """0-based rank of each target among all items.

    Parameters
    ----------
    scores : (b, n + 1), column 0 is padding and never ranked
    targets : (b,) item indices >= 1
    seen : per row, item indices to exclude (the target itself is never excluded)
    """
    rows = torch.arange(len(targets))
    target_score = scores[rows, targets].float()  # (b,) taken before masking: a repeat item still counts
    masked = scores.clone().float()
    masked[:, 0] = float("-inf")
    if seen is not None:
        for row, items in enumerate(seen):
            if len(items):
                masked[row, torch.as_tensor(items, dtype=torch.long)] = float("-inf")
    masked[rows, targets] = float("-inf")  # the target is not its own competitor
    return (masked >= target_score[:, None]).sum(dim=1)


class RankingMetrics:
    """Accumulates ranks and reports HR@K, NDCG@K and MRR."""

    def __init__(self, ks: Iterable[int] = (10,)) -> None:
        self.ks = tuple(ks)
        self._ranks: list[torch.Tensor] = []

    def update(self, r: torch.Tensor) -> None:
        self._ranks.append(r.detach().cpu())

    @property
    def count(self) -> int:
        return int(sum(len(r) for r in self._ranks))

    def compute(self) -> dict[str, float]:
        if not self._ranks:
            return {
                **{f"hr@{k}": 0.0 for k in self.ks},
                **{f"ndcg@{k}": 0.0 for k in self.ks},
                "mrr": 0.0,
                "users": 0,
            }
        r = torch.cat(self._ranks).double()
        out: dict[str, float] = {}
        for k in self.ks:
            hit = r < k
            out[f"hr@{k}"] = hit.double().mean().item()
            out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean().item()
        out["mrr"] = (1.0 / (r + 1.0)).mean().item()
        out["users"] = len(r)
        return out


def popularity_scores(item_counts: np.ndarray, batch: int) -> torch.Tensor:
    """Scores of the popularity baseline: training counts, same for every user, (batch, n + 1).

    A tiny deterministic tie-break (lower index first) keeps equally popular items
    from all tying with the target.
    """
    counts = torch.as_tensor(item_counts, dtype=torch.float64)
    tie = torch.arange(len(counts), dtype=torch.float64) / (len(counts) * 10.0)
    return (counts - tie).unsqueeze(0).expand(batch, -1)
