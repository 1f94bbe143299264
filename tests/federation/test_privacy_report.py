from __future__ import annotations

from conf.settings import RunSettings
from federation.privacy_report import privacy_section as _section

BASE = {"partition": {"scheme": "department"}, "data": {"source": "synthetic"}, "secagg": {"enabled": True}}


def privacy_section(settings: dict, rows: list[dict]) -> str:
    return _section(RunSettings.from_dict(settings), rows)


def test_private_run_states_unit_delta_accountant_and_composition():
    settings = {
        **BASE,
        "privacy": {"mode": "dp", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "accountant": "rdp"},
        "sim": {"max-nodes-per-user": 3, "mean-nodes-per-user": 1.7},
    }
    rows = [{"node_metrics": {"Books": {"epsilon": 1.5, "delta": 1e-4}, "Toys": {"epsilon": 2.0, "delta": 2e-4}}}]
    text = privacy_section(settings, rows)
    assert "one user's whole interaction history at one node" in text
    assert "RDP" in text and "0.0001" in text
    assert "at most 3 node(s)" in text
    assert "3.500" in text  # sum over nodes: a split user composes
    assert "masked vectors" in text
    assert "Not covered" in text


def test_user_whole_silos_use_parallel_composition():
    settings = {
        **BASE,
        "partition": {"scheme": "iid", "num_partitions": 4},
        "privacy": {"mode": "dp", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
        "sim": {"max-nodes-per-user": 1, "mean-nodes-per-user": 1.0},
    }
    text = privacy_section(settings, [{"node_metrics": {"a": {"epsilon": 4.0}}}])
    assert "parallel composition" in text


def test_non_private_run_says_so():
    assert "No differential privacy" in privacy_section({**BASE, "privacy": {"mode": "off"}}, [])


def test_client_level_dp_is_reported_apart_with_its_own_unit_and_epsilon():
    fed = {"client_dp": {"enabled": True, "clipping_norm": 0.1, "noise_multiplier": 1.2, "delta": 0.01}}
    rows = [
        {"aggregated": True, "train_metrics": {"client_dp_epsilon": 3.25}},
        {"aggregated": True, "train_metrics": {"client_dp_epsilon": 4.5}},
    ]
    text = privacy_section({**BASE, "privacy": {"mode": "off"}, "federation": fed}, rows)
    assert "No differential privacy" in text  # the users' layer is off...
    assert "### Client-level DP (second layer)" in text and "one whole node" in text  # ...the nodes' is on
    assert "ε after 2 released aggregates**: 4.500 at δ = 0.01" in text
    assert (
        "client"
        not in privacy_section(
            {**BASE, "privacy": {"mode": "off"}, "federation": {"client_dp": {"enabled": False}}}, rows
        ).lower()
    )
