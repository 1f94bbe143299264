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


def _max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def _same_update_twice(first: dict[str, Any], again: dict[str, Any], bound: float) -> str:
    """Why ``again`` shows that some node put the update of ``first`` into a second secure sum ("" if not)."""
    if not again["record"]["aggregated"]:
        return ""
    diff = _max_difference(first["aggregate"], again["aggregate"])
    if diff > 100 * bound:
        return ""
    return (
        f"{again['record']['replied']} answered again; the two unmasked sums differ by {diff:.2g} (quantisation "
        f"{bound:.2g}): the same updates went into two secure sums, and over two survivor sets their "
        "difference would be one node's update, exactly"
    )


def test_the_script_ran_every_attack_and_the_first_ask_was_answered(open_attacks):
    assert open_attacks.box.get("errors", {}) == {}
    first = _attack(open_attacks, "replay")[0]

    assert first["sent"]["request.mode"] == "off" and open_attacks.settings.secagg.enabled
    assert first["record"]["aggregated"] and len(first["record"]["replied"]) == 3


def test_a_round_released_without_dp_is_not_released_again_in_another_secure_sum(open_attacks):
    first, again = _attack(open_attacks, "replay")

    for node, reply in again["replies"].items():
        assert reply["code"] == wire.ERR_POLICY and "already released" in reply["reason"], (
            node,
            reply,
            _same_update_twice(first, again, open_attacks.settings.secagg.encoding.error_bound),
        )


def test_a_round_asked_again_under_another_run_name_releases_no_update_twice(open_attacks):
    first = _attack(open_attacks, "replay")[0]
    renamed = _attack(open_attacks, "renamed")

    assert renamed["run"] != first["run"] and renamed["round"] == first["round"]
    why = _same_update_twice(first, renamed, open_attacks.settings.secagg.encoding.error_bound)
    assert why == "", why


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
