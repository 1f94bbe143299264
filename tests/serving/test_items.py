"""Catalog lookups (serving/items.py): history ids to indices, department masks."""

from __future__ import annotations

import numpy as np
import torch

from serving.items import ItemIndex


def test_resolve_keeps_known_ids_in_order_and_names_each_unknown_id_once(tiny_catalog):
    items = ItemIndex(tiny_catalog, torch.device("cpu"))

    known, unknown = items.resolve(["i2", "x", "i2", "i6", "y", "x"])

    assert known.tolist() == [2, 2, 6] and known.dtype == np.int64
    assert unknown == ["x", "y"]


def test_department_masks_cover_each_item_once_and_never_index_zero(tiny_catalog):
    items = ItemIndex(tiny_catalog, torch.device("cpu"))

    assert sorted(items.departments) == ["Grocery", "Kitchen"]
    assert np.flatnonzero(items.departments["Grocery"]).tolist() == [3, 4]
    total = sum(m.astype(int) for m in items.departments.values())
    assert total.tolist() == [0, 1, 1, 1, 1, 1, 1]
    for d, mask in items.departments.items():
        assert items.outside[d].tolist() == (~mask).tolist()  # outside: everything else, padding included
