"""Secure aggregation in fedmart's real round: ``fedmart simulate`` plain, semi-honest and active.

``bench/secagg_bench.py`` measures the protocol on a round whose "training" is a vectorised
add, which is the worst case for the ratio. This script measures what a user of fedmart
pays: the same federation (same data, seeds, model, local training) run without secure
aggregation, with its ``semi-honest`` mode and with its ``active`` mode (the default), through
the real CLI in a subprocess each, arms interleaved.
The model's size is set through the catalog: SASRec (2 x 64) has about 1.0M trainable
parameters with 7,000 items and 0.19M with 700.

Sizes (``--sizes``):

``10x1M``    the default synthetic world with 7,000 items, 10 department nodes;
``50x200k``  700 items, the 50 merchants as nodes (merchant silos).

Reported per arm (median of rounds 2..N; round 1 starts Ray and advertises channel keys):
the training round = ``configure`` (secure aggregation's key stages when not pipelined) +
``train_exchange`` (instructions out, local training, masked updates back) + ``aggregate``
(the unmask stage, decoding, FedAvg); evaluation is off (``fraction_evaluate=0`` and
central evaluation only after the last round), since it is the same in both arms.

    python bench/secagg_real.py                                  # both sizes, 4 rounds, 2 reps
    python bench/secagg_real.py --sizes 10x1M --rounds 5 --reps 1 --out bench/results/secagg_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "10x1M": ["data.synthetic.num_items=7000", "partition=department"],
    "50x200k": ["data.synthetic.num_items=700", "partition=merchant"],
}
ARMS = {
    "off": ["secagg=off"],
    "semi-honest": ["secagg=on", "secagg.adversary=semi-honest", "node.secagg_threat_model=semi-honest"],
    "active": ["secagg=on", "secagg.adversary=active"],
}


def run(size: str, arm: str, rounds: int, workdir: Path) -> dict:
    out_dir = workdir / f"{size}-{arm}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        "fedmart",
        "simulate",
        *SIZES[size],
        *ARMS[arm],
        # Non-private in both arms (only the aggregation path differs), on the recipe of its first
        # measurement; the nodes' policy must allow the unmasked arm.
        "privacy=none",
        "node=open",
        "train=default",
        "federation.local_steps=0",
        "data.max_len=50",
        "data.synthetic.num_users=20000",
        f"federation.num_rounds={rounds}",
        "federation.fraction_evaluate=0",
        f"federation.eval_every={rounds}",
        f"hydra.run.dir={out_dir}",
    ]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = [r for r in rows if r["round"] > 1]

    def med(key: str) -> float:
        return statistics.median(float(r["seconds"].get(key, 0.0)) for r in later)

    train_round = [
        sum(float(r["seconds"].get(k, 0.0)) for k in ("configure", "train_exchange", "aggregate")) for r in later
    ]
    return {
        "size": size,
        "arm": arm,
        "round_s": statistics.median(train_round),
        "rounds_s": train_round,
        "configure_s": med("configure"),
        "train_exchange_s": med("train_exchange"),
        "aggregate_s": med("aggregate"),
        "node_train_s": statistics.median(
            sum(float(m.get("train_seconds", 0.0)) for m in r.get("node_metrics", {}).values()) for r in later
        ),
        "nodes": len(rows[-1].get("node_metrics", {})),
        "final_test_ndcg@10": rows[-1].get("central_eval", {}).get("test_ndcg@10"),
        "wall_s": time.perf_counter() - t0,
        "load1": [load0, os.getloadavg()[0]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="repetitions; arms interleaved, order rotated per rep")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench-secagg-real")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results: list[dict] = []
    meta = {
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "argv": vars(args),
    }

    def save() -> None:
        # Written after every run: an hour of measurements must survive an interrupted session.
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))

    for size in args.sizes.split(","):
        for rep in range(args.reps):
            arms = [a for a in args.arms.split(",") if a]
            if not set(arms) <= set(ARMS):
                raise SystemExit(f"--arms: unknown arm in {args.arms!r}; choose from {','.join(ARMS)}")
            for arm in arms[rep % len(arms) :] + arms[: rep % len(arms)]:  # order rotated per rep
                r = run(size, arm, args.rounds, args.workdir) | {"rep": rep}
                results.append(r)
                save()
                print(
                    f"{size:<8} {arm:<11} rep {rep}: round {r['round_s']:.2f}s (configure {r['configure_s']:.3f}, "
                    f"train exchange {r['train_exchange_s']:.2f}, aggregate {r['aggregate_s']:.3f}); "
                    f"test NDCG@10 {r['final_test_ndcg@10']}; load {r['load1'][0]:.1f}-{r['load1'][1]:.1f}",
                    flush=True,
                )
        ran = [a for a in ARMS if any(r["size"] == size and r["arm"] == a for r in results)]
        rows = {a: [r for r in results if r["size"] == size and r["arm"] == a] for a in ran}
        per = {a: [r["round_s"] for r in rows[a]] for a in ran}
        med = {a: statistics.median(v) for a, v in per.items()}
        for arm in ran:
            print(f"{size:<8} {arm:<11} round median {med[arm]:.2f}s, spread {min(per[arm]):.2f}-{max(per[arm]):.2f}s")
        for arm in [a for a in ("semi-honest", "active") if a in ran and "off" in ran]:
            # Paired by repetition too: the arms of one rep ran back to back, so their ratio is
            # less exposed to load drifting over the hour than the ratio of medians.
            paired = [a / b for a, b in zip(per[arm], per["off"], strict=True)]
            print(
                f"{size:<8} {arm} / plain round: {med[arm] / med['off']:.3f}x ({med[arm]:.2f}s / {med['off']:.2f}s); "
                f"paired per rep median {statistics.median(paired):.3f}x, spread {min(paired):.3f}-{max(paired):.3f}x"
            )
        if {"active", "semi-honest"} <= set(ran):
            diffs = [a - b for a, b in zip(per["active"], per["semi-honest"], strict=True)]
            print(
                f"{size:<8} active - semi-honest: {med['active'] - med['semi-honest']:+.3f}s per round; "
                f"paired per rep median {statistics.median(diffs):+.3f}s, spread {min(diffs):+.3f}-{max(diffs):+.3f}s"
            )
            # The protocol's part: the round less the nodes' training spread over the machine's
            # cores (local training varies run to run by more than the protocol costs).
            cores = os.cpu_count() or 1
            pd = [
                (a["round_s"] - a["node_train_s"] / cores) - (b["round_s"] - b["node_train_s"] / cores)
                for a, b in zip(rows["active"], rows["semi-honest"], strict=True)
            ]
            print(
                f"{size:<8} active - semi-honest, protocol part (round - node training / {cores} cores): paired "
                f"median {statistics.median(pd):+.3f}s, spread {min(pd):+.3f}-{max(pd):+.3f}s"
            )
    save()


if __name__ == "__main__":
    main()
