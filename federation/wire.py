"""Names that cross the wire between coordinator and nodes, in one place."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ARRAYS",
    "METRICS",
    "CONFIG",
    "NUM_EXAMPLES",
    "SERVER_ROUND",
    "RUN",
    "QUERY_HELLO",
    "QUERY_AUDIT",
    "ERR_DECLINED",
    "ERR_BAD_DATA",
    "ERR_BAD_UPDATE",
    "ERR_NO_TRAINING_DATA",
    "ERR_POLICY",
    "ITEM_HOLDERS",
    "ITEM_ROW_KEYS",
    "item_row_keys",
]

ARRAYS = "arrays"  # ArrayRecord key of the model weights
METRICS = "metrics"  # MetricRecord key of a reply's metrics
CONFIG = "config"  # ConfigRecord key of a round's instructions
NUM_EXAMPLES = "num-examples"  # aggregation weight: users trained (train) or evaluated (evaluate)
SERVER_ROUND = "server-round"  # injected by Flower's strategies
RUN = "fedmart-run"  # the run's name: a node's ledger entries are keyed by (run, round)
QUERY_HELLO = "query.hello"  # coordinator asks a node for its name and data summary
QUERY_AUDIT = "query.audit"  # after the run: the final model, for a node's own privacy audit (clients/canaries.py)
# Holder-normalised item rows (federation/aggregation.py): an extra array in the global
# ArrayRecord, zeros from the coordinator; a node returns 1.0 for every item row its update
# touches, so the (securely) averaged array is each row's share of the round's weight.
ITEM_HOLDERS = "fedmart.item-holders"
# Parameters indexed by item (row i = catalog index i), of every model (federation/model.py): they
# follow the holder rule. SASRec: its ID embedding and output head. The text tower: its ID residual
# and per-item bias; its projection (`tower.proj`) is shared by all items and averaged over all nodes.
# A model's own are `item_row_keys(its state dict)`.
ITEM_ROW_KEYS = ("item_emb.weight", "head.weight", "head.bias", "tower.residual", "tower.bias")


def item_row_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """The item-indexed parameters among ``keys`` (a state dict, a weights dict, an ArrayRecord)."""
    present = set(keys)
    return tuple(k for k in ITEM_ROW_KEYS if k in present)


# Error codes of a node's error reply (Flower's own codes are small integers).
ERR_DECLINED = 4201  # the node declined the round (privacy budget); reason is JSON
ERR_BAD_DATA = 4202  # the node's data failed validation; it refuses to take part
ERR_BAD_UPDATE = 4203  # the node refused to send its own malformed update (NaN/Inf, shape, dtype, range)
ERR_NO_TRAINING_DATA = 4204  # no user at the node has two training events: nothing to train on
ERR_POLICY = 4205  # the node's own policy refuses what the coordinator asked; the reason names the policy key
