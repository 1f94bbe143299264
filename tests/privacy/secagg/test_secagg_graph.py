"""The neighbour graph and the threshold (privacy/secagg/graph.py)."""

from __future__ import annotations

import random

import pytest

from privacy.secagg.graph import SecAggAbort, neighbour_graph, resolve_threshold


def test_harary_graph_is_k_regular_and_symmetric() -> None:
    g = neighbour_graph(list(range(1, 21)), 6, random.Random(1))

    assert all(len(v) == 6 for v in g.values())
    assert all(u in g[v] for u in g for v in g[u])
    assert neighbour_graph([1, 2, 3], 6) == {1: (2, 3), 2: (1, 3), 3: (1, 2)}
    with pytest.raises(ValueError, match="even"):
        neighbour_graph([1, 2, 3], 3)


def test_threshold_resolution() -> None:
    assert resolve_threshold(0.5, 10) == 5
    assert resolve_threshold(0.51, 10) == 6
    assert resolve_threshold(0.01, 10) == 2  # never below 2
    assert resolve_threshold(3, 10) == 3
    with pytest.raises(SecAggAbort):
        resolve_threshold(11, 10)
