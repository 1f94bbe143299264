"""The coordinator's stage records (privacy/secagg/stage_records.py) against the node's mod, and the
push-and-poll of one stage (privacy/secagg/stage_exchange.py)."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message
from flwr.clientapp import ClientApp

from privacy.secagg import secagg_mod, wire
from privacy.secagg.server_session import ServerSession
from privacy.secagg.stage_exchange import exchange_stage
from privacy.secagg.stage_records import parse_share_keys_reply, parse_unmask_reply, share_keys_record


def _app() -> ClientApp:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context) -> Message:  # never reached by a stage message
        raise AssertionError("a stage message reached the train handler")

    return app


def test_share_keys_records_round_trip_through_the_node_mod(grid_factory: type) -> None:
    grid = grid_factory(_app(), 3)
    ids = grid.node_ids
    advertised = exchange_stage(grid, {n: {wire.RECORD: {wire.STAGE: wire.ADVERTISE}} for n in ids}, 1, timeout=1.0)
    channel = {n: advertised[n][wire.RECORD][wire.CHANNEL_PK] for n in ids}
    session = ServerSession([1, 2, 3], threshold=2, neighbours=0)
    requests = session.share_keys_requests({i + 1: channel[n] for i, n in enumerate(ids)})
    payloads = {
        n: {wire.RECORD: share_keys_record(requests[i + 1], server_round=1, channel_pk=channel[n])}
        for i, n in enumerate(ids)
    }

    answers = exchange_stage(grid, payloads, 1, timeout=1.0)
    replies = {i + 1: parse_share_keys_reply(answers[n][wire.RECORD]) for i, n in enumerate(ids)}

    assert set(replies[1].ciphertexts) == {2, 3} and len(replies[1].s_pk) == 32
    assert session.receive_share_keys(replies) == frozenset({1, 2, 3})


def test_a_malformed_reply_record_raises_a_parse_error() -> None:
    with pytest.raises(KeyError):
        parse_share_keys_reply(ConfigRecord({wire.STAGE: wire.SHARE_KEYS}))
    bad = ConfigRecord({wire.B_SOURCES: [1, 2], wire.B_SHARES: [b"x"], wire.SK_SOURCES: [], wire.SK_SHARES: []})
    with pytest.raises(ValueError):
        parse_unmask_reply(bad)


def test_an_exchange_leaves_out_errors_and_silent_nodes_and_ends_at_the_timeout(grid_factory: type) -> None:
    grid = grid_factory(_app(), 3, drop=lambda stage, node: node == 103)
    payloads = {
        101: {wire.RECORD: {wire.STAGE: wire.ADVERTISE}},
        102: {wire.RECORD: {wire.STAGE: "no-such-stage"}},  # the mod refuses: an error reply
        103: {wire.RECORD: {wire.STAGE: wire.ADVERTISE}},  # silent
    }
    failed: set[int] = set()
    t0 = time.monotonic()

    answers = exchange_stage(grid, payloads, 1, timeout=0.2, errors_out=failed)

    assert set(answers) == {101} and failed == {102}
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert all(m.metadata.ttl == 0.2 and m.metadata.group_id == "1" for m in grid.sent)


def test_an_exchange_stops_once_done_says_so(grid_factory: type) -> None:
    grid = grid_factory(_app(), 3, drop=lambda stage, node: node == 103)
    payloads = {n: {wire.RECORD: {wire.STAGE: wire.ADVERTISE}} for n in grid.node_ids}
    t0 = time.monotonic()

    answers = exchange_stage(grid, payloads, 1, timeout=5.0, done=lambda got: len(got) >= 2)

    assert set(answers) == {101, 102} and time.monotonic() - t0 < 1.0
