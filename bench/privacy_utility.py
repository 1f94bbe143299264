"""Privacy–utility of the federation: test NDCG@10 against each node's target epsilon.

Runs the Hydra sweep and the non-private arm of ``conf/experiment/privacy_utility.yaml``
(100,000 synthetic users, 10 department nodes, delta = 1e-5 = 1/n_users, the same rounds,
local steps and batch in every arm), one after the other, then writes a table and a plot:

    fedmart simulate -m experiment=privacy_utility privacy.target_epsilon=1,2,4,8
    fedmart simulate experiment=privacy_utility privacy=none node.require_dp=false

Each run's model is the round with the best central validation NDCG@10; its test NDCG@10
is reported. The goal (issue 4): at epsilon = 8, at least 70% of the non-private run.

    python bench/privacy_utility.py                       # all five arms (~50 min on 2 cores)
    python bench/privacy_utility.py --epsilons 8 --extra federation.num_rounds=2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fedmart.sweep import job_row

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "fedmart", "simulate", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", default="1,2,4,8", help="target epsilons of the DP arms (comma-separated)")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every arm")
    ap.add_argument("--out", default="bench/results/privacy_utility", help="where the table and plot go")
    ap.add_argument("--runs", default=None, help="run directory (default outputs/privacy-utility-<time>)")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table and plot from --runs")
    args = ap.parse_args()
    runs = Path(args.runs or f"outputs/privacy-utility-{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["experiment=privacy_utility", *args.extra]

    # --runs of an earlier invocation: a finished non-private arm is kept, not rerun.
    none_done = (runs / "none" / "report.md").is_file()
    if args.table_only:
        seconds, t = {"inf": 0.0}, 0.0
    else:
        # The non-private arm is private by no one's choice but the nodes': their policy must allow it.
        none_arm = [*common, "privacy=none", "node.require_dp=false", f"hydra.run.dir={runs}/none"]
        seconds = {"inf": 0.0 if none_done else _run(none_arm)}
        t = _run(["-m", *common, f"privacy.target_epsilon={args.epsilons}", f"hydra.sweep.dir={runs}/sweep"])
    rows = {"inf": job_row(runs / "none")}
    for job in sorted((runs / "sweep").iterdir()):
        if job.is_dir() and (row := job_row(job)):
            eps = next(o.split("=")[1] for o in row["overrides"] if o.startswith("privacy.target_epsilon="))
            rows[eps] = row
            seconds[eps] = t / len(args.epsilons.split(","))  # the sweep's jobs run one after another

    base = rows["inf"]["test_ndcg@10"]
    table = []
    for eps, row in sorted(rows.items(), key=lambda kv: float(kv[0])):
        table.append(
            {
                "target_epsilon": eps,
                "max_node_epsilon_spent": row["max_node_epsilon"],
                "selected_round": row["selected_round"],
                "test_ndcg@10": row["test_ndcg@10"],
                "test_hr@10": row["test_hr@10"],
                "fraction_of_non_private": row["test_ndcg@10"] / base if base else None,
                "minutes": round(seconds[eps] / 60, 1) if seconds[eps] else None,
            }
        )
    result = {"runs": str(runs), "overrides": common, "date": time.strftime("%Y-%m-%d"), "arms": table}
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(table, out / "privacy_utility.png")
    print(f"{'target ε':>9} {'ε spent':>8} {'round':>5} {'NDCG@10':>8} {'HR@10':>7} {'÷ non-private':>13}")
    for r in table:
        spent = "–" if r["max_node_epsilon_spent"] is None else f"{r['max_node_epsilon_spent']:.2f}"
        print(
            f"{r['target_epsilon']:>9} {spent:>8} {r['selected_round']:>5} {r['test_ndcg@10']:>8.4f} "
            f"{r['test_hr@10']:>7.4f} {r['fraction_of_non_private']:>13.2f}"
        )
    print(f"wrote {out / 'summary.json'} and {out / 'privacy_utility.png'}")


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in table if r["target_epsilon"] != "inf"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [float(r["target_epsilon"]) for r in private]
    ax.plot(xs, [r["test_ndcg@10"] for r in private], marker="o", label="DP-SGD")
    for r in table:
        if r["target_epsilon"] == "inf":
            ax.axhline(r["test_ndcg@10"], color="grey", linestyle="--", label="no DP (ε = ∞)")
            ax.axhline(0.7 * r["test_ndcg@10"], color="grey", linestyle=":", label="70% of no DP")
    ax.set(xscale="log", xlabel="target ε per node (δ = 1e-5)", ylabel="test NDCG@10", title="privacy–utility")
    ax.set_xticks([float(r["target_epsilon"]) for r in private], [r["target_epsilon"] for r in private])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
