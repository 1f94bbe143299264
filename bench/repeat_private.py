"""The same private run several times against its non-private twin: mean and spread of the ratio.

Since each node draws its DP sampling and noise from the operating system for every training,
two private runs of the same seed differ; one run is one draw. This runs ``--repeats`` private
runs and one non-private run (whose nodes' policy allows it; it repeats bit for bit) of the same
config, one after the other, and prints one JSON line with each run's selected test NDCG@10,
the mean, the spread and the ratio to the non-private run::

    python bench/repeat_private.py --repeats 3 -- experiment=privacy_utility privacy.target_epsilon=8
    python bench/repeat_private.py --repeats 1 --            # the main job's defaults
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

ROOT = Path(__file__).resolve().parents[1]


def _simulate(overrides: list[str], run_dir: Path) -> dict:
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    cmd = [sys.executable, "-m", "fedmart", "simulate", *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    row = job_row(run_dir) or {}
    return {
        "run": str(run_dir),
        "test_ndcg@10": row.get("test_ndcg@10"),
        "test_hr@10": row.get("test_hr@10"),
        "selected_round": row.get("selected_round"),
        "max_node_epsilon": row.get("max_node_epsilon"),
        "seconds": round(time.perf_counter() - t0, 1),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("outputs") / f"repeat-{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    ap.add_argument("--skip-plain", action="store_true", help="no non-private twin")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = ap.parse_args()
    private = [_simulate(args.overrides, args.out / f"private-{i}") for i in range(args.repeats)]
    plain = None
    if not args.skip_plain:
        # The twin drops the private run's own privacy.* keys (a target epsilon means nothing without DP).
        shared = [o for o in args.overrides if not o.startswith("privacy.")]
        plain = _simulate([*shared, "privacy=none", "node.require_dp=false"], args.out / "non-private")
    scores = [r["test_ndcg@10"] for r in private]
    summary = {
        "overrides": args.overrides,
        "private": private,
        "non_private": plain,
        "mean_ndcg@10": statistics.mean(scores),
        "spread_ndcg@10": [min(scores), max(scores)],
        "stdev_ndcg@10": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
    }
    if plain is not None:
        base = plain["test_ndcg@10"]
        summary["ratio_mean"] = summary["mean_ndcg@10"] / base
        summary["ratio_spread"] = [min(scores) / base, max(scores) / base]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
