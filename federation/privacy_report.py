"""The privacy section of a run's ``report.md``: what the guarantee is, and what it rests on."""

from __future__ import annotations

import json
from typing import Any

from conf.settings import RunSettings

__all__ = ["privacy_section", "reported_budgets"]

_USER_WHOLE = ("dirichlet", "iid")

_CLIPPING = {
    "bk": "fedmart's one-pass book-keeping (privacy/bookkeeping.py; Opacus samples, noises and accounts)",
    "ghost": "Opacus ghost clipping",
    "hooks": "Opacus per-sample gradients (hooks)",
}


def _user_spread(settings: RunSettings) -> tuple[str, bool]:
    """(description, users_whole): whether each user's data sits at one node."""
    scheme = settings.partition.scheme
    sim = settings.sim
    whole = scheme in _USER_WHOLE or (scheme == "merchant" and settings.data.source == "movielens")
    if sim.max_nodes_per_user is not None:
        whole = sim.max_nodes_per_user <= 1
        return (
            f"{scheme} silos: a user's history is held by at most {sim.max_nodes_per_user} node(s) "
            f"(mean {sim.mean_nodes_per_user or 0.0:.2f})",
            whole,
        )
    return f"{scheme} silos", whole


def reported_budgets(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each node's max_epsilon as it reported it last: in its training metrics, or in its budget refusal (4201).

    The coordinator has no budget of its own to put in their place: a node that reported none is
    listed as such, never given a default.
    """
    budgets: dict[str, float] = {}
    for r in rows:
        for node, m in r.get("node_metrics", {}).items():
            if "max_epsilon" in m:
                budgets[node] = float(m["max_epsilon"])
        for node, reason in (r.get("declined") or {}).items():
            try:
                parsed = json.loads(reason)
            except (TypeError, ValueError):
                continue  # a policy refusal (one line of text), not a budget one
            if isinstance(parsed, dict) and isinstance(parsed.get("max_epsilon"), int | float):
                budgets[node] = float(parsed["max_epsilon"])
    return budgets


def _budget_list(budgets: dict[str, float], spent: set[str]) -> str:
    shown = sorted(budgets.items())[:30]
    text = ", ".join(f"{n} {b:g}" for n, b in shown) + (" …" if len(budgets) > 30 else "")
    missing = sorted(spent - set(budgets))
    if missing:
        text += ("; " if text else "") + "not reported by " + ", ".join(missing[:30])
    return text or "not reported"


def privacy_section(settings: RunSettings, rows: list[dict[str, Any]]) -> str:
    """Markdown for ``report.md``: user-level DP, then client-level DP if it was on."""
    return _user_level(settings, rows) + _client_level(settings, rows)


def _client_level(settings: RunSettings, rows: list[dict[str, Any]]) -> str:
    c = settings.federation.client_dp
    if not c.enabled:
        return ""
    eps = next((r["train_metrics"]["client_dp_epsilon"] for r in reversed(rows)
                if "client_dp_epsilon" in r.get("train_metrics", {})), None)  # fmt: skip
    released = sum(1 for r in rows if r.get("aggregated"))
    return "\n".join(
        [
            "",
            "",
            "### Client-level DP (second layer)",
            "",
            "- **Unit of privacy**: one whole node (all of a department's or merchant's data), under add/remove "
            "of one node; reported apart from the per-user ε above.",
            f"- **Mechanism**: each node clips its update to L2 norm {c.clipping_norm} and weighs 1; the "
            f"coordinator adds Gaussian noise of std {c.noise_multiplier} × {c.clipping_norm} to the "
            "sum of the clipped updates before dividing by the number of nodes in it (DP-FedAvg).",
            f"- **ε after {released} released aggregates**: "
            + (f"{eps:.3f}" if eps is not None else "n/a")
            + f" at δ = {c.delta} (RDP, no amplification by node sampling: Flower samples a fixed number).",
            "- **Against whom**: everyone who sees the global model (other nodes, the serving path, the public); "
            "not the coordinator, which adds the noise and so sees the noiseless sum (secure aggregation still "
            "hides each node's update from it).",
        ]
    )


def _user_level(settings: RunSettings, rows: list[dict[str, Any]]) -> str:
    p = settings.privacy
    secagg = settings.secagg.enabled
    lines = ["## Privacy", ""]
    if p.mode == "off":
        lines += [
            "**No differential privacy** (`privacy=none`): node updates are computed from users' data "
            "without clipping or noise and carry it unprotected.",
            "Secure aggregation is "
            + ("**on**: the coordinator saw only the sum of the nodes' updates." if secagg else "**off**."),
        ]
        return "\n".join(lines)
    final: dict[str, float] = {}
    deltas: dict[str, float] = {}
    budgets = reported_budgets(rows)
    for r in rows:
        for node, m in r.get("node_metrics", {}).items():
            if "epsilon" in m:
                final[node] = float(m["epsilon"])
                deltas[node] = float(m.get("delta", float("nan")))
    spread, whole = _user_spread(settings)
    eps_max = max(final.values()) if final else float("nan")
    eps_sum = sum(final.values()) if final else float("nan")
    mode = "target ε " + str(p.target_epsilon) if p.mode == "target" else f"σ = {p.noise_multiplier}"
    lines += [
        "- **Unit of privacy**: one user's whole interaction history at one node (one training example = one user).",
        f"- **Mechanism**: DP-SGD with Opacus on every node: Poisson sampling of users, per-user clipping to "
        f"C = {p.max_grad_norm} (flat L2 over all trainable parameters), Gaussian noise ({mode}); "
        f"per-user clipping by {_CLIPPING.get(p.grad_sample_mode, p.grad_sample_mode)}.",
        f"- **Accountant**: {p.accountant.upper()} requested; each node accounts over its whole ledger "
        "(all rounds, all runs on the same population) with the accountant pinned at its first spend; "
        "ε is reported per node.",
        "- **δ**: each node's own (its policy's, by default 1 / (10 × users at the node)), pinned in its ledger"
        + (f"; here {min(deltas.values()):.2g} … {max(deltas.values()):.2g}" if deltas else "")
        + ".",
        "- **Node budgets**: each node declines a round that would take it past its own max_epsilon (its policy "
        "or `fedmart node --max-epsilon`, never the coordinator's); as the nodes reported them: "
        + _budget_list(budgets, set(final))
        + ".",
        f"- **ε spent per node after the run**: max {eps_max:.3f}; "
        + ", ".join(f"{n} {e:.3f}" for n, e in sorted(final.items())[:30])
        + (" …" if len(final) > 30 else "")
        + ".",
        f"- **Across nodes**: {spread}. "
        + (
            "Each user's data is at one node, so a user's federation-wide guarantee is that node's "
            f"(ε ≤ {eps_max:.3f}, parallel composition)."
            if whole
            else "A user whose history is split over k nodes has the composition of those nodes' guarantees: at most "
            f"the sum of their ε (worst case over all nodes here: {eps_sum:.3f}) and of their δ."
        ),
        "- **What an adversary sees**: "
        + (
            "the coordinator receives masked vectors and only learns the sum of the nodes' updates (secure "
            "aggregation); "
            if secagg
            else "the coordinator receives each node's DP update; "
        )
        + "every model it and anyone downstream sees is covered by the guarantee (post-processing). **Not covered**: "
        "the plaintext metrics a node reports (its training loss and user counts, and evaluation on its held-out "
        "items where its policy says `evaluation: plain`; the default policy declines evaluation) are computed on "
        "private data outside DP-SGD; the coordinator sees them per node.",
        "- **Assumptions**: users are independent (one person = one user id per node); Poisson sampling is used "
        "(every node's default policy requires it); each node draws its sampling and noise from a generator "
        "seeded from the operating system for every training, never from the run seed.",
    ]
    return "\n".join(lines)
