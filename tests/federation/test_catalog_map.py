"""Mapping item rows between catalogs (federation/catalog_map.py): by item_id, added, removed, reordered."""

from __future__ import annotations

import numpy as np
import pytest

from federation.catalog import Catalog
from federation.catalog_map import align, item_keys, map_item_rows, rows_from, zero_rows


def _catalog(ids: list[str]) -> Catalog:
    n = len(ids)
    return Catalog(
        item_id=np.array(ids),
        title=np.array([f"title {i}" for i in ids]),
        department=np.array(["d"] * n),
        merchant=np.array(["m"] * n),
        price=np.ones(n),
    )


def _state(n_items: int) -> dict[str, np.ndarray]:
    """A toy state dict: item rows whose values name their old index (row i holds i), and a shared matrix."""
    rows = np.arange(n_items + 1, dtype=np.float32)
    return {
        "item_emb.weight": np.repeat(rows[:, None], 3, axis=1),  # (n + 1, 3)
        "head.bias": rows.copy(),  # (n + 1,)
        "encoder.w": np.full((2, 2), 7.0, dtype=np.float32),  # not item-indexed
    }


OLD = _catalog(["a", "b", "c", "d"])  # indices a=1, b=2, c=3, d=4


def test_items_in_both_keep_their_rows_new_ones_get_init_rows_removed_ones_are_dropped():
    new = _catalog(["d", "x", "b", "y"])  # reordered, c and a removed, x and y added

    out = map_item_rows(_state(4), OLD, new, item_keys(_state(4)))

    assert out["head.bias"].tolist() == [0.0, 4.0, 0.0, 2.0, 0.0]  # padding, d, x (new), b, y (new)
    assert out["item_emb.weight"][:, 0].tolist() == [0.0, 4.0, 0.0, 2.0, 0.0]
    assert out["item_emb.weight"].shape == (5, 3)
    assert out["encoder.w"].tolist() == [[7.0, 7.0], [7.0, 7.0]]  # shared weights untouched


def test_alignment_names_the_added_and_removed_items():
    a = align(OLD, _catalog(["d", "x", "b", "y"]))

    assert a.source.tolist() == [0, 4, 0, 2, 0]
    assert a.added.tolist() == [2, 4]  # x, y in the new catalog
    assert a.removed.tolist() == [1, 3]  # a, c in the old catalog
    assert a.summary() == {"items": 4, "added": 2, "removed": 2}
    assert not a.identity and align(OLD, OLD).identity


def test_new_rows_come_from_init_row_per_parameter():
    new = _catalog(["a", "z"])
    fresh = {"item_emb.weight": np.full((3, 3), 9.0, np.float32), "head.bias": np.array([0.0, 5.0, 6.0], np.float32)}

    out = map_item_rows(_state(4), OLD, new, ["item_emb.weight", "head.bias"], init_row=rows_from(fresh))

    assert out["head.bias"].tolist() == [0.0, 1.0, 6.0]
    assert out["item_emb.weight"][2].tolist() == [9.0, 9.0, 9.0]
    assert zero_rows("head.bias", np.array([2]), _state(4)["head.bias"]).tolist() == [0.0]


def test_only_the_keys_given_are_mapped():
    new = _catalog(["b"])

    out = map_item_rows(_state(4), OLD, new, ["head.bias"])

    assert out["head.bias"].tolist() == [0.0, 2.0]
    assert out["item_emb.weight"].shape == (5, 3)  # not in item_keys: left alone


def test_the_same_catalog_maps_to_the_same_rows():
    state = _state(4)

    out = map_item_rows(state, OLD, OLD, item_keys(state))

    assert all(np.array_equal(out[k], state[k]) for k in state)


def test_weights_of_another_catalog_are_refused():
    with pytest.raises(ValueError, match="has 6 rows, the catalog it was trained on 4 items"):
        map_item_rows(_state(5), OLD, _catalog(["a"]), ["head.bias"])


def test_item_keys_follow_the_wire_list():
    assert item_keys(["encoder.w", "head.bias", "item_emb.weight"]) == ("item_emb.weight", "head.bias")
