"""The active-adversary mode's honest path (privacy/secagg/local_round.py, active): exact sums for 2-50 nodes,
dropouts at every stage up to what the mode tolerates, and an abort one dropout beyond it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg.encoding import EncodingParams, decode, encode
from privacy.secagg.graph import SecAggAbort, active_threshold
from privacy.secagg.local_round import run_round_locally
from privacy.secagg.node_session import NodeSession

PARAMS = EncodingParams(clip_range=0.5, bits=16, max_weight=1000, max_nodes=50)
STAGES = ["advertise", "share-keys", "masked-input", "unmask"]


def _inputs(n: int, d: int = 50, seed: int = 0) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, int]]:
    rng = np.random.default_rng(seed)
    deltas = {u: rng.normal(0, 0.1, size=d) for u in range(1, n + 1)}
    weights = {u: int(rng.integers(1, 1000)) for u in range(1, n + 1)}
    return {u: encode(deltas[u], weights[u], PARAMS) for u in deltas}, deltas, weights


def _check(total: np.ndarray, members: frozenset[int], deltas, weights) -> None:
    mean, _ = decode(total, PARAMS)
    w = sum(weights[u] for u in members)
    plain = sum(weights[u] * np.clip(deltas[u], -0.5, 0.5) for u in members) / w
    assert np.max(np.abs(mean - plain)) <= PARAMS.error_bound


def tolerated(n: int) -> int:
    """Dropouts the active mode tolerates in a complete graph of n roster members: n - floor(2n/3) - 1."""
    return n - active_threshold(n)


def test_the_dropouts_each_n_tolerates() -> None:
    assert [tolerated(n) for n in (2, 3, 4, 5, 6, 9, 12, 50)] == [0, 0, 1, 1, 1, 2, 3, 16]


@pytest.mark.parametrize(("n", "neighbours"), [(2, 0), (3, 0), (4, 0), (7, 0), (12, 0), (25, 0), (50, 0), (50, 8)])
def test_weighted_mean_within_the_bound_without_dropout(n: int, neighbours: int) -> None:
    inputs, deltas, weights = _inputs(n)

    total, members = run_round_locally(inputs, threshold=0.5, neighbours=neighbours, adversary="active", spare=1)

    assert members == frozenset(inputs)
    _check(total, members, deltas, weights)


@pytest.mark.parametrize("stage", [*STAGES, "consistency"])
def test_one_dropout_at_each_stage(stage: str) -> None:
    inputs, deltas, weights = _inputs(8)  # t = 6: two dropouts tolerated
    drop = {stage: [3]} if stage != "consistency" else {"masked-input": [2], "consistency": [3]}

    total, members = run_round_locally(inputs, threshold=0.5, adversary="active", drop=drop, spare=1)

    assert (3 in members) == (stage in ("unmask", "consistency"))
    _check(total, members, deltas, weights)


@pytest.mark.parametrize("n", [4, 6, 9, 12, 25])
def test_as_many_dropouts_as_tolerated_at_mixed_stages_and_one_more_aborts(n: int) -> None:
    inputs, deltas, weights = _inputs(n, seed=n)
    k = tolerated(n)
    order = list(inputs)
    drop = {s: order[i : k : len(STAGES)] for i, s in enumerate(STAGES)}

    total, members = run_round_locally(inputs, threshold=0.5, adversary="active", drop=drop, spare=1)
    _check(total, members, deltas, weights)

    with pytest.raises(SecAggAbort, match="below the threshold"):
        run_round_locally(inputs, threshold=0.5, adversary="active", drop={"masked-input": order[: k + 1]})


@pytest.mark.parametrize("n", [2, 3])
def test_two_or_three_nodes_tolerate_no_dropout(n: int) -> None:
    inputs, _, _ = _inputs(n)

    with pytest.raises(SecAggAbort, match="below the threshold"):
        run_round_locally(inputs, threshold=0.5, adversary="active", drop={"masked-input": [1]})


def test_without_a_masked_input_dropout_there_is_no_consistency_stage() -> None:
    inputs, _, _ = _inputs(6)
    transcript: list = []

    run_round_locally(inputs, threshold=0.5, adversary="active", drop={"unmask": [2]}, transcript=transcript, spare=1)
    stages = {s for s, _, _ in transcript}
    run_round_locally(inputs, threshold=0.5, adversary="active", drop={"masked-input": [2]}, transcript=transcript)

    assert "consistency" not in stages
    assert "consistency" in {s for s, _, _ in transcript}


def test_an_active_session_survives_serialisation_after_sharing_keys(monkeypatch) -> None:
    # what ctxt.state does between messages: every NodeSession is written and read back after share-keys
    original = NodeSession.share_keys.__func__

    def reloading(cls, *args, **kwargs):
        node, reply = original(cls, *args, **kwargs)
        return cls.from_dict(node.to_dict()), reply

    monkeypatch.setattr(NodeSession, "share_keys", classmethod(reloading))
    inputs, deltas, weights = _inputs(5)

    total, members = run_round_locally(inputs, threshold=0.5, adversary="active", drop={"masked-input": [4]})

    _check(total, members, deltas, weights)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 9), data=st.data())
def test_unmasked_sum_equals_plain_sum(n: int, data: st.DataObject) -> None:
    rows = data.draw(st.lists(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4), min_size=n, max_size=n))
    inputs = {u: np.array(r, dtype=np.uint32) for u, r in enumerate(rows, start=1)}
    late = data.draw(st.lists(st.sampled_from(sorted(inputs)), max_size=tolerated(n), unique=True))

    total, members = run_round_locally(inputs, threshold=0.5, adversary="active", drop={"masked-input": late})

    assert members == frozenset(inputs) - set(late)
    assert total.tolist() == [sum(int(inputs[u][i]) for u in members) % 2**32 for i in range(4)]
