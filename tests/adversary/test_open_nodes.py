"""The dishonest coordinator against nodes whose policy allows training without DP (``conf/node/open.yaml``).

Without DP nothing random protects an update: it is a function of the global weights and the
round seed, and the holder set is the items in the node's own data. These are the issue's
re-release and holder-decoding attacks as it found them (the private nodes' side is in
test_dishonest_coordinator.py). One more simulation (conftest.py, ``open_attacks``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.interactions import Interactions
from clients.sequences import build_sequences, leave_one_out
from federation import wire

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _attack(open_attacks, name: str) -> Any:
    errors = open_attacks.box.get("errors", {})
    assert name not in errors, f"the scripted coordinator failed in attack {name!r}:\n{errors[name]}"
    return open_attacks.box[name]


def test_the_script_ran_every_attack_and_the_first_ask_was_answered(open_attacks):
    assert open_attacks.box.get("errors", {}) == {}
    first = _attack(open_attacks, "replay")[0]

    assert first["sent"]["request.mode"] == "off" and open_attacks.settings.secagg.enabled
    assert first["record"]["aggregated"] and len(first["record"]["replied"]) == 3


def test_without_dp_holder_shares_reveal_counts_and_never_which_nodes(open_attacks):
    attack = _attack(open_attacks, "holders")
    metrics = {node: reply["metrics"] for node, reply in attack["replies"].items()}
    # the holder sets are the items in each node's own training data: private, and overlapping
    held = {}
    for node, node_dir in open_attacks.node_dirs.items():
        split = leave_one_out(build_sequences(Interactions.load(Path(node_dir) / "interactions.npz")))
        held[node] = np.unique(split.train.items[split.train.items > 0])
    expected = np.zeros(len(attack["aggregate"][wire.ITEM_HOLDERS]))
    for items in held.values():
        expected[items] += 1

    assert len({m["users_trained"] for m in metrics.values()}) == 3, "nodes of different sizes"
    assert {m["num-examples"] for m in metrics.values()} == {1.0}
    counts = attack["aggregate"][wire.ITEM_HOLDERS].astype(np.float64) * len(attack["record"]["replied"])
    bound = len(metrics) * open_attacks.settings.secagg.encoding.error_bound + 1e-6
    assert np.max(np.abs(counts - expected)) <= bound
    assert len(np.unique(expected[expected > 0])) >= 2, "items held by one node and items held by several"


def test_no_spend_is_recorded_for_training_without_dp(open_attacks):
    for node, node_dir in open_attacks.node_dirs.items():
        ledger = Path(node_dir) / ".fedmart" / "privacy-ledger.json"
        assert not ledger.exists() or json.loads(ledger.read_text())["entries"] == [], node
