"""The coordinator's side of the nodes' empirical privacy audit: send the final model, collect the results.

Each node that audits itself (its policy's ``audit:``, announced in ``hello``) scores its own
canaries with the final global model and replies with counts and a lower bound on ε
(:mod:`clients.audit_round`). The coordinator only relays the model and writes what comes
back: one ``privacy_audit`` line in ``metrics.jsonl``, the report's "Empirical privacy audit"
section, and an entry in the signed audit log. A bound above a node's accountant ε is a
bug in the mechanism; it is logged as an error and the report says so in bold.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from federation import wire
from federation.coordinator import NodeInfo, exchange

__all__ = [
    "audit_section",
    "client_level_audit",
    "collect_audits",
    "jsonable",
    "log_violations",
    "read_audits",
    "violations",
    "write_audits",
]

log = logging.getLogger(__name__)

AUDIT_KEY = "privacy_audit"  # the metrics.jsonl line that holds the nodes' results
CLIENT_LEVEL = "client-level (canary nodes)"  # the pooled canary-node audit's row in the results


def collect_audits(grid: Grid, nodes: dict[int, NodeInfo], arrays: ArrayRecord, *, timeout: float) -> dict[str, dict]:
    """Ask every auditing node to audit ``arrays`` (the final model); ``name -> result`` (or ``{"error": ...}``)."""
    ids = sorted((i for i, n in nodes.items() if n.audit), key=lambda i: nodes[i].name)
    if not ids:
        return {}
    msgs = [
        Message(
            RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({"q": "audit"})}),
            message_type=wire.QUERY_AUDIT,
            dst_node_id=i,
        )
        for i in ids
    ]
    out: dict[str, dict] = {nodes[i].name: {"error": "no reply"} for i in ids}
    for reply in exchange(grid, msgs, timeout=timeout):
        name = nodes[reply.metadata.src_node_id].name
        if reply.has_error():
            out[name] = {"error": (reply.error.reason or f"error code {reply.error.code}")[:300]}
            continue
        out[name] = {k: float(v) for k, v in reply.content[wire.METRICS].items()}
    for name, r in sorted(out.items()):
        if "error" in r:
            log.warning("privacy audit: node %s gave no result: %s", name, r["error"])
    return out


def log_violations(results: dict[str, dict]) -> None:
    """An error in the log for every bound above its accountant's ε: the mechanism is broken there."""
    for name, r in violations(results).items():
        log.error(
            "PRIVACY AUDIT FAILED at node %s: empirical epsilon >= %.3f exceeds the accountant's %.3f: the DP "
            "mechanism is broken; do not publish this model",
            name,
            r["epsilon_lower_bound"],
            r["epsilon"],
        )


