"""Empirical privacy audit of the privacy–utility setup: accountant ε against the one-run lower bound.

Runs ``conf/experiment/privacy_utility.yaml`` (100,000 synthetic users, 10 department nodes,
δ = 1e-5, batch 2048, 8 rounds × 5 local steps) with every node auditing itself
(``privacy_audit=on``: 1,000 canaries a node, k = 250 guesses a side, loglik score, 95%
confidence; and 500 withheld real users a node for the membership-inference AUC), at target
ε ∈ {1, 2, 4, 8} and without DP (ε = ∞), one run after the other. Then the cost: the ε = 8
arm again without the audit (wall time and test NDCG@10 side by side).

Per arm it reports the accountant's ε (max over nodes), each node's lower bound (max and
median), the federation's pooled bound (all nodes' guesses as one audit of the final model:
a lower bound on the largest node ε; valid because every node's guesses are a function of the
same final model and each canary is one user at one node), and the membership AUC (median).

    python bench/privacy_audit.py                         # all arms (~35 min on 2 cores)
    python bench/privacy_audit.py --epsilons 8 --no-cost --extra federation.num_rounds=2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedmart.sweep import job_row
from privacy.empirical_bound import epsilon_lower_bound

ROOT = Path(__file__).resolve().parents[1]
# The membership AUC leaves a node only where its policy answers exact metrics (evaluation: plain);
# the experiment asks for no federated evaluation (fraction_evaluate 0), so nothing else changes.
AUDIT = ["privacy_audit=on", "node.audit.canaries=1000", "node.audit.holdout=500", "node.evaluation=plain"]


def _run(args: list[str], run_dir: Path) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "fedmart", "simulate", *args, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _audit_row(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next((r for r in reversed(rows) if "privacy_audit" in r), {})


def _audits(run_dir: Path) -> dict[str, dict]:
    return _audit_row(run_dir).get("privacy_audit", {})


def summarise(run_dir: Path, confidence: float = 0.95) -> dict:
    # user-level rows only: a client-level (canary nodes) row has another unit of privacy
    audits = {n: a for n, a in _audits(run_dir).items() if "error" not in a and "client_level" not in a}
    row = job_row(run_dir) or {}
    bounds = [a["epsilon_lower_bound"] for a in audits.values()]
    aucs = [a["mia_auc"] for a in audits.values() if "mia_auc" in a]
    m = sum(int(a["canaries"]) for a in audits.values())
    r = sum(int(a["guesses"]) for a in audits.values())
    v = sum(int(a["correct"]) for a in audits.values())
    delta = max((a["delta"] for a in audits.values()), default=0.0)
    eps = [a["epsilon"] for a in audits.values() if a.get("epsilon") is not None]
    return {
        "nodes": len(audits),
        "accountant_epsilon_max": max(eps) if eps else None,
        "bound_max": max(bounds) if bounds else None,
        "bound_median": statistics.median(bounds) if bounds else None,
        "correct": v,
        "guesses": r,
        "pooled_bound": epsilon_lower_bound(m, r, v, delta, confidence) if r else None,
        "mia_auc_median": statistics.median(aucs) if aucs else None,
        "mia_auc_range": [min(aucs), max(aucs)] if aucs else None,
        "test_ndcg@10": row.get("test_ndcg@10"),
        "audit_seconds": _audit_row(run_dir).get("seconds"),  # the query.audit exchange after the last round
        "per_node": audits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", default="1,2,4,8,inf")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every arm")
    ap.add_argument("--no-cost", action="store_true", help="skip the ε = 8 arm without the audit")
    ap.add_argument("--runs", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/privacy_audit")
    args = ap.parse_args()
    runs = args.runs or ROOT / f"outputs/privacy-audit-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["experiment=privacy_utility", *args.extra]
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "command": " ".join(sys.argv),
    }
    table: list[dict] = []

    def save() -> None:
        (args.out / "summary.json").write_text(json.dumps({"meta": meta, "arms": table}, indent=1, default=str) + "\n")

    arms = [(e, True) for e in args.epsilons.split(",")] + ([] if args.no_cost else [("8", False)])
    for eps, audited in arms:
        privacy = ["privacy=none", "node.require_dp=false"] if eps == "inf" else [f"privacy.target_epsilon={eps}"]
        name = f"eps-{eps}" + ("" if audited else "-no-audit")
        load0 = os.getloadavg()[0]
        seconds = _run([*common, *privacy, *(AUDIT if audited else [])], runs / name)
        row = summarise(runs / name) if audited else {"test_ndcg@10": (job_row(runs / name) or {}).get("test_ndcg@10")}
        table.append({"arm": name, "target_epsilon": eps, "audited": audited, "seconds": seconds,
                      "load1": [load0, os.getloadavg()[0]], **row})  # fmt: skip
        save()
        print(json.dumps({k: v for k, v in table[-1].items() if k != "per_node"}), flush=True)
    _plot([t for t in table if t["audited"]], args.out / "privacy_audit.png")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'privacy_audit.png'}")


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [t for t in table if t["target_epsilon"] != "inf" and t["accountant_epsilon_max"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [float(t["target_epsilon"]) for t in private]
    ax.plot(xs, xs, color="grey", linestyle="--", label="accountant ε (upper bound)")
    ax.plot(xs, [t["bound_max"] for t in private], marker="o", label="empirical lower bound (max node, 95% per node)")
    ax.plot(xs, [t["pooled_bound"] for t in private], marker="s", label="pooled over nodes (95%)")
    for t in table:
        if t["target_epsilon"] == "inf":
            ax.axhline(t["pooled_bound"], color="red", linestyle=":", label="no DP: pooled lower bound")
    ax.set(xscale="log", xlabel="target ε per node (δ = 1e-5)", ylabel="ε", title="empirical privacy audit")
    ax.set_xticks(xs, [t["target_epsilon"] for t in private])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
