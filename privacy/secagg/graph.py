"""Who holds whose shares and how many must answer: the neighbour graph, the threshold, the abort.

Security and liveness both rest on the threshold ``t``: the coordinator learns a node's
secrets only from ``t`` of their holders (so fewer than ``t`` colluding holders learn
nothing), and a session completes only while ``t`` holders of every needed secret answer.
When that fails the session aborts with :class:`SecAggAbort` and the model stays unchanged.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Sequence

__all__ = ["SecAggAbort", "resolve_threshold", "active_threshold", "minimum_degree", "neighbour_graph"]


class SecAggAbort(RuntimeError):
    """The session cannot complete; ``reason`` says why (the model must stay unchanged)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def resolve_threshold(spec: int | float, share_count: int) -> int:
    """The reconstruction threshold ``t`` for secrets shared among ``share_count`` holders.

    A float in ``(0, 1]`` is a fraction of the holders (at least 2); an int is a count.

    Raises
    ------
    SecAggAbort
        If ``t`` exceeds the number of holders or fewer than 2 holders exist.
    """
    if share_count < 2:
        raise SecAggAbort(f"secure aggregation needs at least 2 nodes, got {share_count}")
    t = max(2, math.ceil(spec * share_count - 1e-9)) if isinstance(spec, float) else int(spec)
    if t > share_count:
        raise SecAggAbort(f"threshold {t} exceeds the {share_count} holders of each secret")
    return t


def active_threshold(members: int) -> int:
    """The least threshold a node accepts in the active mode: ``floor(2n / 3) + 1`` for ``n`` roster members.

    Assumption: fewer than ``n / 3`` members collude with the coordinator. Then two sets of
    ``t`` signers among the ``n`` members share more than ``n / 3`` members, so at least one
    honest one, who signs one survivor set only: no two survivor sets both get ``t`` signatures
    (the partition attack), and the ``c < n / 3`` colluders hold fewer than ``t`` shares of
    anything. The argument is written out in docs/secagg.md.
    """
    if members < 2:
        raise ValueError(f"a roster has at least 2 members, got {members}")
    return 2 * members // 3 + 1


def minimum_degree(members: int) -> int:
    """The fewest neighbours a node accepts in the active mode: ``active_threshold(n) - 1``.

    Every neighbourhood must hold ``t`` shares, so any two neighbourhoods (``> 2n/3`` members
    each) share more than ``n / 3`` members: the surviving honest nodes stay connected, and no
    sum over a small component can be unmasked. Bell et al.'s logarithmic degree assumes a graph
    the adversary cannot choose; here the coordinator draws the graph, so the node asks for more.
    For ``n <= 4`` this is the complete graph; at ``n = 50`` it is 33 neighbours.
    """
    return active_threshold(members) - 1


def neighbour_graph(indices: Sequence[int], k: int, rng: random.Random | None = None) -> dict[int, tuple[int, ...]]:
    """SecAgg+ communication graph: a Harary graph H(k, n) over a random permutation.

    Every node is joined to the ``k / 2`` nodes on each side of it in a random ring, so each
    has exactly ``min(k, n - 1)`` neighbours. ``k = 0`` or ``k >= n - 1`` gives the complete
    graph (plain SecAgg). ``k`` must be even.
    """
    if k < 0 or k % 2:
        raise ValueError(f"neighbours must be 0 or an even number >= 2, got {k}")
    nodes = list(indices)
    n = len(nodes)
    if k == 0 or k >= n - 1:
        return {u: tuple(v for v in nodes if v != u) for u in nodes}
    order = nodes[:]
    (rng or secrets.SystemRandom()).shuffle(order)
    graph: dict[int, tuple[int, ...]] = {}
    for p, u in enumerate(order):
        graph[u] = tuple(sorted(order[(p + o) % n] for o in range(-k // 2, k // 2 + 1) if o != 0))
    return graph
