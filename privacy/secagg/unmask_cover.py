"""Which survivors the unmask stage asks first: a greedy set multicover of the secrets to rebuild.

Rebuilding needs only ``t`` shares of each secret, so the unmask stage need not ask every
survivor: with the complete graph any ``t + spare`` of them will do. Asking fewer nodes
reveals fewer shares (each secret is still rebuilt only from ``t`` of its holders, so the
guarantee is unchanged) and lets the stage finish without waiting for stragglers; the
``spare`` holders absorb nodes that drop during the stage without a second wave.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence

__all__ = ["unmask_cover"]


def unmask_cover(
    holders: Mapping[Hashable, Collection[int]],
    survivors: Collection[int],
    *,
    threshold: int,
    spare: int = 0,
    order: Sequence[int] | None = None,
) -> list[int]:
    """Nodes of ``survivors`` (U3) to ask first: together they hold ``threshold + spare`` shares of every secret.

    ``holders`` maps each secret to the survivors holding a share of it
    (:meth:`privacy.secagg.server_session.ServerSession.secrets_to_rebuild`). Greedy: repeatedly
    take the node that holds shares of the most secrets still short (ties go to the earlier
    node in ``order``, default ascending). A secret with fewer holders than
    ``threshold + spare`` gets all of them.

    Raises
    ------
    ValueError
        ``spare < 0``, or ``order`` does not list every survivor exactly once.
    """
    if spare < 0:
        raise ValueError(f"spare must be >= 0, got {spare}")
    need = {s: min(threshold + spare, len(h)) for s, h in holders.items()}
    held_by: dict[int, list[Hashable]] = {u: [] for u in survivors}
    for s, hs in holders.items():
        for h in hs:
            held_by[h].append(s)
    candidates = list(order) if order is not None else sorted(survivors)
    if set(candidates) != set(survivors) or len(candidates) != len(survivors):
        raise ValueError("order must list every node of U3 once")
    chosen: list[int] = []
    while candidates and any(n > 0 for n in need.values()):
        gain, best = max((sum(need[s] > 0 for s in held_by[h]), -i) for i, h in enumerate(candidates))
        if gain == 0:
            break
        h = candidates[-best]
        chosen.append(h)
        candidates.remove(h)
        for s in held_by[h]:
            need[s] -= 1
    return chosen
