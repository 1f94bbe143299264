"""A node that restarts (a crash, a reboot) rejoins secure aggregation cleanly (issue 17).

A restarted node has lost its ``ctxt.state``: its channel key and any session it had shared
keys for. Before, its first round failed with "the coordinator holds a stale channel key" (an
exception in the node's log, a failed reply at the coordinator). Now the node answers with its
new channel key instead, with no error on either side:

* restarted after it shared keys for the coming round (pipelined): it sits that round out
  without training (a dropout whose masks the others' shares rebuild) and is in the next one;
* restarted before a fresh share-keys stage (e.g. after it dropped out of a round): the
  coordinator takes the new key and shares keys again at once, so the node is in that round.

The nodes run the real mod and ClientApp routing; the transport is ``conftest.InProcessGrid``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from federation.coordinator import Coordinator, NodeInfo
from privacy.secagg import SecAggConfig, SecAggStrategy, secagg_mod, wire
from privacy.secagg.identity import in_memory_identities
from privacy.secagg.mod import make_secagg_mod

SEMI = SecAggConfig(enabled=True, adversary="semi-honest", threshold=0.5, clip_range=0.5, bits=16, timeout=0.2)
ACTIVE = SecAggConfig(enabled=True, adversary="active", threshold=0.5, clip_range=0.5, bits=16, timeout=0.2)
SHAPE = (5, 3)


def _step(pid: int) -> np.ndarray:
    return np.random.default_rng(pid).uniform(-0.2, 0.2, size=SHAPE).astype(np.float32)


class Nodes:
    """Four nodes (ids 101..104) on an in-process grid, counting the trainings each did."""

    def __init__(self, grid_factory: type, *, active: bool = False, drop=None) -> None:
        ids = in_memory_identities(list(range(4))) if active else None
        mod = make_secagg_mod(lambda ctxt: ids[int(ctxt.node_config["partition-id"])]) if ids else secagg_mod
        self.trained: dict[int, int] = dict.fromkeys(range(4), 0)
        app = ClientApp(mods=[mod])

        @app.train()
        def train(msg: Message, context) -> Message:
            pid = int(context.node_config["partition-id"])
            self.trained[pid] += 1
            new = {k: Array(v.numpy() + _step(pid)) for k, v in msg.content["arrays"].items()}
            metrics = MetricRecord({"num-examples": 5 + pid})
            return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

        self.grid = grid_factory(app, 4, drop=drop)

    def restart(self, node: int) -> None:
        """The node's process restarts: Flower gives it a fresh, empty context state."""
        self.grid.contexts[node].state = RecordDict()

    def errors(self) -> list[str]:
        return [r.error.reason for r in self.grid.received if r.has_error()]

    def round(self, strategy: SecAggStrategy, server_round: int) -> np.ndarray | None:
        arrays = ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))})
        msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        out, _ = strategy.aggregate_train(server_round, self.grid.send_and_receive(msgs))
        return None if out is None else out["w"].numpy()


def _mean(pids) -> np.ndarray:
    w = {p: 5 + p for p in pids}
    return sum(w[p] * _step(p) for p in pids) / sum(w.values())


def _close(got: np.ndarray | None, pids) -> bool:
    return got is not None and float(np.max(np.abs(got - _mean(pids)))) <= SEMI.encoding.error_bound + 1e-6


def test_restarted_after_sharing_next_rounds_keys_it_sits_that_round_out_then_rejoins(grid_factory) -> None:
    nodes = Nodes(grid_factory)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=SEMI)
    assert _close(nodes.round(strategy, 1), range(4))
    assert _close(nodes.round(strategy, 2), range(4))  # its TRAIN messages carried round 3's share-keys stage

    nodes.restart(102)
    got = nodes.round(strategy, 3)

    report = strategy.last_report
    assert report.pipelined and report.masked == 3 and report.rejoined == 1
    assert _close(got, [0, 2, 3]), "its masks were rebuilt from shares, as for a dropout"
    assert nodes.trained[1] == 2, "it did not train a round it could not mask (no budget spent)"
    assert nodes.errors() == [], "no error on either side"

    got = nodes.round(strategy, 4)
    assert strategy.last_report.masked == 4 and strategy.last_report.advertised == 0  # its new key came along
    assert _close(got, range(4)) and nodes.trained[1] == 3
    assert nodes.errors() == []


def test_restarted_before_a_fresh_share_keys_stage_it_is_in_that_very_round(grid_factory) -> None:
    # Round 1: node 102 crashes while training (its masked input never comes); it restarts before round 2.
    first = [True]
    nodes = Nodes(grid_factory, drop=lambda stage, node: node == 102 and stage == wire.MASKED_INPUT and first[0])
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=SEMI)
    assert _close(nodes.round(strategy, 1), [0, 2, 3])
    first[0] = False

    nodes.restart(102)
    got = nodes.round(strategy, 2)

    report = strategy.last_report
    assert not report.pipelined and report.rejoined == 1  # it answered share-keys with its new channel key...
    assert report.masked == 4 and _close(got, range(4))  # ...and the stage ran again with it, in this round
    share_keys = [
        m
        for m in nodes.grid.sent
        if m.metadata.group_id == "2" and wire.RECORD in m.content.config_records
        and m.content[wire.RECORD][wire.STAGE] == wire.SHARE_KEYS and m.metadata.dst_node_id == 101
    ]  # fmt: skip
    assert len(share_keys) == 2, "the other nodes shared keys twice in that round"
    assert nodes.errors() == []


def test_the_active_mode_rejoins_the_same_way(grid_factory) -> None:
    nodes = Nodes(grid_factory, active=True)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=ACTIVE)
    for r in (1, 2):
        assert _close(nodes.round(strategy, r), range(4))

    nodes.restart(103)
    assert _close(nodes.round(strategy, 3), [0, 1, 3]) and strategy.last_report.rejoined == 1
    assert _close(nodes.round(strategy, 4), range(4)) and strategy.last_report.masked == 4
    assert nodes.errors() == []


def test_the_coordinator_counts_the_round_it_sat_out_as_dropped_not_failed(grid_factory) -> None:
    nodes = Nodes(grid_factory)
    infos = {n: NodeInfo(node_id=n, name=f"dept{n}") for n in nodes.grid.node_ids}
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=SEMI)
    coordinator = Coordinator(strategy=strategy, grid=nodes.grid, nodes=infos, num_rounds=4, round_timeout=5, seed=0)
    arrays = ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))})
    for r in (1, 2):
        arrays, record = coordinator.run_round(r, arrays)
        assert sorted(record.replied) == sorted(i.name for i in infos.values())

    nodes.restart(102)
    arrays, record = coordinator.run_round(3, arrays)

    assert record.aggregated and record.timed_out == ["dept102"], record
    assert record.failed == {} and record.rejected == {}
    assert record.secure_aggregation["rejoined"] == 1
    assert "1 rejoined with a new channel key" in record.secure_aggregation["summary"]
    arrays, record = coordinator.run_round(4, arrays)
    assert len(record.replied) == 4 and not record.timed_out
