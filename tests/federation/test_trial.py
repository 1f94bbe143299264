"""Trial runs that spend no budget, and the warning before a run spends on top of earlier ones (issue 17)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from clients.app import ledger_summary
from federation.coordinator import NodeInfo
from federation.trial import budget_warnings, write_dry_run
from privacy.ledger import PrivacyLedger
from privacy.policy import NodePolicy


def _nodes() -> dict[int, NodeInfo]:
    return {
        7: NodeInfo(7, "toys", users=120, budget_epsilon=8.0, spent_epsilon=3.9, spent_runs=4),
        9: NodeInfo(9, "books", users=300, budget_epsilon=8.0),
    }


def test_a_new_run_names_every_node_whose_ledger_already_holds_spend():
    (line,) = budget_warnings(_nodes(), resumed=False)
    assert line.startswith("budget warning: node toys already spent ε=3.90 of its 8 in 4 earlier run(s)")
    assert "resume=outputs/<run>" in line and "deploy.dry_run=true" in line
    assert budget_warnings(_nodes(), resumed=True) == []  # continuing a run is what the warning asks for


def test_a_dry_run_writes_what_every_node_reported_and_says_nothing_trained(tmp_path):
    path, line = write_dry_run(tmp_path / "run", _nodes(), expected=3)
    report = json.loads(path.read_text())
    assert report["expected"] == 3 and report["answered"] == 2
    assert [n["name"] for n in report["nodes"]] == ["books", "toys"]
    assert line.startswith("dry run: 2 of 3 nodes answered") and "nothing trained, no budget spent" in line


def test_hello_reports_the_ledgers_spend_at_the_pinned_delta(tmp_path):
    node = SimpleNamespace(state_dir=tmp_path / ".fedmart", population_id="pop-1")
    policy = NodePolicy(max_epsilon=8.0)
    assert ledger_summary(node, policy) == {"budget-epsilon": 8.0, "spent-epsilon": 0.0, "spent-runs": 0}

    ledger = PrivacyLedger(tmp_path / ".fedmart" / "privacy-ledger.json", population_id="pop-1")
    ledger.record(1.0, 0.05, 40, round=1, run="trial-1", delta=1e-4, accountant="rdp")
    ledger.record(1.0, 0.05, 40, round=1, run="trial-2", delta=1e-4, accountant="rdp")

    summary = ledger_summary(node, policy)
    assert summary["spent-runs"] == 2
    assert summary["spent-epsilon"] == ledger.epsilon(1e-4, accountant="rdp") > 0
