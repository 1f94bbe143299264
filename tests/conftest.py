"""Shared fixtures: a tiny catalog and interactions anyone can reason about by hand."""

from __future__ import annotations

import numpy as np
import pytest

from federation.catalog import Catalog


@pytest.fixture
def tiny_catalog() -> Catalog:
    n = 6
    return Catalog(
        item_id=np.array([f"i{i}" for i in range(1, n + 1)]),
        title=np.array(["Red Kettle", "Blue Kettle", "Green Tea", "Black Tea", "Steel Pan", "Iron Pan"]),
        department=np.array(["Kitchen", "Kitchen", "Grocery", "Grocery", "Kitchen", "Kitchen"]),
        merchant=np.array(["m1", "m2", "m1", "m2", "m1", "m2"]),
        price=np.array([10.0, 12.0, 3.0, 4.0, 20.0, 25.0]),
    )
