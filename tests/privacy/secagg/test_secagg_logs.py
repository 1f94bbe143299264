"""Quiet, true logs of secure aggregation (issue 17): the weight cap explained once per run (not once per node
per round), Flower's "Received 1 results" saying what that one result is, one line per secure round."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

import privacy.secagg.mod as node_mod
from privacy.secagg import SecAggConfig, SecAggStrategy, secagg_mod
from privacy.secagg.encoding import EncodingParams, WeightCapNotice, weight_cap_explanation

CFG = SecAggConfig(
    enabled=True, adversary="semi-honest", clip_range=0.5, bits=16, max_weight=15, max_nodes=50, timeout=0.2
)


def _app() -> ClientApp:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        new = {k: Array(v.numpy() + 0.01 * (pid + 1)) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10 * (pid + 1)})  # 10, 20, 30, 40: three above the cap of 15
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


@pytest.fixture
def run_two_rounds(grid_factory, caplog, monkeypatch):
    monkeypatch.setattr(node_mod, "_WEIGHT_CAP", WeightCapNotice())  # this test's run starts untold
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="flwr")  # an in-process CLI run earlier may have quietened Flower
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG)
    strategy.start(grid_factory(_app(), 4), ArrayRecord({"w": Array(np.zeros(3, np.float32))}), num_rounds=2)
    return strategy, [r.getMessage() for r in caplog.records]  # (the records of this fixture's setup phase)


def test_the_weight_cap_is_explained_once_per_run_by_the_nodes_and_once_by_the_coordinator(run_two_rounds) -> None:
    _, text = run_two_rounds
    capped = [t for t in text if "secagg.max_weight" in t]

    # 3 nodes above the cap x 2 rounds used to give 6 node lines and 6 coordinator lines
    assert len(capped) == 2, capped
    node_line, coordinator_line = capped
    assert any(f"this node weighs ~{w} " in node_line for w in (20, 30, 40)), node_line  # the first node over it
    assert "the heaviest node weighs ~40 " in coordinator_line
    for line in (node_line, coordinator_line):
        assert "counts as 15 (said once per run)" in line
        assert "gets the same weight" in line and "32-bit words" in line and "raise secagg.max_weight" in line


def test_the_explanation_names_the_width_it_would_take() -> None:
    p32 = EncodingParams(clip_range=1.0, bits=16, max_weight=1000, max_nodes=50)
    assert "above 1310 the words become 64-bit" in weight_cap_explanation(3900, p32, who="this node")
    p64 = EncodingParams(clip_range=1.0, bits=16, max_weight=4000, max_nodes=50)
    assert "64-bit already" in weight_cap_explanation(5000, p64, who="this node")
    notice = WeightCapNotice()
    notice.note("run-a", 10, p32, who="x")  # below the cap: nothing to say, nothing remembered
    assert "run-a" not in notice._told


def test_one_result_is_explained_and_one_line_per_secure_round(run_two_rounds) -> None:
    strategy, text = run_two_rounds

    assert not [t for t in text if "Received 1 results" in t]
    assert text.count("aggregate_train: 1 result, the mean of the 4 nodes' updates unmasked from their secure sum") == 2
    rounds = [t for t in text if t.startswith("secure aggregation: round ")]
    assert [t.split(",")[0] for t in rounds] == ["secure aggregation: round 1", "secure aggregation: round 2"]
    assert rounds[1].startswith("secure aggregation: round 2, 4 sampled, 4 masked, unmasked by ")
    assert "keys pipelined" in rounds[1] and rounds[1] == strategy.last_report.summary()
