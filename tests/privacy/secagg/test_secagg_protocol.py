"""The SecAgg+ core without Flower: exact sums, dropouts at every stage, aborts, refusals."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg.encoding import EncodingParams, decode, encode
from privacy.secagg.protocol import (
    MaskRequest,
    NodeSession,
    SecAggAbort,
    ServerSession,
    UnmaskRequest,
    neighbour_graph,
    new_channel_keypair,
    resolve_threshold,
    run_round_locally,
)

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


# --- unmasking with a covering subset of the survivors ---------------------------------------
def _session_after_masking(n: int, neighbours: int, threshold: int | float, dropped: set[int]) -> ServerSession:
    """A ServerSession at the unmask stage, with ``dropped`` silent at the masked-input stage."""
    channel = {u: new_channel_keypair() for u in range(1, n + 1)}
    server = ServerSession(list(channel), threshold=threshold, neighbours=neighbours)
    nodes, replies = {}, {}
    for u, req in server.share_keys_requests({u: kp[1] for u, kp in channel.items()}).items():
        nodes[u], replies[u] = NodeSession.share_keys(req, channel[u][0])
    server.receive_share_keys(replies)
    masked = {
        u: nodes[u].mask(m, np.zeros(4, np.uint32)) for u, m in server.mask_requests().items() if u not in dropped
    }
    server.receive_masked(masked, 4, np.uint32)
    return server


@pytest.mark.parametrize(
    ("n", "neighbours", "dropped"), [(10, 0, set()), (10, 0, {4}), (50, 12, {7, 30}), (30, 10, set())]
)
@pytest.mark.parametrize("spare", [0, 1, 3])
def test_unmask_cover_holds_t_plus_spare_shares_of_every_secret(
    n: int, neighbours: int, dropped: set[int], spare: int
) -> None:
    server = _session_after_masking(n, neighbours, 0.5, dropped)
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


def test_a_cover_of_silent_nodes_is_completed_by_a_second_wave() -> None:
    # 12 nodes, t = 4, spare 1: the first wave asks 5; three of them stay silent
    transcript: list = []
    cover = _session_after_masking(12, 0, 4, set()).unmask_cover(1)
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


def test_can_rebuild_needs_t_valid_shares_of_every_secret() -> None:
    server = _session_after_masking(6, 0, 3, {6})
    assert not server.can_rebuild({})
    with pytest.raises(ValueError, match="every node of U3"):
        server.unmask_cover(0, [1, 2])


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


# --- graph and threshold ----------------------------------------------------------------------
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


# --- a node refuses what would leak -----------------------------------------------------------
def _two_sessions() -> tuple[ServerSession, dict[int, NodeSession], dict[int, tuple[bytes, bytes]]]:
    keys = {u: new_channel_keypair() for u in (1, 2, 3)}
    server = ServerSession([1, 2, 3], threshold=2, neighbours=0)
    reqs = server.share_keys_requests({u: k[1] for u, k in keys.items()})
    nodes, replies = {}, {}
    for u, r in reqs.items():
        nodes[u], replies[u] = NodeSession.share_keys(r, keys[u][0])
    server.receive_share_keys(replies)
    return server, nodes, keys


def test_node_answers_unmask_once_and_never_both_secrets() -> None:
    server, nodes, _ = _two_sessions()
    reqs = server.mask_requests()
    for u, node in nodes.items():
        node.mask(reqs[u], np.zeros(4, np.uint32))
    s = server.session

    with pytest.raises(ValueError, match="both a survivor and dropped"):
        nodes[1].unmask(UnmaskRequest(s, survivors=[2, 3], dropped=[2]))
    nodes[1].unmask(UnmaskRequest(s, survivors=[2], dropped=[3]))
    with pytest.raises(ValueError, match="out of order"):
        nodes[1].unmask(UnmaskRequest(s, survivors=[2, 3], dropped=[]))


def test_node_rejects_other_sessions_out_of_order_stages_and_strangers() -> None:
    server, nodes, _ = _two_sessions()
    reqs = server.mask_requests()
    other = MaskRequest(b"\x00" * 16, reqs[1].neighbour_s_pks, reqs[1].ciphertexts)

    with pytest.raises(ValueError, match="another secure-aggregation session"):
        nodes[1].mask(other, np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match="out of order"):
        nodes[1].unmask(UnmaskRequest(server.session, survivors=[2, 3], dropped=[]))
    stranger = MaskRequest(server.session, {9: b"k" * 32}, {9: b"c" * 40})
    with pytest.raises(ValueError, match="not this node's neighbours"):
        nodes[1].mask(stranger, np.zeros(4, np.uint32))
    swapped = MaskRequest(
        server.session, reqs[1].neighbour_s_pks, {2: reqs[1].ciphertexts[3], 3: reqs[1].ciphertexts[2]}
    )
    with pytest.raises(ValueError, match="authentication"):
        nodes[1].mask(swapped, np.zeros(4, np.uint32))  # AAD binds sender and receiver


def test_node_session_survives_serialisation_between_stages() -> None:
    server, nodes, _ = _two_sessions()
    mask_reqs = server.mask_requests()

    def reload(node: NodeSession) -> NodeSession:  # what ctxt.state does between messages
        return NodeSession.from_dict(node.to_dict())

    nodes = {u: reload(n) for u, n in nodes.items()}
    masked = {u: nodes[u].mask(mask_reqs[u], np.full(6, u, np.uint32)) for u in nodes}
    nodes = {u: reload(n) for u, n in nodes.items()}
    server.receive_masked(masked, 6, np.uint32)
    total = server.receive_unmask({u: nodes[u].unmask(r) for u, r in server.unmask_requests().items()})

    assert total.tolist() == [1 + 2 + 3] * 6


def test_corrupted_share_is_detected_by_the_commitment() -> None:
    server, nodes, _ = _two_sessions()
    reqs = server.mask_requests()
    masked = {u: nodes[u].mask(reqs[u], np.ones(3, np.uint32)) for u in nodes}
    server.receive_masked(masked, 3, np.uint32)
    replies = {u: nodes[u].unmask(r) for u, r in server.unmask_requests().items()}
    bad = dict(replies[1].b_shares)
    bad[2] = bad[2][:-1] + bytes([bad[2][-1] ^ 1])
    replies = {2: replies[2], 1: type(replies[1])(b_shares=bad, sk_shares=replies[1].sk_shares)}

    with pytest.raises(SecAggAbort, match="commitment|rebuild"):
        server.receive_unmask(replies)
