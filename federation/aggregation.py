"""Holder-normalised averaging of item-indexed parameters.

Why: on a real platform a department's items are trained at that department's node only.
Plain FedAvg averages an item's embedding row over *all* nodes, most of which never saw
the item and return the row unchanged, so every item's update is divided by the number
of silos (ten departments: a tenth of the step). Measured on the synthetic department
silos (BENCHMARKS.md, "Department silos"), that dilution kept FedAvg below popularity.

The fix keeps FedAvg for every other parameter and averages each item-indexed row
(``wire.item_row_keys``: SASRec's ID embedding and head, the text tower's ID residual and
per-item bias; the tower's shared projection is averaged like any dense weight) over the
nodes that hold the item only. A node resets the rows of items it does not hold to the
global rows before it replies (``clients/app.py``), so its update there is zero, and the
coordinator divides each row's averaged update by the share of the round's weight held by
the item's holders:

    new[i] = global[i] + (Σ_k w_k h_k[i] Δ_k[i]) / (Σ_k w_k h_k[i])

a convex combination of the holders' updates, where ``h_k[i]`` is 1 when node k holds
item i. The nodes report ``h_k`` as one more array (``wire.ITEM_HOLDERS``) inside the same
average, and under this rule every node weighs 1 (``clients/local_round.py``), so the
averaged holder vector is each item's holder *count* over the number of nodes in the sum:
under secure aggregation the coordinator learns how many nodes hold an item, never which.
(With distinct plaintext weights, the weighted shares would be subset sums from which the
coordinator could decode every node's item set.) Under DP the holder set comes from the
public catalog anyway. When every node holds every item the rule is exactly FedAvg. A row's divisor is
floored at ``MIN_SHARE``: below it the row keeps the plain average, so a rare item held by
one tiny node cannot amplify the secure sum's quantisation error without bound.

The rule is applied *before* a server optimizer (FedAdam sees the corrected average),
by putting :class:`_HolderNormalised` between the strategy and FedAvg in the MRO.

Client-level DP wraps these strategies (``ClientDPStrategy(HolderFedAvg(...))``,
:mod:`privacy.client_dp_strategy`): the wrapper noises the sum of the clipped updates and
hands them one reply carrying the noised mean, so the noise sits before the holder
division and before FedAdam's step, and the holder shares (public under client-level DP:
nodes take them from the catalog) pass through unnoised.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg

from federation.wire import ITEM_HOLDERS, item_row_keys

__all__ = [
    "MIN_SHARE",
    "HolderFedAvg",
    "HolderFedAdam",
    "with_holders",
    "without_holders",
    "normalise_rows",
]

MIN_SHARE = 1e-3


def with_holders(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` plus a zero ``ITEM_HOLDERS`` array sized by the item rows."""
    keys = item_row_keys(k for k in arrays if k != ITEM_HOLDERS)
    if not keys:
        raise ValueError("the model has no item-indexed parameters: federation.item_rows=holders needs them")
    rows = arrays[keys[0]].shape[0]
    out = ArrayRecord({k: arrays[k] for k in arrays if k != ITEM_HOLDERS})
    out[ITEM_HOLDERS] = Array(np.zeros(rows, dtype=np.float32))
    return out


def without_holders(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in weights.items() if k != ITEM_HOLDERS}


def normalise_rows(current: dict[str, np.ndarray], averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply the holder normalisation to FedAvg's ``averaged`` arrays (NumPy, by key).

    ``averaged[ITEM_HOLDERS]`` is each row's holder share in [0, 1]; the returned dict
    carries a zero holder array again, ready for the next round.
    """
    share = np.asarray(averaged[ITEM_HOLDERS], dtype=np.float64)
    scale = np.where(share >= MIN_SHARE, 1.0 / np.maximum(share, MIN_SHARE), 1.0)
    out = dict(averaged)
    for key in item_row_keys(averaged):
        g = np.asarray(current[key], dtype=np.float64)
        s = scale.reshape(-1, *([1] * (g.ndim - 1)))
        out[key] = (g + (np.asarray(averaged[key], dtype=np.float64) - g) * s).astype(averaged[key].dtype)
    out[ITEM_HOLDERS] = np.zeros_like(averaged[ITEM_HOLDERS])
    return out


class _HolderNormalised(FedAvg):
    """FedAvg's weighted average, then :func:`normalise_rows` against the round's global arrays."""

    _global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or ITEM_HOLDERS not in averaged or self._global is None:
            return averaged, metrics
        current = {k: self._global[k].numpy() for k in self._global}
        fixed = normalise_rows(current, {k: averaged[k].numpy() for k in averaged})
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in fixed.items()}), metrics


class HolderFedAvg(_HolderNormalised):
    """FedAvg with holder-normalised item rows."""


class HolderFedAdam(FedAdam, _HolderNormalised):
    """FedAdam whose pseudo-gradient is the holder-normalised average (MRO: FedOpt -> rows -> FedAvg)."""
