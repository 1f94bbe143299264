"""What the inner strategy receives after unmasking: one reply carrying the nodes' weighted mean.

``SecAggStrategy`` hands ``inner.aggregate_train`` a single synthetic reply
``{arrays: global + sum w_u delta_u / W, metrics: {weight key: W, weighted means of the
nodes' plaintext metrics}}``, so FedAvg returns it unchanged and a server optimiser
(FedAdam, ...) steps on it. The arrays come from the unmasked sum only; the metrics travelled
in plaintext beside the masked input (they are not protected by secure aggregation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from privacy.secagg.encoding import EncodingParams

__all__ = ["synthetic_reply", "mean_metrics"]


def synthetic_reply(
    global_arrays: ArrayRecord,
    arrays_key: str,
    mean: np.ndarray,
    total_weight: int,
    metrics: Mapping[int, dict[str, MetricRecord]],
    *,
    weighted_by_key: str,
    params: EncodingParams,
    reply_to: Message,
) -> Message:
    """One reply: ``global_arrays`` plus the flat decoded ``mean`` update, and the averaged metrics.

    ``mean`` follows ``global_arrays``' key order; each array is summed in float64 and stored
    in the global array's dtype. ``metrics`` maps a node to its reply's MetricRecords.
    """
    arrays: dict[str, Array] = {}
    offset = 0
    for key, arr in global_arrays.items():
        g = arr.numpy()
        part = mean[offset : offset + g.size].reshape(g.shape)
        offset += g.size
        # the sum in float64, stored in the global's dtype: one pass, no temporaries
        new = np.empty(g.shape, dtype=g.dtype)
        np.add(g, part, out=new, dtype=np.float64, casting="unsafe")
        arrays[key] = Array(new)
    metric_key, averaged = mean_metrics(metrics, weighted_by_key=weighted_by_key, params=params)
    averaged[weighted_by_key] = total_weight
    content = RecordDict({arrays_key: ArrayRecord(arrays), metric_key: MetricRecord(averaged)})
    return Message(content, reply_to=reply_to)


def mean_metrics(
    metrics: Mapping[int, dict[str, MetricRecord]], *, weighted_by_key: str, params: EncodingParams
) -> tuple[str, dict]:
    """Weighted mean of the plaintext metrics (weights: the nodes' own, capped like the encoding).

    Returns the MetricRecord key the nodes used (``"metrics"`` if none) and the means of the
    numbers and equal-length lists every node reported; the weight key itself is left out.
    """
    rows: list[tuple[float, MetricRecord]] = []
    key = "metrics"
    for recs in metrics.values():
        for k, rec in recs.items():
            if weighted_by_key in rec:
                key = k
                w = params.cap_weight(float(cast(float, rec[weighted_by_key])))
                rows.append((float(w), rec))
    total = sum(w for w, _ in rows)
    if not rows or total <= 0:
        return key, {}
    common = set.intersection(*(set(rec) for _, rec in rows)) - {weighted_by_key}
    out: dict = {}
    for name in sorted(common):
        values = [rec[name] for _, rec in rows]
        if all(isinstance(v, list) for v in values):
            if len({len(cast(list, v)) for v in values}) != 1:
                continue
            out[name] = [
                sum(w * float(v[j]) for (w, _), v in zip(rows, values, strict=True)) / total
                for j in range(len(cast(list, values[0])))
            ]
        elif all(isinstance(v, int | float) for v in values):
            out[name] = sum(w * float(cast(float, v)) for (w, _), v in zip(rows, values, strict=True)) / total
    return key, out
