"""The node's policy against the coordinator's request (privacy/policy.py): decide(), the request on the wire,
the policy's own validation, the node's delta."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conf.settings import SimSettings, SimulateSettings
from federation.runconfig import flatten
from privacy.policy import (
    ACCOUNTANTS,
    REQUEST_PREFIX,
    NodePolicy,
    PolicyDecision,
    TrainingRequest,
    decide,
    policy_delta,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
PRIVATE = TrainingRequest(mode="dp", noise_multiplier=1.0, accountant="rdp", poisson_sampling=True)


# ---- decide ---------------------------------------------------------------------------------------


def _refused_by(decision: PolicyDecision) -> str:
    assert not decision.allowed
    assert decision.reason.startswith(f"policy.{decision.key}: ") and "\n" not in decision.reason
    return decision.key


def test_a_private_request_within_the_policy_is_allowed():
    assert decide(PRIVATE, NodePolicy(), noise_multiplier=1.0) == PolicyDecision(True)


def test_a_request_without_dp_is_refused_unless_the_policy_allows_it():
    off = TrainingRequest(mode="off")

    assert _refused_by(decide(off, NodePolicy(), noise_multiplier=None)) == "require_dp"
    assert decide(off, NodePolicy(require_dp=False), noise_multiplier=None).allowed


def test_an_accountant_outside_the_policy_is_refused():
    prv = dataclasses.replace(PRIVATE, accountant="prv")

    assert _refused_by(decide(prv, NodePolicy(accountants=["rdp"]), noise_multiplier=1.0)) == "accountants"
    assert decide(prv, NodePolicy(accountants=["rdp", "prv"]), noise_multiplier=1.0).allowed


def test_a_request_without_poisson_sampling_is_refused_unless_the_policy_allows_it():
    shuffled = dataclasses.replace(PRIVATE, poisson_sampling=False)

    assert _refused_by(decide(shuffled, NodePolicy(), noise_multiplier=1.0)) == "require_poisson"
    assert decide(shuffled, NodePolicy(require_poisson=False), noise_multiplier=1.0).allowed


@pytest.mark.parametrize("sigma", [None, 0.0, 0.49999])
def test_sigma_below_the_floor_or_none_at_all_is_refused(sigma):
    policy = NodePolicy(min_noise_multiplier=0.5)

    assert _refused_by(decide(PRIVATE, policy, noise_multiplier=sigma)) == "min_noise_multiplier"


def test_sigma_at_the_floor_is_allowed_and_zero_is_refused_even_without_a_floor():
    assert decide(PRIVATE, NodePolicy(min_noise_multiplier=0.5), noise_multiplier=0.5).allowed
    assert _refused_by(decide(PRIVATE, NodePolicy(), noise_multiplier=0.0)) == "min_noise_multiplier"


def test_the_sigma_decide_checks_is_the_nodes_own_not_the_requests():
    # a target-epsilon request carries no sigma: the node calibrates one and decides on that
    target = TrainingRequest(mode="target", target_epsilon=1e6)

    assert _refused_by(decide(target, NodePolicy(min_noise_multiplier=0.3), noise_multiplier=0.01)) == (
        "min_noise_multiplier"
    )
    low_but_claimed_high = dataclasses.replace(PRIVATE, noise_multiplier=5.0)
    assert not decide(low_but_claimed_high, NodePolicy(min_noise_multiplier=0.3), noise_multiplier=0.1).allowed


# ---- the request on the wire ----------------------------------------------------------------------

requests = st.builds(
    TrainingRequest,
    mode=st.sampled_from(["off", "dp", "target"]),
    noise_multiplier=st.none() | st.floats(0.01, 100),
    target_epsilon=st.none() | st.floats(0.01, 100),
    max_grad_norm=st.floats(0.01, 100),
    accountant=st.sampled_from(ACCOUNTANTS),
    poisson_sampling=st.booleans(),
    grad_sample_mode=st.sampled_from(["bk", "ghost", "hooks"]),
    local_epochs=st.integers(0, 10),
    local_steps=st.integers(0, 1000),
    planned_rounds=st.integers(1, 100),
)


@given(requests)
def test_a_request_round_trips_through_the_train_config(request):
    config = request.to_config()

    assert all(k.startswith(REQUEST_PREFIX) for k in config)
    assert all(v is not None for v in config.values()), "Flower's ConfigRecord has no null"
    assert TrainingRequest.from_config(config) == request


def test_keys_the_request_does_not_have_are_ignored_a_forged_delta_among_them():
    forged = {**PRIVATE.to_config(), "request.delta": 0.9, "request.max_epsilon": 1e9}

    assert TrainingRequest.from_config(forged) == PRIVATE
    assert not {"delta", "max_epsilon"} & {f.name for f in dataclasses.fields(TrainingRequest)}


def test_a_missing_key_is_named():
    config = PRIVATE.to_config()
    del config["request.accountant"]

    with pytest.raises(ValueError, match=r"'request\.accountant'"):
        TrainingRequest.from_config(config)


@pytest.mark.parametrize("key", ["local_epochs", "local_steps", "planned_rounds"])
@pytest.mark.parametrize("value", [-1, 1.5, True, "x"])
def test_a_malformed_count_is_named(key, value):
    config = {**PRIVATE.to_config(), REQUEST_PREFIX + key: value}

    with pytest.raises(ValueError, match=rf"request\.{key}"):
        TrainingRequest.from_config(config)


@pytest.mark.parametrize("key", ["noise_multiplier", "target_epsilon", "max_grad_norm"])
def test_a_malformed_number_is_named(key):
    config = {**PRIVATE.to_config(), REQUEST_PREFIX + key: "lots"}

    with pytest.raises(ValueError, match=rf"request\.{key}"):
        TrainingRequest.from_config(config)


def test_only_mode_off_is_non_private():
    assert not TrainingRequest(mode="off").is_private
    assert TrainingRequest(mode="dp").is_private and TrainingRequest(mode="target").is_private


# ---- the policy itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_epsilon", 0.0),
        ("max_epsilon", -1.0),
        ("max_epsilon", math.nan),
        ("delta", 0.0),
        ("delta", 1.0),
        ("delta", math.nan),
        ("accountants", []),
        ("accountants", ["rdp", "gdp"]),
        ("min_noise_multiplier", -0.1),
        ("min_noise_multiplier", math.inf),
        ("min_noise_multiplier", math.nan),
        ("secagg_threat_model", "malicious"),
        ("evaluation", "secure-sum"),
    ],
)
def test_a_bad_policy_value_is_refused_at_construction_naming_the_key(field, value):
    with pytest.raises(ValueError, match=rf"policy {field}"):
        NodePolicy(**{field: value})


def test_a_policy_file_with_an_unknown_key_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"unknown node policy keys \['require_dpp'\]"):
        NodePolicy.from_mapping({"require_dpp": False})


def test_a_policy_from_a_mapping_equals_the_same_policy_built_directly():
    assert NodePolicy.from_mapping({"accountants": ("rdp",), "max_epsilon": 3}) == NodePolicy(
        accountants=["rdp"], max_epsilon=3
    )


def test_the_default_policy_is_the_private_node_and_conf_node_default_says_the_same():
    policy = NodePolicy()
    conf = yaml.safe_load((CONF / "node" / "default.yaml").read_text())

    assert policy.require_dp and policy.require_secagg and policy.require_poisson
    assert policy.max_epsilon == 10.0 and policy.delta is None and policy.evaluation == "decline"
    assert NodePolicy.from_mapping(conf) == policy


def test_conf_node_open_allows_non_private_unmasked_training_and_plain_evaluation():
    conf = yaml.safe_load((CONF / "node" / "open.yaml").read_text())
    policy = NodePolicy.from_mapping({k: v for k, v in conf.items() if k != "defaults"})

    assert not policy.require_dp and not policy.require_secagg and policy.evaluation == "plain"
    assert decide(TrainingRequest(mode="off"), policy, noise_multiplier=None).allowed


def test_the_nodes_policy_never_enters_the_run_config():
    settings = SimulateSettings(node=NodePolicy(max_epsilon=1.5, delta=1e-7, evaluation="plain"))

    run_config = flatten(settings.request().with_sim(SimSettings()).to_dict())

    assert not [k for k in run_config if k.startswith("node.")]
    assert not {"max_epsilon", "require_dp", "require_secagg", "evaluation"} & {
        k.rsplit(".", 1)[-1] for k in run_config
    }


# ---- the node's delta -----------------------------------------------------------------------------


@pytest.mark.parametrize(("users", "delta"), [(1, 0.1), (500, 1 / 5000), (20_000, 5e-6)])
def test_without_a_policy_delta_the_node_uses_one_over_ten_times_its_users(users, delta):
    assert policy_delta(NodePolicy(), users) == pytest.approx(delta, rel=1e-12)


def test_a_node_without_users_still_has_a_delta_below_one():
    assert policy_delta(NodePolicy(), 0) == pytest.approx(0.1)


def test_a_policy_delta_wins_whatever_the_users():
    assert policy_delta(NodePolicy(delta=1e-7), 10) == policy_delta(NodePolicy(delta=1e-7), 10**6) == 1e-7


# ---- the node's audit policy (issue 15) ------------------------------------------------------------


def test_the_audit_is_the_nodes_policy_and_off_by_default():
    from privacy.policy import AuditPolicy

    assert not NodePolicy().audit.enabled
    policy = NodePolicy.from_mapping({"audit": {"canaries": 1000, "confidence": 0.99}})
    assert policy.audit == AuditPolicy(canaries=1000, confidence=0.99) and policy.audit.k == 250
    assert NodePolicy.from_mapping({"audit": {"canaries": 100, "guesses": 10}}).audit.k == 10


@pytest.mark.parametrize(
    "audit,match",
    [
        ({"canaries": -1}, "audit.canaries must be an integer >= 0"),
        ({"canaries": 100, "confidence": 1.0}, "audit.confidence must be in"),
        ({"canaries": 100, "score": "auc"}, "audit.score must be one of"),
        ({"canaries": 100, "guesses": 51}, "more than half of audit.canaries"),
        ({"canaries": 100, "canary": 3}, r"unknown node policy keys audit.\['canary'\]"),
    ],
)
def test_a_bad_audit_policy_is_refused_naming_the_key(audit, match):
    with pytest.raises(ValueError, match=match):
        NodePolicy.from_mapping({"audit": audit})
