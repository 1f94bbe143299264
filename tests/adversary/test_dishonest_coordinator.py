"""A dishonest coordinator attacks three real nodes (issue 13); each test is one attack and the nodes' answer.

The attacks ran once, in the ``attacks`` fixture (conftest.py: a scripted ServerApp in
Flower's simulation engine against the real ClientApp). Here: Prepare = read what the
coordinator received and what the nodes wrote to their own disks; Assert = the node's
refusal (``ERR_POLICY`` and the reason naming the policy key), or the observable consequence.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.interactions import Interactions
from federation import wire
from federation.catalog import Catalog
from privacy.accounting import epsilon
from privacy.policy import TrainingRequest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


# ---- what the coordinator saw, what the nodes kept -----------------------------------------------


def _attack(attacks, name: str) -> dict[str, Any]:
    errors = attacks.box.get("errors", {})
    assert name not in errors, f"the scripted coordinator failed in attack {name!r}:\n{errors[name]}"
    return attacks.box[name]


def _ledger(attacks, node: str) -> dict[str, Any]:
    return json.loads((Path(attacks.node_dirs[node]) / ".fedmart" / "privacy-ledger.json").read_text())


def _entries(attacks, node: str, run: str) -> list[dict[str, Any]]:
    return [e for e in _ledger(attacks, node)["entries"] if e["run"] == run]


def _own_delta(attacks, node: str) -> float:
    """1 / (10 x users), counting the users in the node's own data on its disk."""
    users = np.unique(Interactions.load(Path(attacks.node_dirs[node]) / "interactions.npz").user).size
    return 1.0 / (10.0 * users)


def _error_bound(attacks) -> float:
    return attacks.settings.secagg.encoding.error_bound


def _assert_every_node_refuses(attacks, name: str, key: str) -> None:
    attack = _attack(attacks, name)
    nodes = set(attacks.node_dirs)

    assert set(attack["replies"]) == nodes, "every node answers, and the answer is a refusal"
    for node, reply in attack["replies"].items():
        assert reply["code"] == wire.ERR_POLICY, (node, reply)
        assert f"policy.{key}:" in reply["reason"], (node, reply["reason"])
        assert reply["metrics"] == {}, f"{node} released metrics while refusing"
    record = attack["record"]
    assert set(record["declined"]) == nodes and not record["replied"]
    assert not record["aggregated"] and attack["aggregate"] is None
    for node in nodes:
        assert _entries(attacks, node, attack["run"]) == [], f"{node} spent budget on a request it refused"


def _answered(attacks) -> dict[str, int]:
    """TRAIN messages each node answered with an update, over the whole script."""
    count = dict.fromkeys(attacks.node_dirs, 0)
    train_attacks = [a for a in attacks.box.values() if isinstance(a, dict) and "record" in a]
    for attack in [*train_attacks, *attacks.box["replay"]]:
        for node, reply in attack["replies"].items():
            count[node] += reply["code"] is None
    return count


def test_the_script_ran_every_attack(attacks):
    assert attacks.box.get("errors", {}) == {}
    assert len(attacks.box["hello"]) == 3
    assert attacks.settings.secagg.enabled, "the attacks that need secure aggregation must have had it"


# ---- the honest request, so that every refusal below could have been an acceptance ------------------


def test_an_honest_private_secure_request_is_accepted(attacks):
    attack = _attack(attacks, "honest")

    assert attack["record"]["aggregated"] and set(attack["record"]["replied"]) == set(attacks.node_dirs)
    for node, reply in attack["replies"].items():
        assert reply["code"] is None, (node, reply["reason"])
        assert reply["metrics"]["epsilon"] > 0 and reply["metrics"]["noise_multiplier"] == 1.0
        assert wire.ARRAYS not in reply["records"], "under secure aggregation only a masked vector leaves the node"
        assert len(_entries(attacks, node, attack["run"])) == 1


# ---- DP off, delta, accountants, sampling, noise floor ---------------------------------------------


def test_dp_off_under_secure_aggregation_is_refused(attacks):
    assert _attack(attacks, "dp_off")["sent"]["request.mode"] == "off"

    _assert_every_node_refuses(attacks, "dp_off", "require_dp")


def test_a_forged_delta_is_ignored_and_the_node_trains_at_its_own(attacks):
    attack = _attack(attacks, "delta")
    assert attack["sent"]["request.delta"] == 0.9  # what the attacker added to every TRAIN message
    # ... and nothing the coordinator sends could carry a delta for the nodes' DP-SGD
    assert "delta" not in {f.name for f in fields(TrainingRequest)}
    assert not [k for k in attacks.run_config if k.startswith("privacy.") and "delta" in k]

    assert attack["record"]["aggregated"]
    for node, reply in attack["replies"].items():
        own = _own_delta(attacks, node)
        assert reply["code"] is None, (node, reply["reason"])
        assert reply["metrics"]["delta"] == pytest.approx(own, rel=1e-12) and own < 1e-3
        ledger = _ledger(attacks, node)
        assert ledger["pinned"] == {"delta": pytest.approx(own, rel=1e-12), "accountant": "rdp"}
        # the first spend these nodes ever made: their epsilon is the spend read at their own delta,
        # far above what the same history would read at the attacker's delta
        (first,) = _entries(attacks, node, attack["run"])
        spend = [(first["noise_multiplier"], first["sample_rate"], first["steps"])]
        assert reply["metrics"]["epsilon"] == pytest.approx(epsilon(spend, delta=own))
        assert epsilon(spend, delta=0.9) < 0.5 * reply["metrics"]["epsilon"]


