"""The unmask stage asks a covering subset of the survivors (privacy/secagg/unmask_cover.py, ServerSession)."""

from __future__ import annotations

import random

import pytest

from privacy.secagg.unmask_cover import unmask_cover


@pytest.mark.parametrize(
    ("n", "neighbours", "dropped"), [(10, 0, set()), (10, 0, {4}), (50, 12, {7, 30}), (30, 10, set())]
)
@pytest.mark.parametrize("spare", [0, 1, 3])
def test_unmask_cover_holds_t_plus_spare_shares_of_every_secret(
    masked_session_factory, n: int, neighbours: int, dropped: set[int], spare: int
) -> None:
    server = masked_session_factory(n, neighbours, 0.5, dropped)
    t = server.threshold
    order = sorted(server.u3)
    random.Random(n + spare).shuffle(order)

    cover = server.unmask_cover(spare, order)

    assert len(set(cover)) == len(cover) and set(cover) <= server.u3
    secrets = server.secrets_to_rebuild()
    assert {kind for kind, _ in secrets} == ({"b", "sk"} if dropped else {"b"})
    for holders in secrets.values():
        assert len(holders & set(cover)) >= min(t + spare, len(holders))
    if neighbours == 0:  # complete graph: every survivor holds a share of every secret
        assert len(cover) == min(t + spare, len(server.u3))
    else:
        assert len(cover) < len(server.u3)  # the point of it: not every survivor is asked


def test_can_rebuild_needs_t_valid_shares_of_every_secret(masked_session_factory) -> None:
    server = masked_session_factory(6, 0, 3, {6})
    assert not server.can_rebuild({})
    with pytest.raises(ValueError, match="every node of U3"):
        server.unmask_cover(0, [1, 2])


def test_the_cover_is_a_greedy_multicover_that_breaks_ties_by_order() -> None:
    # secret "a" is held by 1, 2, 3; "b" by 3, 4; "c" by 4 only: 3 and 4 cover each secret once
    holders = {"a": {1, 2, 3}, "b": {3, 4}, "c": {4}}

    assert unmask_cover(holders, {1, 2, 3, 4}, threshold=1) == [3, 4]
    assert unmask_cover(holders, {1, 2, 3, 4}, threshold=1, order=[4, 3, 2, 1]) == [4, 3]
    # two shares each where there are two holders; "c" has one holder and gets it
    assert sorted(unmask_cover(holders, {1, 2, 3, 4}, threshold=2)) == [1, 3, 4]
    with pytest.raises(ValueError, match="spare must be >= 0"):
        unmask_cover(holders, {1, 2, 3, 4}, threshold=1, spare=-1)
    with pytest.raises(ValueError, match="every node of U3 once"):
        unmask_cover(holders, {1, 2, 3, 4}, threshold=1, order=[1, 2, 3, 3])
