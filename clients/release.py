"""What a node does to its trained weights before they leave it: item holders and client-level clipping.

Both are post-processing of the locally trained model, applied in this order:

1. :func:`with_item_holders` (``federation.item_rows: holders``): the node speaks only for
   the items it holds. Rows of other items are reset to the incoming global rows and the
   0/1 holder vector is added as one more array (``wire.ITEM_HOLDERS``); the coordinator
   divides each row's average by its holders' share (``federation/aggregation.py``).
2. :func:`clip_for_client_dp` (``federation.client_dp.enabled``): the update ``new - global``
   is clipped to norm C, so that one node's contribution to the sum is bounded
   (``privacy/client_dp.py``); the coordinator adds the noise.
"""

from __future__ import annotations

import logging

import numpy as np

from clients.node import NodeData
from federation import wire
from privacy.client_dp import clip_update

__all__ = ["item_holders", "with_item_holders", "clip_for_client_dp"]

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]


def item_holders(node: NodeData, private: bool) -> np.ndarray:
    """Which item rows this node's update speaks for (1.0) — see federation/aggregation.py.

    Without DP: the items in the node's training data. With DP the set must not depend on
    private data, so it comes from the public catalog: the items of the department the node
    is named after (department silos), else every item (plain FedAvg on item rows).
    """
    rows = len(node.catalog.item_id) + 1
    if not private:
        held = np.zeros(rows, dtype=np.float32)
        held[node.split.train.items] = 1.0
        return held
    own = np.asarray(node.catalog.department).astype(str) == node.name
    if own.any():  # a department node: its department's items
        return np.concatenate([[0.0], own]).astype(np.float32)
    return np.ones(rows, dtype=np.float32)


def with_item_holders(weights: Weights, incoming: Weights, node: NodeData, *, private: bool) -> Weights:
    """The update plus its ``ITEM_HOLDERS`` array.

    The item rows outside the holder set are reset to the incoming global rows: a node
    speaks only for the items it holds, so the coordinator's holder-normalised mean of a
    row is a convex combination of its holders' updates and never amplifies anyone's.
    (Keeping non-holders' head updates and dividing them by the holders' share diverged
    on MovieLens genre silos, where a rare item's holders carry a tiny share.) Under DP the
    set is public, so the reset is post-processing with no privacy cost.
    """
    held = item_holders(node, private)
    out = dict(weights)
    outside = held == 0
    for key in wire.item_row_keys(out):  # the model's own: SASRec's ID rows, or the tower's residual and bias
        out[key] = out[key].copy()
        out[key][outside] = incoming[key][outside]
    out[wire.ITEM_HOLDERS] = held
    return out


def clip_for_client_dp(weights: Weights, incoming: Weights, *, max_norm: float, node_name: str) -> Weights:
    """``incoming + clip(weights - incoming, max_norm)``: the node's bounded contribution to the sum.

    The holder array is not part of the update (under DP it comes from the public catalog).
    """
    update, norm = clip_update(
        {k: weights[k] - incoming[k] for k in weights if k in incoming and k != wire.ITEM_HOLDERS},
        max_norm=max_norm,
    )
    log.info("node %s: update norm %.4g clipped to %g (client-level DP)", node_name, norm, max_norm)
    return {k: incoming[k] + update[k] if k in update else v for k, v in weights.items()}
