"""The update contract (federation/contract.py): one rule, applied by the coordinator and by the node."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from federation import wire
from federation.contract import MAX_ABS, validate_update


def _reference() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.zeros((2, 3), np.float32)),
            wire.ITEM_HOLDERS: Array(np.zeros(4, np.float32)),
        }
    )


def _update(**changes: np.ndarray) -> ArrayRecord:
    arrays = {"w": np.full((2, 3), 0.5, np.float32), wire.ITEM_HOLDERS: np.array([0, 1, 1, 0], np.float32)}
    arrays.update(changes)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def test_a_well_formed_update_is_accepted():
    assert validate_update(_update(), _reference()) == ""


@pytest.mark.parametrize(
    ("update", "why"),
    [
        (ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))}), "wrong parameter names"),
        (_update(w=np.zeros((3, 2), np.float32)), "wrong shape for w"),
        (_update(w=np.zeros((2, 3), np.float64)), "wrong dtype for w"),
        (_update(w=np.array([[0, np.nan, 0], [0, 0, 0]], np.float32)), "non-finite values in w"),
        (_update(w=np.array([[0, np.inf, 0], [0, 0, 0]], np.float32)), "non-finite values in w"),
        (_update(w=np.full((2, 3), 2 * MAX_ABS, np.float32)), "values out of range in w"),
        (_update(**{wire.ITEM_HOLDERS: np.array([0, 1.5, 0, 0], np.float32)}), "item holder shares outside"),
        (_update(**{wire.ITEM_HOLDERS: np.array([0, -0.1, 0, 0], np.float32)}), "item holder shares outside"),
    ],
)
def test_a_malformed_update_is_refused_with_the_reason(update, why):
    assert why in validate_update(update, _reference())


def test_the_range_is_a_parameter():
    assert validate_update(_update(), _reference(), max_abs=0.1) == "values out of range in w"


def test_the_node_guard_and_the_coordinator_apply_the_same_rule():
    from clients import guard
    from federation import coordinator

    assert guard.validate_update is coordinator.validate_update is validate_update
