"""The privacy report states each node's own budget, as the node reports it (issue 17).

The operator's report said "node budgets … (10.0 here)" while every node ran with ``--max-epsilon 8``.
Here three nodes of one tiny world get their budgets the ways a department sets them
(``fedmart node --max-epsilon``, which reaches the ClientApp as the node config's ``max-epsilon``,
and a policy file's ``max_epsilon``); each trains, or declines by its budget, through the real
ClientApp handler, and the report is written from what they replied, as the coordinator does.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clients.app import local_train
from clients.node import load_node
from clients.node_policy import resolve_policy
from conf.settings import NodeSettings
from federation import wire
from federation.globalmodel import build_model, get_weights
from federation.privacy_report import privacy_section, reported_budgets
from privacy.policy import TrainingRequest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Optimal order is the")]

WORLD = {
    "data": {"max_len": 20, "synthetic": {"num_users": 300, "num_items": 90, "num_departments": 3, "num_merchants": 3}},
    "model": {"hidden": 16, "heads": 1, "layers": 1},
    "train": {"batch_size": 32},
    "privacy": {"mode": "dp", "noise_multiplier": 1.0},
}


def test_the_report_states_the_budget_each_node_reported(tiny_world, tmp_path, train_message) -> None:
    from flwr.app import ConfigRecord

    pristine, settings = tiny_world("budgets", WORLD)
    (tmp_path / "policy.yaml").write_text("max_epsilon: 6.5\n")
    node_configs = {  # as `fedmart node` writes them to node-config.toml
        "books": {"max-epsilon": 8.0},
        "toys": {"policy": str(tmp_path / "policy.yaml")},
        "garden": {"max-epsilon": 0.001},  # below what one training spends: it declines (4201)
    }
    request = TrainingRequest(mode="dp", noise_multiplier=1.0, local_steps=1)
    rows: list[dict] = [{"node_metrics": {}, "declined": {}}]
    for name, extra in node_configs.items():
        data = shutil.copytree(pristine, tmp_path / name)
        own = NodeSettings.from_node_config({"data-dir": str(data), "name": name, **extra})
        node, policy = load_node(own, settings), resolve_policy(own, None)
        model = build_model(node.catalog, settings.model, settings.data.max_len, seed=0)
        weights = {**get_weights(model), wire.ITEM_HOLDERS: np.zeros(len(node.catalog.item_id) + 1, np.float32)}
        msg = train_message(weights)
        msg.content[wire.CONFIG] = ConfigRecord({wire.SERVER_ROUND: 1, wire.RUN: "r", **request.to_config()})

        reply = local_train(msg, node, policy, settings)

        if reply.has_error():
            assert reply.error.code == wire.ERR_DECLINED, reply.error.reason
            assert json.loads(reply.error.reason)["max_epsilon"] == 0.001
            rows[0]["declined"][name] = reply.error.reason
        else:
            rows[0]["node_metrics"][name] = dict(reply.content[wire.METRICS])

    assert reported_budgets(rows) == {"books": 8.0, "toys": 6.5, "garden": 0.001}
    text = privacy_section(settings, rows)
    budgets = next(line for line in text.splitlines() if line.startswith("- **Node budgets**"))
    assert budgets.endswith("as the nodes reported them: books 8, garden 0.001, toys 6.5."), budgets
    assert "10" not in budgets  # no coordinator-side default (the default policy's budget is 10)


def test_a_node_that_trained_without_reporting_a_budget_is_named_not_given_a_default() -> None:
    from conf.settings import RunSettings

    settings = RunSettings.from_dict({"privacy": {"mode": "dp", "noise_multiplier": 1.0}})
    rows = [{"node_metrics": {"a": {"epsilon": 1.0, "max_epsilon": 8.0}, "b": {"epsilon": 2.0}}}]
    text = privacy_section(settings, rows)
    assert "as the nodes reported them: a 8; not reported by b." in text
