"""Secure aggregation through Flower's real simulation engine (Ray): one run per mode, several checks.

A tiny numpy ClientApp with the secagg mod; a ServerApp with ``SecAggStrategy(FedAvg(...))``;
4 supernodes, 3 rounds; in round 2 one node's training fails after the key stages (a dropout
at the masked-input stage: in the active mode, t = 3 of 4, the one dropout it tolerates, and a
consistency stage). The active nodes take a demo roster derived in each Ray worker from their
partition id (``clients.node_policy.demo_identity``: keys that cross no process boundary).
Slow: Ray takes seconds to start.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from clients.node_policy import demo_identity
from privacy.secagg import RoundReport, SecAggConfig, SecAggStrategy, make_secagg_mod, secagg_mod, wire

pytestmark = pytest.mark.slow

NODES, ROUNDS, D = 4, 3, 1000
CFG = SecAggConfig(
    enabled=True, adversary="semi-honest", threshold=0.5, clip_range=0.5, bits=16, max_weight=1000, timeout=300
)


def _delta(pid: int, server_round: int) -> np.ndarray:
    return np.random.default_rng(100 * server_round + pid).normal(0, 0.05, D).astype(np.float32)


def _weight(pid: int) -> int:
    return 5 * (pid + 1)


def _fails(pid: int, server_round: int) -> bool:
    return pid == 3 and server_round == 2


def _identity(context: Context):
    return demo_identity(0, NODES, int(context.node_config["partition-id"]), "active")


CLIENTS = {"semi-honest": ClientApp(mods=[secagg_mod]), "active": ClientApp(mods=[make_secagg_mod(_identity)])}


def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    if _fails(pid, server_round):
        raise RuntimeError("simulated crash during local training")
    w = msg.content["arrays"]["w"].numpy()
    metrics = MetricRecord({"num-examples": _weight(pid), "pid": float(pid)})
    return Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(w + _delta(pid, server_round))}), "metrics": metrics}),
        reply_to=msg,
    )


for _app in CLIENTS.values():
    _app.train()(train)


class _Recording(SecAggStrategy):
    reports: list[RoundReport]

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        self.reports.append(self.last_report)
        return out


@pytest.fixture(scope="module", params=list(CLIENTS))
def simulation(request) -> dict:
    from flwr.simulation import run_simulation

    mode = request.param
    box: dict = {"mode": mode}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < NODES:
            time.sleep(0.1)
        config = SecAggConfig(**{**vars(CFG), "adversary": mode})
        strategy = _Recording(FedAvg(fraction_evaluate=0.0, min_available_nodes=NODES), config=config)
        strategy.reports = []
        box["result"] = strategy.start(grid, ArrayRecord({"w": Array(np.zeros(D, np.float32))}), num_rounds=ROUNDS)
        box["reports"] = strategy.reports

    client = CLIENTS[mode]
    run_simulation(server, client, num_supernodes=NODES, backend_config={"client_resources": {"num_cpus": 1}})
    return box


def test_every_round_completes_with_the_expected_members(simulation: dict) -> None:
    reports = simulation["reports"]

    assert [r.abort_reason for r in reports] == [None] * ROUNDS
    assert [r.masked for r in reports] == [4, 3, 4]
    assert [r.advertised for r in reports] == [4, 0, 0]  # channel keys persist in ctxt.state
    # the active mode's consistency exchange runs only in the round with a masked-input dropout
    want = [False, True, False] if simulation["mode"] == "active" else [False] * ROUNDS
    assert [wire.CONSISTENCY in r.seconds for r in reports] == want


def test_final_model_is_the_sum_of_the_weighted_means(simulation: dict) -> None:
    want = np.zeros(D)
    for r in range(1, ROUNDS + 1):
        pids = [p for p in range(NODES) if not _fails(p, r)]
        total = sum(_weight(p) for p in pids)
        want += sum(_weight(p) * np.clip(_delta(p, r), -0.5, 0.5) for p in pids) / total

    got = simulation["result"].arrays["w"].numpy()

    assert np.max(np.abs(got - want)) <= ROUNDS * CFG.encoding.error_bound + 1e-6


def test_plaintext_metrics_are_weighted_means_of_the_members(simulation: dict) -> None:
    metrics = simulation["result"].train_metrics_clientapp

    assert metrics[1]["pid"] == pytest.approx(sum(p * _weight(p) for p in range(4)) / sum(map(_weight, range(4))))
    assert metrics[2]["pid"] == pytest.approx(sum(p * _weight(p) for p in range(3)) / sum(map(_weight, range(3))))
