"""The synthetic generator: seeded, columnar, valid against its own catalog, with sequential signal."""

from __future__ import annotations

import numpy as np
import pytest

from clients.sequences import build_sequences
from clients.synthetic import generate
from conf.settings import SyntheticSettings

CFG = SyntheticSettings(num_users=800, num_items=300, num_departments=5, num_merchants=20, seed=7)


@pytest.fixture(scope="module")
def world():
    return generate(CFG)


def test_same_seed_same_data(world):
    catalog, inter = world
    catalog2, inter2 = generate(CFG)
    assert catalog.version == catalog2.version
    assert np.array_equal(inter.item, inter2.item) and np.array_equal(inter.timestamp, inter2.timestamp)
    _, other = generate(SyntheticSettings(num_users=800, num_items=300, num_departments=5, num_merchants=20, seed=8))
    assert not np.array_equal(inter.item[:500], other.item[:500])


def test_columnar_and_valid(world):
    catalog, inter = world
    for col in (inter.user, inter.item, inter.timestamp):
        assert isinstance(col, np.ndarray) and col.dtype == np.int64
    assert inter.item.min() >= 1 and inter.item.max() <= catalog.num_items
    assert np.bincount(inter.user).min() >= 3
    assert len(np.unique(catalog.department)) == 5
    assert len(np.unique(catalog.merchant)) <= 20


def test_histories_are_chronological_and_follow_sessions(world):
    catalog, inter = world
    seqs = build_sequences(inter)
    ts_sorted = inter.timestamp[np.lexsort((inter.timestamp, inter.user))]
    for u in range(20):
        lo, hi = seqs.offsets[u], seqs.offsets[u + 1]
        assert np.all(np.diff(ts_sorted[lo:hi]) > 0)
    # Sequential signal: consecutive items share a department far more often than chance.
    dept = np.concatenate([[""], catalog.department])
    same = np.mean([np.mean(dept[s[1:]] == dept[s[:-1]]) for s in (seqs.of(u) for u in range(200))])
    assert same > 0.6


def test_bad_config():
    with pytest.raises(ValueError, match="events_per_user"):
        SyntheticSettings(events_per_user=2)
