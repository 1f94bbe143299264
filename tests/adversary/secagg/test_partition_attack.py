"""The partition attack (issue 14) with fedmart's own NodeSession and ServerSession, n = 4 ... 12.

A coordinator tells one half of the nodes that the other half dropped, and the other half the
reverse, then combines one half's self-mask shares with the other half's mask-key shares. In
the semi-honest mode (with a threshold of 2, which semi-honest nodes accept) that recovers
every input. In the active mode it recovers none: a threshold below floor(2n/3) + 1 is refused
before anything is shared (tests/adversary/secagg/test_refusals.py), and with the threshold the
nodes demand at most one half can gather t signatures on "its" survivor set; the other half
refuses to reveal anything.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg.graph import active_threshold

SIZES = range(4, 13)


@pytest.mark.parametrize("n", SIZES)
def test_semi_honest_nodes_lose_every_input_to_the_partition_attack(attack, n: int) -> None:
    fed = attack.federation(n, "semi-honest", seed=n)
    server = attack.honest_until_masked(fed, threshold=2)

    recovered, _ = attack.partition_attack(fed, server, random.Random(n))

    assert set(recovered) == set(fed.inputs)
    for u, x in recovered.items():
        assert np.array_equal(x, fed.inputs[u])


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from(list(SIZES)), seed=st.integers(0, 2**32 - 1))
def test_active_nodes_lose_no_input_to_the_partition_attack(attack, n: int, seed: int) -> None:
    fed = attack.federation(n, "active", seed=seed % 1000)
    server = attack.honest_until_masked(fed, threshold=0.5)  # the nodes demand floor(2n/3) + 1

    recovered, halves = attack.partition_attack(fed, server, random.Random(seed))

    assert server.threshold == active_threshold(n)
    assert recovered == {}
    short = [h for h in halves if len(h) < server.threshold]
    assert short, "two halves of n cannot both reach t > 2n/3"
    for u in short[0]:  # the half that cannot be certified reveals nothing, and says why
        reasons = " | ".join(fed.refusals[u])
        assert "survivor set leaves" in reasons and "reveals shares only for a survivor set it signed" in reasons
