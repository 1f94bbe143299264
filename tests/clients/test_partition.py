"""Each silo scheme puts every user's events where they belong and loses none."""

from __future__ import annotations

import numpy as np
import pytest

from clients.interactions import Interactions
from clients.partition import partition
from clients.synthetic import generate
from conf.settings import PartitionSettings, SyntheticSettings


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticSettings(num_users=600, num_items=200, num_departments=4, num_merchants=12, seed=3))


def _check_cover(part, n_rows: int) -> np.ndarray:
    allrows = np.concatenate(part.rows)
    assert len(allrows) == n_rows, "an event was lost or duplicated"
    assert len(np.unique(allrows)) == n_rows
    return allrows


def test_department_silos(world):
    catalog, inter = world
    part = partition(inter, catalog, PartitionSettings(scheme="department"))
    _check_cover(part, len(inter))
    assert sorted(part.names) == sorted(np.unique(catalog.department).tolist())
    for name, rows in zip(part.names, part.rows, strict=True):
        assert (catalog.department[inter.item[rows] - 1] == name).all()


def test_merchant_silos_by_item_merchant(world):
    catalog, inter = world
    part = partition(inter, catalog, PartitionSettings(scheme="merchant"))
    _check_cover(part, len(inter))
    for name, rows in zip(part.names, part.rows, strict=True):
        assert (catalog.merchant[inter.item[rows] - 1] == name).all()


def test_merchant_silos_by_occupation_keep_users_whole(world):
    catalog, inter = world
    occ = np.array(["doctor", "artist", "student"])[np.arange(inter.num_users) % 3]
    inter = Interactions(inter.user, inter.item, inter.timestamp, inter.user_ids, user_attrs={"occupation": occ})
    part = partition(inter, catalog, PartitionSettings(scheme="merchant"))
    _check_cover(part, len(inter))
    assert sorted(part.names) == ["artist", "doctor", "student"]
    for name, rows in zip(part.names, part.rows, strict=True):
        assert (occ[inter.user[rows]] == name).all()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_user_schemes_keep_each_user_whole(world, scheme):
    catalog, inter = world
    part = partition(inter, catalog, PartitionSettings(scheme=scheme, num_partitions=5, alpha=0.3, seed=1))
    _check_cover(part, len(inter))
    owner = {}
    for i, rows in enumerate(part.rows):
        for u in np.unique(inter.user[rows]):
            assert owner.setdefault(int(u), i) == i, "a user was split across nodes"
    assert len(owner) == inter.num_users
    assert len(part) == 5


def test_bad_config():
    with pytest.raises(ValueError, match="num_partitions"):
        PartitionSettings(scheme="iid")
    with pytest.raises(ValueError, match="scheme"):
        PartitionSettings(scheme="country")
