"""The active-adversary mode through Flower's Message objects: SecAggStrategy + the node mod with its identity.

The nodes run ``make_secagg_mod`` with their own roster identities (in memory here; on disk in
``fedmart simulate`` and ``fedmart node``); the transport is ``conftest.InProcessGrid``. The
honest path in every stage, the consistency exchange only after a masked-input dropout,
pipelining, and the refusals a node makes before it trains.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from privacy.secagg import SecAggConfig, SecAggStrategy, wire
from privacy.secagg.graph import active_threshold
from privacy.secagg.identity import in_memory_identities
from privacy.secagg.mod import make_secagg_mod
from privacy.secagg.seen_sessions import SeenSessions

CFG = SecAggConfig(enabled=True, adversary="active", threshold=0.5, clip_range=0.5, bits=16, timeout=0.2)
SHAPE = (7, 3)


def _step(pid: int) -> np.ndarray:
    return np.random.default_rng(pid).uniform(-0.2, 0.2, size=SHAPE).astype(np.float32)


class Federation:
    """``n`` nodes with their own roster identities, a count of the trainings each did, and a grid."""

    def __init__(self, grid_factory: type, n: int, *, drop=None, state_dir=None) -> None:
        self.ids = in_memory_identities(list(range(n)))
        if state_dir is not None:  # seen sessions on disk, one directory per node
            self.ids = {p: _with_seen(i, SeenSessions(state_dir / str(p))) for p, i in self.ids.items()}
        self.trained: dict[int, int] = dict.fromkeys(range(n), 0)
        app = ClientApp(mods=[make_secagg_mod(lambda ctxt: self.ids[int(ctxt.node_config["partition-id"])])])

        @app.train()
        def train(msg: Message, context) -> Message:
            pid = int(context.node_config["partition-id"])
            self.trained[pid] += 1
            new = {k: Array(v.numpy() + _step(pid)) for k, v in msg.content["arrays"].items()}
            metrics = MetricRecord({"num-examples": 5 + pid})
            return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

        self.grid = grid_factory(app, n, drop=drop)

    def round(self, strategy: SecAggStrategy, server_round: int = 1, arrays: ArrayRecord | None = None):
        arrays = arrays or ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))})
        msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        return strategy.aggregate_train(server_round, self.grid.send_and_receive(msgs))[0]


def _with_seen(identity, seen):
    from dataclasses import replace

    return replace(identity, seen=seen)


def _mean(pids) -> np.ndarray:
    w = {p: 5 + p for p in pids}
    return sum(w[p] * np.clip(_step(p), -0.5, 0.5) for p in pids) / sum(w.values())


def _stages(grid) -> list[str]:
    return [str(m.content[wire.RECORD][wire.STAGE]) for m in grid.sent if wire.RECORD in m.content.config_records]


@pytest.mark.parametrize("n", [2, 4, 12])
def test_the_weighted_mean_in_the_active_mode(grid_factory: type, n: int) -> None:
    fed = Federation(grid_factory, n)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=n), config=CFG)

    arrays = fed.round(strategy)

    assert np.max(np.abs(arrays["w"].numpy() - _mean(range(n)))) <= CFG.encoding.error_bound + 1e-6
    assert strategy.last_report.threshold == active_threshold(n)
    assert wire.CONSISTENCY not in _stages(fed.grid), "no dropout, no consistency exchange"


@pytest.mark.parametrize("stage", [wire.ADVERTISE, wire.SHARE_KEYS, wire.MASKED_INPUT, wire.CONSISTENCY, wire.UNMASK])
def test_one_dropout_at_each_stage(grid_factory: type, stage: str) -> None:
    victim = 103  # partition 2; with 6 members t = 5, one dropout is tolerated
    first = 104 if stage == wire.CONSISTENCY else None  # a consistency stage runs after a masked-input dropout

    def drop(s: str, node: int) -> bool:
        return (node == victim and s == stage) or (node == first and s == wire.MASKED_INPUT)

    fed = Federation(grid_factory, 7 if first else 6, drop=drop)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=len(fed.ids)), config=CFG)

    arrays = fed.round(strategy)

    out = {2} if stage in (wire.ADVERTISE, wire.SHARE_KEYS, wire.MASKED_INPUT) else set()
    out |= {3} if first else set()
    members = [p for p in fed.ids if p not in out]
    assert arrays is not None, strategy.last_abort_reason
    assert np.max(np.abs(arrays["w"].numpy() - _mean(members))) <= CFG.encoding.error_bound + 1e-6
    assert (wire.CONSISTENCY in _stages(fed.grid)) == (stage in (wire.MASKED_INPUT, wire.CONSISTENCY))


def test_two_dropouts_of_six_abort_and_the_model_stays(grid_factory: type) -> None:
    fed = Federation(grid_factory, 6, drop=lambda s, node: node in (102, 105) and s == wire.MASKED_INPUT)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=6), config=CFG)

    assert fed.round(strategy) is None
    assert "below the threshold of 5" in strategy.last_abort_reason


def test_pipelined_rounds_keep_the_active_mode(grid_factory: type) -> None:
    fed = Federation(grid_factory, 4)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG)

    strategy.start(fed.grid, ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))}), num_rounds=3)

    assert strategy.last_report.pipelined and strategy.last_report.masked == 4
    assert all(fed.ids[p].seen._memory for p in fed.ids)  # every node recorded every session it joined
    assert {len(fed.ids[p].seen._memory) for p in fed.ids} == {4}  # rounds 1-3, and round 4's pipelined keys


def test_a_replayed_share_keys_message_is_refused_after_a_node_restart(grid_factory: type, tmp_path) -> None:
    fed = Federation(grid_factory, 4, state_dir=tmp_path)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG, pipeline=False)
    fed.round(strategy)
    replay = next(
        m for m in fed.grid.sent if m.content.config_records.get(wire.RECORD, {}).get(wire.STAGE) == "share-keys"
    )
    node = replay.metadata.dst_node_id
    fed.grid.contexts[node].state = RecordDict()  # the node restarts: its ctxt.state is gone
    pid = fed.grid.node_ids.index(node)
    fed.ids[pid] = _with_seen(fed.ids[pid], SeenSessions(tmp_path / str(pid)))  # its state directory is not

    advertise = Message(
        RecordDict({wire.RECORD: ConfigRecord({wire.STAGE: wire.ADVERTISE, wire.ADVERSARY: "active"})}),
        dst_node_id=node,
        message_type="train",
    )
    fed.grid.pull_messages(fed.grid.push_messages([advertise]))  # the node makes a new channel key
    replay.content[wire.RECORD][wire.CHANNEL_PK] = fed.grid.received[-1].content[wire.RECORD][wire.CHANNEL_PK]
    fed.grid.pull_messages(fed.grid.push_messages([replay]))  # the old session, with the key it holds now
    reply = fed.grid.received[-1]

    assert reply.has_error() and "was seen before by this node: a replayed session" in reply.error.reason


def test_a_node_refuses_substituted_keys_before_it_trains(grid_factory: type) -> None:
    fed = Federation(grid_factory, 4)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG)
    msgs = list(
        strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))}), ConfigRecord(), fed.grid)
    )
    record = msgs[0].content.config_records[wire.RECORD]
    record[wire.MASK_PKS] = [bytes(32 - len(b"evil")) + b"evil"] + list(record[wire.MASK_PKS])[1:]

    replies = fed.grid.send_and_receive(msgs)

    refused = [r for r in replies if r.has_error()]
    assert len(refused) == 1 and "shares do not authenticate the mask key" in refused[0].error.reason
    assert sorted(fed.trained.values()) == [0, 1, 1, 1], "the node that refused did not train"


def test_a_node_without_a_roster_is_left_out_of_an_active_session(grid_factory: type) -> None:
    fed = Federation(grid_factory, 5)
    fed.ids[4] = None  # node 105 has no roster configured: it advertises no signed channel key
    strategy = SecAggStrategy(FedAvg(min_available_nodes=5), config=CFG)

    arrays = fed.round(strategy)

    assert arrays is not None and strategy.last_report.shared == 4
    assert np.max(np.abs(arrays["w"].numpy() - _mean(range(4)))) <= CFG.encoding.error_bound + 1e-6


def test_validate_reply_wants_the_signature_that_rides_on_the_masked_input(grid_factory: type) -> None:
    fed = Federation(grid_factory, 3)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=3), config=CFG)
    arrays = ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))})
    replies = fed.grid.send_and_receive(list(strategy.configure_train(1, arrays, ConfigRecord(), fed.grid)))

    assert [strategy.validate_reply(r) for r in replies] == ["", "", ""]
    del replies[0].content.config_records[wire.RECORD][wire.SIGNATURE]
    assert "no signature on U2" in strategy.validate_reply(replies[0])