def client_level_audit(
    results: dict[str, dict], *, epsilon: float, delta: float, confidence: float = 0.95
) -> dict[str, dict]:
    """``results`` with the canary nodes' replies pooled into one client-level audit row.

    Each canary node replied with its score (the cosine of the run's change with its secret
    direction) and its bit (clients/canary_node.py). The guesses are the k = max(1, c // 4)
    highest and lowest scores of the c canary nodes; the bound is at the client-level δ, and
    ``epsilon`` is the client-level accountant's, beside it.
    """
    from privacy.empirical_bound import audit

    canaries = {n: r for n, r in results.items() if "canary_node" in r}
    out = {n: r for n, r in results.items() if n not in canaries}
    if len(canaries) < 2:
        return out
    names = sorted(canaries)
    scores = [canaries[n]["canary_score"] for n in names]
    bits = [bool(canaries[n]["canary_in"]) for n in names]
    result = audit(scores, bits, max(1, len(names) // 4), delta=delta, confidence=confidence)
    out[CLIENT_LEVEL] = {
        "canaries": result.canaries,
        "guesses": result.guesses,
        "correct": result.correct,
        "confidence": result.confidence,
        "delta": result.delta,
        "epsilon_lower_bound": result.epsilon_lower_bound,
        "epsilon": epsilon,
        "client_level": 1,
    }
    return out


def violations(results: dict[str, dict]) -> dict[str, dict]:
    """Nodes whose empirical lower bound exceeds their accountant's ε."""
    return {
        n: r
        for n, r in results.items()
        if "epsilon_lower_bound" in r and r["epsilon_lower_bound"] > r.get("epsilon", math.inf)
    }


def jsonable(results: dict[str, dict]) -> dict[str, dict]:
    # JSON has no infinity: a node without a DP spend reports epsilon = inf, written as null.
    return {n: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for n, r in results.items()}  # fmt: skip


def write_audits(metrics_path: Path, results: dict[str, dict], *, run: str, seconds: float | None = None) -> None:
    """Append the results to ``metrics.jsonl`` as one ``{"privacy_audit": ...}`` line.

    ``seconds``: the audit's wall time on the coordinator (sending the model, the nodes'
    scoring, the replies), which is what the audit adds to a run.
    """
    row: dict[str, Any] = {AUDIT_KEY: jsonable(results), "run": run}
    if seconds is not None:
        row["seconds"] = seconds
    with metrics_path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_audits(rows: list[dict[str, Any]]) -> dict[str, dict]:
    """The last audit line's results (``epsilon`` null read back as ``inf``)."""
    for row in reversed(rows):
        if AUDIT_KEY in row:
            return {n: {k: (math.inf if k == "epsilon" and v is None else v) for k, v in r.items()}
                    for n, r in row[AUDIT_KEY].items()}  # fmt: skip
    return {}


def audit_section(results: dict[str, dict]) -> str:
    """The report's "Empirical privacy audit" section (empty when no node audited itself)."""
    if not results:
        return ""
    bad = violations(results)
    lines = ["", "", "## Empirical privacy audit", ""]
    if bad:
        lines += [
            f"**WARNING: the audit found a broken privacy mechanism at {', '.join(sorted(bad))}: the empirical lower "
            "bound on ε exceeds the accountant's ε. The ε reported above is not true there; do not publish this "
            "model.**",
            "",
        ]
    lines += [
        "Each node audited itself with canary users of its own (included with probability ½ by its own CSPRNG) "
        "and the final global model (Steinke, Nasr and Jagielski 2023, one training run). The bound holds at the "
        "confidence shown, at the node's δ. It is evidence, not proof: a bound below the accountant's ε shows "
        "that this attack on these canaries found nothing more, not that the mechanism is correct "
        "(docs/privacy.md).",
        "",
        "| node | canaries | guesses | correct | ε lower bound | confidence | accountant ε | δ | membership AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(results.items()):
        if "error" in r:
            lines.append(f"| {name} | — | — | — | no result: {r['error'][:120]} | | | | |")
            continue
        eps = r.get("epsilon", math.inf)
        mia = f"{r['mia_auc']:.3f} ({int(r['mia_users'])} + {int(r['mia_users'])} users)" if "mia_auc" in r else "—"
        canary = (
            f"{int(r['canaries'])} | {int(r['guesses'])} | {int(r['correct'])} | "
            f"{r['epsilon_lower_bound']:.3f}{' **(exceeds ε)**' if name in bad else ''} | {r['confidence']:.2f}"
            if "canaries" in r
            else "— | — | — | — | —"
        )
        lines.append(
            f"| {name} | {canary} | {'∞ (no DP)' if not math.isfinite(eps) else f'{eps:.3f}'} | "
            f"{r['delta']:.2g} | {mia} |"
        )
    if CLIENT_LEVEL in results:
        lines += [
            "",
            f"*{CLIENT_LEVEL}*: {int(results[CLIENT_LEVEL].get('canaries', 0))} simulated nodes without data, each "
            "included with probability ½, whose update is a step of the clipping norm along a secret random "
            "direction (Andrew et al. 2024); scored by the cosine of the run's change with it. Its ε is the "
            "client-level accountant's (unit: one node), at the client-level δ.",
        ]
    if any("mia_auc" in r for r in results.values()):
        lines += [
            "",
            "Membership AUC: a loss-based attack telling trained real users from users the node withheld from "
            "training (`audit.holdout`); 0.5 is chance. Context, not a bound.",
        ]
    return "\n".join(lines)
