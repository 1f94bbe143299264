"""One training round at a node (clients/local_round.py): the request against the node's policy, its
delta and ledger, and what the update releases (issue 13).

Each test trains a copy of one department node of a tiny world on disk (``fedmart.simulate.prepare``),
so that its ledger and population id start empty.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from clients.local_round import train_round
from clients.node import NodeData, load_node
from clients.trainer import seed_everything
from conf.settings import NodeSettings, RunSettings
from federation import wire
from federation.globalmodel import build_model, get_weights
from privacy.ledger import PrivacyLedger
from privacy.policy import NodePolicy, TrainingRequest, policy_delta

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Optimal order is the")]

WORLD = {
    "data": {"max_len": 20, "synthetic": {"num_users": 300, "num_items": 90, "num_departments": 3, "num_merchants": 3}},
    "model": {"hidden": 16, "heads": 1, "layers": 1},
    "train": {"batch_size": 32},
}
PRIVATE = TrainingRequest(mode="dp", noise_multiplier=1.0, local_steps=2)
OPEN = NodePolicy(require_dp=False, require_secagg=False, evaluation="plain")


@pytest.fixture(scope="module")
def world(tiny_world) -> tuple[Path, RunSettings]:
    return tiny_world("local-round", WORLD)


@pytest.fixture
def node(world, tmp_path) -> NodeData:
    """A fresh copy of the node: its own directory, no ledger, no population id yet."""
    pristine, settings = world
    copy = shutil.copytree(pristine, tmp_path / "node")
    return load_node(NodeSettings(data_dir=str(copy)), settings)


@pytest.fixture
def settings(world) -> RunSettings:
    return world[1]


def _global(node: NodeData, settings: RunSettings) -> dict[str, np.ndarray]:
    model = build_model(node.catalog, settings.model, settings.data.max_len, seed=0)
    rows = len(node.catalog.item_id) + 1
    return {**get_weights(model), wire.ITEM_HOLDERS: np.zeros(rows, dtype=np.float32)}


def _train(node, settings, request, policy, incoming=None, *, run="r", server_round=1):
    seed_everything(0)
    incoming = incoming if incoming is not None else _global(node, settings)
    return train_round(node, settings, request, policy, incoming, server_round=server_round, run=run, seed=0)


def _ledger(node: NodeData) -> PrivacyLedger:
    return PrivacyLedger(node.state_dir / "privacy-ledger.json", population_id=node.population_id)


def test_a_refused_request_trains_nothing_and_spends_nothing(node, settings):
    result = _train(node, settings, TrainingRequest(mode="off"), NodePolicy())

    assert result.refused is not None and result.refused.key == "require_dp"
    assert result.weights is None and result.metrics is None
    assert _ledger(node).entries == []


def test_a_malformed_request_is_refused_by_the_request_key(node, settings):
    result = _train(node, settings, dataclasses.replace(PRIVATE, mode="bogus"), NodePolicy())

    assert result.refused is not None and result.refused.key == "request"
    assert _ledger(node).entries == []


def test_a_private_round_accounts_at_the_nodes_own_delta_and_pins_it(node, settings):
    result = _train(node, settings, PRIVATE, NodePolicy())

    own = policy_delta(NodePolicy(), np.unique(node.interactions.user).size)
    assert result.metrics["delta"] == pytest.approx(own, rel=1e-12)
    ledger = _ledger(node)
    assert (ledger.pinned_delta, ledger.pinned_accountant) == (pytest.approx(own, rel=1e-12), "rdp")
    assert len(ledger.entries) == 1 and result.metrics["epsilon"] == pytest.approx(ledger.epsilon(own))


def test_a_policy_delta_looser_than_one_over_users_is_refused_and_one_over_users_is_the_loosest(node, settings):
    users = node.interactions.num_users

    looser = _train(node, settings, PRIVATE, NodePolicy(delta=1.5 / users))
    assert looser.refused is not None and looser.refused.key == "delta" and _ledger(node).entries == []

    loosest = _train(node, settings, PRIVATE, NodePolicy(delta=1.0 / users))
    assert loosest.weights is not None and loosest.metrics["delta"] == 1.0 / users


def test_once_pinned_the_ledgers_delta_and_accountant_win_over_a_changed_policy_or_request(node, settings):
    _train(node, settings, PRIVATE, NodePolicy())
    pinned = _ledger(node).pinned_delta

    later = _train(node, settings, dataclasses.replace(PRIVATE, accountant="prv"), NodePolicy(delta=1e-7), run="r2")

    assert later.weights is not None and later.metrics["delta"] == pinned
    assert (_ledger(node).pinned_delta, _ledger(node).pinned_accountant) == (pinned, "rdp")


def test_a_round_over_the_nodes_budget_is_declined_before_any_spend(node, settings):
    result = _train(node, settings, PRIVATE, NodePolicy(max_epsilon=0.01))

    assert result.declined is not None and result.declined.code == "budget_exceeded" and result.weights is None
    assert _ledger(node).entries == []


def test_a_round_asked_twice_is_trained_twice_with_fresh_noise_and_recorded_twice(node, settings):
    incoming = _global(node, settings)

    first = _train(node, settings, PRIVATE, NodePolicy(), incoming)
    second = _train(node, settings, PRIVATE, NodePolicy(), incoming)

    assert any(not np.array_equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert [(e.run, e.round) for e in _ledger(node).entries] == [("r", 1), ("r", 1)]


def test_without_dp_the_same_round_repeats_bit_for_bit_and_spends_nothing(node, settings):
    incoming = _global(node, settings)

    first = _train(node, settings, TrainingRequest(mode="off", local_steps=2), OPEN, incoming)
    second = _train(node, settings, TrainingRequest(mode="off", local_steps=2), OPEN, incoming)

    assert all(np.array_equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert _ledger(node).entries == []


def test_without_dp_the_holder_set_is_the_nodes_items_and_weighs_one(node, settings):
    incoming = _global(node, settings)

    result = _train(node, settings, TrainingRequest(mode="off", local_steps=2), OPEN, incoming)

    held = result.weights[wire.ITEM_HOLDERS]
    assert np.array_equal(np.flatnonzero(held), np.unique(node.split.train.items[node.split.train.items > 0]))
    # the holder set depends on the data here, so only a count may leave: every node weighs 1
    assert result.metrics[wire.NUM_EXAMPLES] == 1
    assert result.metrics["users_trained"] == len(node.train_dataset(settings.data.max_len)) > 1
    outside = held == 0
    for key in wire.item_row_keys(incoming):
        assert np.array_equal(result.weights[key][outside], incoming[key][outside]), key


def test_under_dp_the_holder_set_is_the_catalogs_department_and_weighs_one(node, settings):
    result = _train(node, settings, PRIVATE, NodePolicy())

    department = np.asarray(node.catalog.department).astype(str) == node.name
    assert department.any()
    assert np.array_equal(result.weights[wire.ITEM_HOLDERS][1:], department.astype(np.float32))
    assert result.metrics[wire.NUM_EXAMPLES] == 1
