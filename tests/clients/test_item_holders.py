"""Which item rows a node's update speaks for (clients/release.py: item_holders)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from clients.release import item_holders, with_item_holders
from federation import wire


def _node(name: str, train_items: list[int]):
    departments = np.array(["toys", "toys", "books", "garden"])
    catalog = SimpleNamespace(item_id=np.array(["a", "b", "c", "d"]), department=departments)
    split = SimpleNamespace(train=SimpleNamespace(items=np.array(train_items)))
    return SimpleNamespace(name=name, catalog=catalog, split=split)


def test_without_dp_the_holders_are_the_items_in_the_training_data():
    np.testing.assert_array_equal(item_holders(_node("toys", [1, 3, 3]), private=False), [0, 1, 0, 1, 0])


def test_with_dp_the_holders_come_from_the_public_catalog_not_the_data():
    # A department node: its department's items, whatever its data holds (row 0 is padding).
    np.testing.assert_array_equal(item_holders(_node("toys", [3]), private=True), [0, 1, 1, 0, 0])
    # Not named after a department: every row, i.e. plain FedAvg on item rows.
    np.testing.assert_array_equal(item_holders(_node("node-001", [3]), private=True), [1, 1, 1, 1, 1])


@pytest.mark.parametrize("private", [False, True])
def test_rows_outside_the_holder_set_are_reset_to_the_global_rows(private):
    incoming = {k: np.zeros((5, 2), dtype=np.float32) for k in ("item_emb.weight", "head.weight")}
    incoming["head.bias"] = np.zeros(5, dtype=np.float32)
    noisy = {k: v + 0.5 for k, v in incoming.items()}
    out = with_item_holders(noisy, incoming, _node("books", [3]), private=private)
    for key in wire.item_row_keys(incoming):
        assert (out[key][3] == 0.5).all()  # the books item keeps its update
        assert (np.delete(out[key], 3, axis=0) == 0).all()  # the rest is the global model again
    np.testing.assert_array_equal(out[wire.ITEM_HOLDERS], [0, 0, 0, 1, 0])
    assert (noisy["head.bias"] == 0.5).all()  # the caller's arrays are not modified


def test_the_text_towers_residual_and_bias_follow_the_holders_and_its_projection_is_sent_whole():
    incoming = {
        "tower.proj": np.zeros((2, 3), dtype=np.float32),
        "tower.residual": np.zeros((5, 2), dtype=np.float32),
        "tower.bias": np.zeros(5, dtype=np.float32),
        "encoder.w": np.zeros(4, dtype=np.float32),
    }
    trained = {k: v + 0.5 for k, v in incoming.items()}
    out = with_item_holders(trained, incoming, _node("toys", [3]), private=True)
    assert wire.item_row_keys(out) == ("tower.residual", "tower.bias")
    for key in ("tower.residual", "tower.bias"):
        assert (out[key][[1, 2]] == 0.5).all()  # the toys items keep their update
        assert (out[key][[0, 3, 4]] == 0).all()  # padding, books and garden: the global rows
    assert (out["tower.proj"] == 0.5).all() and (out["encoder.w"] == 0.5).all()  # shared: the whole update
    np.testing.assert_array_equal(out[wire.ITEM_HOLDERS], [0, 1, 1, 0, 0])
