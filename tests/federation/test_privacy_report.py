from __future__ import annotations

from federation.privacy_report import privacy_section

BASE = {"partition": {"scheme": "department"}, "data": {"source": "synthetic"}, "secagg": {"enabled": True}}


def test_private_run_states_unit_delta_accountant_and_composition():
    settings = {
        **BASE,
        "privacy": {"mode": "dp", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "accountant": "rdp", "max_epsilon": 8},
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
        "partition": {"scheme": "iid"},
        "privacy": {"mode": "dp", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
        "sim": {"max-nodes-per-user": 1, "mean-nodes-per-user": 1.0},
    }
    text = privacy_section(settings, [{"node_metrics": {"a": {"epsilon": 4.0}}}])
    assert "parallel composition" in text


def test_non_private_run_says_so():
    assert "No differential privacy" in privacy_section({**BASE, "privacy": {"mode": "off"}}, [])
