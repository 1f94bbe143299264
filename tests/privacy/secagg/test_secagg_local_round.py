"""A whole SecAgg+ session in memory (privacy/secagg/local_round.py): exact sums, dropouts at every stage, aborts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg.encoding import EncodingParams, decode, encode
from privacy.secagg.graph import SecAggAbort, resolve_threshold
from privacy.secagg.local_round import run_round_locally

STAGES = ["advertise", "share-keys", "masked-input", "unmask"]
PARAMS = EncodingParams(clip_range=0.5, bits=16, max_weight=1000, max_nodes=50)


def _updates(n: int, d: int, seed: int = 0) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    rng = np.random.default_rng(seed)
    deltas = {u: rng.normal(0, 0.1, size=d) for u in range(1, n + 1)}
    weights = {u: int(rng.integers(1, 1000)) for u in range(1, n + 1)}
    return deltas, weights


def _plain_mean(deltas: dict[int, np.ndarray], weights: dict[int, int], members: frozenset[int]) -> np.ndarray:
    c = PARAMS.clip_range
    total = sum(weights[u] for u in members)
    return sum(weights[u] * np.clip(deltas[u], -c, c) for u in members) / total


def _secure_mean(n: int, d: int, **kwargs) -> tuple[np.ndarray, np.ndarray, frozenset[int]]:
    deltas, weights = _updates(n, d)
    inputs = {u: encode(deltas[u], weights[u], PARAMS) for u in deltas}
    total, members = run_round_locally(inputs, **kwargs)
    mean, _ = decode(total, PARAMS)
    return mean, _plain_mean(deltas, weights, members), members


@pytest.mark.parametrize(("n", "neighbours"), [(2, 0), (3, 0), (7, 0), (10, 4), (25, 0), (50, 0), (50, 8)])
def test_weighted_mean_within_the_bound_without_dropout(n: int, neighbours: int) -> None:
    mean, plain, members = _secure_mean(n, 300, threshold=0.5, neighbours=neighbours)

    assert members == frozenset(range(1, n + 1))
    assert np.max(np.abs(mean - plain)) <= PARAMS.error_bound


@pytest.mark.parametrize("stage", STAGES)
def test_one_dropout_at_each_stage(stage: str) -> None:
    mean, plain, members = _secure_mean(8, 200, threshold=0.5, drop={stage: [3]})

    if stage in ("advertise", "share-keys", "masked-input"):
        assert 3 not in members  # dropped before its masked input: excluded from the sum
    else:
        assert 3 in members  # dropped after it: recovered from its neighbours' shares
    assert len(members) == 7 + (stage == "unmask")
    assert np.max(np.abs(mean - plain)) <= PARAMS.error_bound


def test_dropouts_at_every_stage_up_to_the_threshold() -> None:
    # 12 nodes, t = 4: two drop at each of the four stages, exactly t answer the unmask stage
    drop = {"advertise": [1, 2], "share-keys": [3, 4], "masked-input": [5, 6], "unmask": [7, 8]}

    mean, plain, members = _secure_mean(12, 200, threshold=4, drop=drop)

    assert members == frozenset({7, 8, 9, 10, 11, 12})
    assert np.max(np.abs(mean - plain)) <= PARAMS.error_bound
    with pytest.raises(SecAggAbort, match="below the threshold of 4"):
        _secure_mean(12, 200, threshold=4, drop=drop | {"unmask": [7, 8, 9]})


def test_sparse_graph_with_dropouts() -> None:
    # 30 nodes, k = 10, t = 4 of 11 holders: tolerant of a few dropouts in any neighbourhood
    drop = {"share-keys": [1], "masked-input": [2, 3], "unmask": [4, 5]}

    mean, plain, members = _secure_mean(30, 100, threshold=4, neighbours=10, drop=drop)

    assert members == frozenset(range(4, 31))
    assert np.max(np.abs(mean - plain)) <= PARAMS.error_bound


# --- the unmask stage's two waves ------------------------------------------------------------
def test_a_cover_of_silent_nodes_is_completed_by_a_second_wave(masked_session_factory) -> None:
    # 12 nodes, t = 4, spare 1: the first wave asks 5; three of them stay silent
    transcript: list = []
    cover = masked_session_factory(12, 0, 4, set()).unmask_cover(1)
    assert cover == [1, 2, 3, 4, 5]
    mean, plain, members = _secure_mean(
        12, 200, threshold=4, spare=1, drop={"unmask": [1, 2, 3]}, transcript=transcript
    )

    assert len(members) == 12 and np.max(np.abs(mean - plain)) <= PARAMS.error_bound
    answered = [u for stage, u, _ in transcript if stage == "unmask"]
    assert answered == [4, 5, 6, 7, 8, 9, 10, 11, 12]  # second wave: everyone not asked before


def test_without_silent_nodes_only_the_cover_answers() -> None:
    transcript: list = []
    mean, plain, members = _secure_mean(
        12, 200, threshold=4, spare=1, drop={"masked-input": [6]}, transcript=transcript
    )

    assert 6 not in members and np.max(np.abs(mean - plain)) <= PARAMS.error_bound
    assert len([u for stage, u, _ in transcript if stage == "unmask"]) == 5  # t + spare of 11 survivors


# --- aborts and the exact sum ----------------------------------------------------------------
@pytest.mark.parametrize("stage", ["share-keys", "masked-input", "unmask"])
def test_fewer_survivors_than_the_threshold_abort(stage: str) -> None:
    inputs = {u: np.arange(5, dtype=np.uint32) for u in range(1, 7)}  # t = 4 of 6

    with pytest.raises(SecAggAbort, match="below the threshold of 4"):
        run_round_locally(inputs, threshold=4, drop={stage: [1, 2, 3]})


def test_too_few_nodes_for_the_threshold_abort_at_once() -> None:
    inputs = {u: np.zeros(3, np.uint32) for u in range(1, 5)}

    with pytest.raises(SecAggAbort, match="exceeds"):
        run_round_locally(inputs, threshold=4, drop={"advertise": [1]})
    with pytest.raises(SecAggAbort, match="at least 2 nodes"):
        run_round_locally({1: np.zeros(3, np.uint32)}, threshold=0.5)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 8),
    d=st.integers(1, 40),
    dtype=st.sampled_from([np.uint32, np.uint64]),
    data=st.data(),
)
def test_unmasked_sum_equals_plain_sum(n: int, d: int, dtype: type, data: st.DataObject) -> None:
    bits = np.dtype(dtype).itemsize * 8
    rows = data.draw(st.lists(st.lists(st.integers(0, 2**bits - 1), min_size=d, max_size=d), min_size=n, max_size=n))
    inputs = {u: np.array(r, dtype=dtype) for u, r in enumerate(rows, start=1)}
    t = resolve_threshold(0.5, n)
    late = data.draw(st.lists(st.sampled_from(sorted(inputs)), max_size=n - t, unique=True))

    total, members = run_round_locally(inputs, threshold=0.5, drop={"masked-input": late})

    expected = [sum(int(inputs[u][i]) for u in members) % 2**bits for i in range(d)]
    assert members == frozenset(inputs) - set(late)
    assert total.tolist() == expected
