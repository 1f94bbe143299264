"""Shared fixtures: a tiny catalog anyone can reason about by hand, and the smallest simulated federation."""

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


# Hydra overrides (also valid `flwr run --run-config` pairs) for the smallest federation the
# end-to-end tests run: 3 department nodes, 600 users, a 16-wide one-head model, no central eval.
SMALL_FEDERATION = (
    "data.synthetic.num_users=600",
    "data.synthetic.num_items=150",
    "data.synthetic.num_departments=3",
    "data.synthetic.num_merchants=6",
    "data.max_len=20",
    "model.hidden=16",
    "model.heads=1",
    "federation.central_eval_users=0",
)


@pytest.fixture(scope="session")
def small_federation() -> tuple[str, ...]:
    """:data:`SMALL_FEDERATION`, for tests that cannot import this module (``--import-mode=importlib``)."""
    return SMALL_FEDERATION
