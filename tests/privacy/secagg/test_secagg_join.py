"""A node that connects during a run (registered mid-run) trains from the next round (issue 17).

Before, the coordinator asked ``hello`` once, at the start, and only ever sampled the nodes
that answered then: a department registered mid-run idled until the next ``fedmart
coordinate``. Now each round starts by greeting the nodes that connected since; they are
eligible from that round, under active-mode secure aggregation too (the strategy advertises
the newcomer's channel key; the roster already holds it, since the roster is made out of band).

The nodes run the real mod, strategy and coordinator loop; the transport is
``conftest.InProcessGrid``, whose node list grows when the fourth node "connects".
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from federation import wire as fwire
from federation.coordinator import Coordinator, discover_nodes
from privacy.secagg import SecAggConfig, SecAggStrategy
from privacy.secagg.identity import in_memory_identities
from privacy.secagg.mod import make_secagg_mod

ACTIVE = SecAggConfig(enabled=True, adversary="active", threshold=0.5, clip_range=0.5, bits=16, timeout=0.2)
SHAPE = (4, 2)


def _federation(grid_factory):
    ids = in_memory_identities(list(range(4)))
    app = ClientApp(mods=[make_secagg_mod(lambda ctxt: ids[int(ctxt.node_config["partition-id"])])])
    trained: dict[int, list[int]] = {p: [] for p in range(4)}

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        trained[pid].append(int(msg.content["config"]["server-round"]))
        new = {k: Array(v.numpy() + 0.01 * (pid + 1)) for k, v in msg.content["arrays"].items()}
        return Message(
            RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 3})}), reply_to=msg
        )

    @app.query("hello")
    def hello(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        info = ConfigRecord({"name": f"dept{pid}", "dataset-id": f"d{pid}", "users": 10, "events": 40})
        return Message(RecordDict({"node": info}), reply_to=msg)

    grid = grid_factory(app, 4)
    return grid, trained


def test_a_node_that_connects_mid_run_is_greeted_and_trains_from_the_next_round(grid_factory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="federation.coordinator")
    grid, trained = _federation(grid_factory)
    everyone = list(grid.node_ids)
    grid.node_ids = everyone[:3]  # the fourth department is not registered yet
    nodes = discover_nodes(grid, expected=3, timeout=5, wait=0)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=3, fraction_train=1.0), config=ACTIVE)
    coordinator = Coordinator(strategy=strategy, grid=grid, nodes=nodes, num_rounds=3, round_timeout=5, seed=0)
    arrays = ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))})
    assert fwire.SERVER_ROUND == "server-round"

    records = []
    for r in (1, 2, 3):
        if r == 2:
            grid.node_ids = everyone  # registered and connected during round 1
        joined = coordinator.admit_new_nodes(r)
        arrays, record = coordinator.run_round(r, arrays)
        record.joined = joined
        records.append(record)

    assert [rec.joined for rec in records] == [[], ["dept3"], []]
    assert trained[3] == [2, 3] and all(trained[p] == [1, 2, 3] for p in range(3))
    assert sorted(records[1].replied) == ["dept0", "dept1", "dept2", "dept3"]
    assert all(rec.aggregated and not rec.failed and not rec.rejected for rec in records)
    assert records[1].secure_aggregation["masked"] == 4
    assert [r.error.reason for r in grid.received if r.has_error()] == []
    assert "node dept3 (node id 104) joined during the run: eligible from round 2" in caplog.text


def test_a_node_that_fails_hello_is_said_once_and_not_asked_every_round(grid_factory, caplog) -> None:
    grid, trained = _federation(grid_factory)
    everyone = list(grid.node_ids)
    grid.node_ids = everyone[:3]
    nodes = discover_nodes(grid, expected=3, timeout=5, wait=0)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=3, fraction_train=1.0), config=ACTIVE)
    coordinator = Coordinator(strategy=strategy, grid=grid, nodes=nodes, num_rounds=3, round_timeout=5, seed=0)
    grid.node_ids = everyone
    grid.contexts[everyone[3]].node_config = {"partition-id": "not a number"}  # its hello raises

    assert coordinator.admit_new_nodes(2) == [] and coordinator.admit_new_nodes(3) == []
    hellos = [m for m in grid.sent if m.metadata.dst_node_id == everyone[3]]
    assert len(hellos) == 1 and caplog.text.count("did not join") == 1