def test_an_accountant_the_node_does_not_accept_is_refused(attacks):
    assert attacks.policy["accountants"] == ["rdp"]
    assert _attack(attacks, "accountant")["sent"]["request.accountant"] == "prv"

    _assert_every_node_refuses(attacks, "accountant", "accountants")


def test_training_without_poisson_sampling_is_refused(attacks):
    assert _attack(attacks, "no_poisson")["sent"]["request.poisson_sampling"] is False

    _assert_every_node_refuses(attacks, "no_poisson", "require_poisson")


def test_a_noise_multiplier_below_the_nodes_floor_is_refused(attacks):
    assert _attack(attacks, "low_sigma")["sent"]["request.noise_multiplier"] < attacks.policy["min_noise_multiplier"]

    _assert_every_node_refuses(attacks, "low_sigma", "min_noise_multiplier")


# ---- secure aggregation, evaluation ----------------------------------------------------------------


def test_a_plain_train_message_is_refused_under_a_secure_aggregation_policy(attacks):
    for node, reply in _attack(attacks, "plain_train")["replies"].items():
        assert "secagg" not in "".join(reply.get("records", [])), node

    _assert_every_node_refuses(attacks, "plain_train", "require_secagg")


def test_the_evaluation_oracle_is_closed(attacks):
    replies = _attack(attacks, "evaluate")["replies"]

    assert {n["evaluation"] for n in attacks.box["hello"].values()} == {"decline"}
    assert set(replies) == set(attacks.node_dirs)
    for node, reply in replies.items():
        assert reply["code"] == wire.ERR_POLICY and "policy.evaluation:" in reply["reason"], (node, reply)
        assert reply["metrics"] == {}, f"{node} scored the attacker's weights"


# ---- re-release, holder decoding -------------------------------------------------------------------


def test_a_round_asked_twice_is_trained_twice_with_fresh_noise_and_paid_twice(attacks):
    first, second = _attack(attacks, "replay")
    assert first["run"] == second["run"] and first["round"] == second["round"] == 1
    assert first["record"]["aggregated"] and second["record"]["aggregated"]

    a, b = first["aggregate"], second["aggregate"]
    diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    # two sums over the same nodes and the same global weights: equal (up to quantisation)
    # only if some node put the same update into both; their difference would then be exact
    assert diff > 100 * _error_bound(attacks)
    for node in attacks.node_dirs:
        entries = _entries(attacks, node, first["run"])
        assert [e["round"] for e in entries] == [1, 1] and len({e["training_id"] for e in entries}) == 2


def test_every_ledger_holds_one_spend_per_update_the_node_released(attacks):
    answered = _answered(attacks)

    for node, count in answered.items():
        entries = _ledger(attacks, node)["entries"]
        assert len(entries) == count, (node, count, [(e["run"], e["round"]) for e in entries])
        assert count == 6  # delta, honest, holders, the loss probe, and the replayed round twice


def test_holder_shares_reveal_counts_and_never_which_nodes(attacks):
    attack = _attack(attacks, "holders")
    metrics = {node: reply["metrics"] for node, reply in attack["replies"].items()}
    catalog = Catalog.load(attacks.box["sim"]["catalog"])

    # nodes of different sizes: weighted by users, the averaged shares would tell them apart
    assert len({m["users_trained"] for m in metrics.values()}) == 3
    assert {m["num-examples"] for m in metrics.values()} == {1.0}
    shares = attack["aggregate"][wire.ITEM_HOLDERS].astype(np.float64)
    counts = shares * len(attack["record"]["replied"])
    assert np.max(np.abs(counts - np.round(counts))) <= len(metrics) * _error_bound(attacks) + 1e-6
    # and the counts are what the public catalog says: each item has one department
    held = np.zeros(len(catalog.item_id) + 1)
    for node in metrics:
        held[1:] += np.asarray(catalog.department).astype(str) == node
    assert np.array_equal(np.round(counts), held) and held[1:].min() == 1


# ---- the training loss ------------------------------------------------------------------------------


def test_a_train_reply_carries_no_exact_loss_on_weights_the_coordinator_chose(attacks):
    probe, honest = _attack(attacks, "loss_oracle"), _attack(attacks, "honest")

    for node, reply in probe["replies"].items():
        assert reply["code"] is None, (node, reply["reason"])  # a valid, private, secure request: the node trains
        leaked = reply["metrics"].get("train_loss")
        assert leaked is None, (
            f"{node} released its exact training loss in the clear on the attacker's weights ({leaked:.3f}; "
            f"{honest['replies'][node]['metrics']['train_loss']:.3f} on the honest ones): computed on its users' "
            "data outside DP-SGD, per node and per query, like the federated-evaluation oracle"
        )
