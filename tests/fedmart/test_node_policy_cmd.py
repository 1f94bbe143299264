"""`fedmart node`'s policy checks before it joins: the policy file, and the isolation it refuses."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedmart.errors import UserError
from fedmart.node_cmd import _check_policy


def _args(tmp_path: Path, *, policy: str | None = None, isolation: str = "process", max_epsilon=None):
    path = None
    if policy is not None:
        path = tmp_path / "policy.yaml"
        path.write_text(policy)
    return argparse.Namespace(policy=path, isolation=isolation, max_epsilon=max_epsilon)


def test_the_default_policy_is_the_private_one(tmp_path):
    policy = _check_policy(_args(tmp_path))
    assert policy.require_dp and policy.require_secagg and policy.max_epsilon == 10.0 and policy.evaluation == "decline"


def test_a_policy_file_and_a_budget_override(tmp_path):
    policy = _check_policy(_args(tmp_path, policy="max_epsilon: 4\naccountants: [rdp]\n", max_epsilon=2.5))
    assert policy.max_epsilon == 2.5 and policy.accountants == ["rdp"]


def test_subprocess_isolation_is_refused_when_the_policy_requires_dp(tmp_path):
    with pytest.raises(UserError, match="--isolation subprocess runs the coordinator's code"):
        _check_policy(_args(tmp_path, isolation="subprocess"))
    # a node that does not require DP may run the coordinator's code, with a warning
    assert not _check_policy(_args(tmp_path, policy="require_dp: false\n", isolation="subprocess")).require_dp


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: blue\n", "unknown node policy keys"),
        ("max_epsilon: ten\n", "wrong type"),
        ("delta: 0.9\naccountants: [rdp]\n", None),  # valid as a file; refused per round when looser than 1/users
        ("accountants: [moments]\n", "accountants"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_the_key(tmp_path, text, message):
    if message is None:
        assert _check_policy(_args(tmp_path, policy=text)).delta == 0.9
        return
    with pytest.raises(UserError, match=message):
        _check_policy(_args(tmp_path, policy=text))
