"""Trial runs that spend no budget, and a loud warning when a run would spend on top of earlier ones.

A department's ledger adds up every training on its users, across every run (privacy/ledger.py).
Each ``fedmart coordinate`` without ``resume=`` starts the model from scratch, so trial runs on
real data quietly spend the departments' real budgets. Two things guard against that:

* ``deploy.dry_run=true``: the coordinator greets every node (TLS, node key, data, catalog,
  policy, budget: all that ``hello`` checks) and stops before round 1; nothing trains, nothing is
  charged. It writes ``outputs/<run>/dry-run.json``.
* before round 1 of a new run, every node whose ledger already holds spend is named, with the
  ε it holds and its budget, and how to continue a run instead (``resume=``).
"""

from __future__ import annotations

import json
from pathlib import Path

from federation.coordinator import NodeInfo

__all__ = ["budget_warnings", "write_dry_run"]


def budget_warnings(nodes: dict[int, NodeInfo], *, resumed: bool) -> list[str]:
    """One line per node whose ledger already holds spend, when this run starts from scratch."""
    if resumed:
        return []
    out = []
    for n in sorted(nodes.values(), key=lambda n: n.name):
        if n.spent_epsilon <= 0:
            continue
        budget = f" of its {n.budget_epsilon:g}" if n.budget_epsilon else ""
        out.append(
            f"budget warning: node {n.name} already spent ε={n.spent_epsilon:.2f}{budget} in {n.spent_runs} earlier "
            "run(s); this run starts the model from scratch and spends more. To continue a run instead: fedmart "
            "coordinate resume=outputs/<run>; to check a deployment without training: deploy.dry_run=true"
        )
    return out


def write_dry_run(run_root: Path, nodes: dict[int, NodeInfo], *, expected: int) -> tuple[Path, str]:
    """``dry-run.json`` (every node that answered, and what it reported) and its one-line summary."""
    run_root.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "name": n.name,
            "node_id": n.node_id,
            "users": n.users,
            "events": n.events,
            "evaluation": n.evaluation,
            "budget_epsilon": n.budget_epsilon,
            "spent_epsilon": n.spent_epsilon,
        }
        for n in sorted(nodes.values(), key=lambda n: n.name)
    ]
    path = run_root / "dry-run.json"
    path.write_text(json.dumps({"expected": expected, "answered": len(rows), "nodes": rows}, indent=1) + "\n")
    names = ", ".join(f"{r['name']} ({r['users']} users, ε spent {r['spent_epsilon']:.2f})" for r in rows)
    line = (
        f"dry run: {len(rows)} of {expected} nodes answered (TLS, key, data, catalog checked): {names}; "
        f"nothing trained, no budget spent; {path}"
    )
    return path, line
