"""The coordinator's record of the nodes' privacy audits (federation/empirical_audit.py): report and metrics."""

from __future__ import annotations

import json
import math

from federation.empirical_audit import audit_section, read_audits, violations, write_audits
from federation.outputs import read_metrics, read_rows

OK = {"canaries": 200.0, "guesses": 100.0, "correct": 55.0, "confidence": 0.95, "delta": 1e-5,
      "epsilon_lower_bound": 0.0, "epsilon": 1.0}  # fmt: skip
BROKEN = {**OK, "correct": 100.0, "epsilon_lower_bound": 3.19}
NO_DP = {**OK, "correct": 100.0, "epsilon_lower_bound": 3.19, "epsilon": math.inf}


def test_a_bound_above_the_accountants_epsilon_is_a_loud_warning():
    section = audit_section({"Books": BROKEN, "Home": OK})

    assert violations({"Books": BROKEN, "Home": OK}) == {"Books": BROKEN}
    assert "**WARNING: the audit found a broken privacy mechanism at Books" in section
    assert "| Books | 200 | 100 | 100 | 3.190 **(exceeds ε)** | 0.95 | 1.000 | 1e-05 | — |" in section
    assert "| Home | 200 | 100 | 55 | 0.000 | 0.95 | 1.000 |" in section


def test_the_membership_auc_is_shown_beside_the_bound():
    section = audit_section({"Books": {**OK, "mia_auc": 0.512, "mia_users": 500.0}})

    assert "| 0.512 (500 + 500 users) |" in section and "0.5 is chance" in section


def test_without_dp_there_is_no_claim_to_violate():
    section = audit_section({"Books": NO_DP})

    assert violations({"Books": NO_DP}) == {}
    assert "WARNING" not in section and "∞ (no DP)" in section


def test_a_node_without_a_result_is_listed_not_dropped():
    section = audit_section({"Books": OK, "Toys": {"error": "policy.audit: node Toys has no canaries"}})

    assert "| Toys | — | — | — | no result: policy.audit: node Toys has no canaries |" in section


def test_no_auditing_node_no_section():
    assert audit_section({}) == ""


def test_the_audit_line_follows_the_rounds_and_round_readers_skip_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 1, "replied": ["Books"]}) + "\n")
    write_audits(path, {"Books": NO_DP}, run="r")

    assert [r["round"] for r in read_metrics(path)] == [1]
    rows = read_rows(path)
    assert rows[-1]["privacy_audit"]["Books"]["epsilon"] is None  # JSON has no infinity
    assert read_audits(rows)["Books"]["epsilon"] == math.inf


def test_canary_nodes_are_pooled_into_one_client_level_audit():
    from federation.empirical_audit import CLIENT_LEVEL, client_level_audit

    # 8 canary nodes: the 4 included score highest, so k = 2 a side guesses all 4 right
    nodes = {f"canary-node-{i:02d}": {"canary_node": 1.0, "canary_in": float(i < 4), "canary_score": 1.0 - i / 10}
             for i in range(8)}  # fmt: skip
    out = client_level_audit({**nodes, "Books": OK}, epsilon=2.0, delta=0.01)

    assert set(out) == {"Books", CLIENT_LEVEL}
    pooled = out[CLIENT_LEVEL]
    assert (pooled["canaries"], pooled["guesses"], pooled["correct"]) == (8, 4, 4)
    assert pooled["epsilon"] == 2.0 and pooled["delta"] == 0.01
    # 4 of 4 right: rejecting needs p^4 <= 0.05, i.e. p <= 0.473, but p = e^eps/(1+e^eps) >= 1/2 for
    # every eps >= 0: nothing is rejected
    assert pooled["epsilon_lower_bound"] == 0.0
    assert "*client-level (canary nodes)*: 8 simulated nodes" in audit_section(out)
