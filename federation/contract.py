"""What a valid model update is: the one check both sides of the wire apply.

A node's train reply must carry the global model's arrays back with the same names, shapes
and dtypes, finite values of bounded size, and item-holder shares in [0, 1]. The coordinator
applies :func:`validate_update` to every plaintext reply it triages (``federation/coordinator.py``);
the node applies it to its own reply before sending (``clients/guard.py``), which is the only
place the check can run under secure aggregation, where the coordinator sees a masked vector.

The names that cross the wire stay constants in :mod:`federation.wire`; this module holds the
rule over them, so that a node does not import the coordinator's round loop to obey it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from federation.wire import ITEM_HOLDERS

__all__ = ["MAX_ABS", "validate_update"]

MAX_ABS = 1e6
"""Largest magnitude accepted in an update (a weight this large is a fault, not learning)."""


def validate_update(arrays: ArrayRecord, reference: ArrayRecord, *, max_abs: float = MAX_ABS) -> str:
    """Return "" for an acceptable update, else why it is rejected.

    ``reference`` is the global model the update answers: the update must have exactly its
    array names, and each array its shape and dtype; every value must be finite and at most
    ``max_abs`` in magnitude, and the item-holder shares (``wire.ITEM_HOLDERS``) in [0, 1].
    """
    if set(arrays.keys()) != set(reference.keys()):
        return "wrong parameter names"
    for k, ref in reference.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(ref.shape):
            return f"wrong shape for {k}: {tuple(a.shape)} != {tuple(ref.shape)}"
        if a.dtype != ref.dtype:
            return f"wrong dtype for {k}: {a.dtype} != {ref.dtype}"
        v = a.numpy()
        if not np.isfinite(v).all():
            return f"non-finite values in {k}"
        if np.abs(v).max(initial=0.0) > max_abs:
            return f"values out of range in {k}"
        if k == ITEM_HOLDERS and ((v < 0) | (v > 1)).any():
            return f"item holder shares outside [0, 1] in {k}"
    return ""
