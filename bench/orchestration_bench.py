"""Orchestration overhead of a simulated federation round, and federation at scale.

Two modes, each runs the real ``fedmart simulate`` in a subprocess and reads the run's
``metrics.jsonl``:

``overhead`` (default): N IID nodes on synthetic data. For every round after the first
(round 1 includes the actors' warm-up: imports, data loading, model construction),

    ratio = wall time of the train exchange / (Σ over nodes of local training seconds / concurrency)

where local training seconds are measured inside each node around its epoch loop, and
concurrency = the CPUs the simulation may use (2 here). Goal ≤ 1.25. The breakdown
reports node-side setup (weights in, model, loader), serialisation of the weights
(measured in-process on the same model size), the exchange remainder (scheduling and
in-memory transfer), aggregation and evaluation.

``scale``: 1,000 merchants (synthetic data with ≥ 10^6 interactions), 50 sampled per round,
3 rounds; peak memory of the whole process tree (driver + Ray workers, sampled every
0.5 s) and time per round.

Usage::

    python bench/orchestration_bench.py overhead --nodes 10 --rounds 4
    python bench/orchestration_bench.py scale
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

# Orchestration is measured without DP and on the recipe of its first measurement (small batches,
# whole local epochs, histories of 50): non-private by design, so the nodes' policy must say so.
NON_PRIVATE = ["privacy=none", "node=open", "train=default", "federation.local_steps=0", "data.max_len=50"]


def _run_simulate(run_dir: Path, overrides: list[str]) -> tuple[float, float]:
    """Run `fedmart simulate`; return (wall seconds, peak RSS GiB of the process tree)."""
    cmd = [sys.executable, "-m", "fedmart", "simulate", *overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
                procs = [root, *root.children(recursive=True)]
                # Ray's workers are not always children of the driver: count every ray:: process too.
                procs += [p for p in psutil.process_iter(["name", "cmdline"]) if _is_ray(p) and p not in procs]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak = max(peak, total / 2**30)
            except psutil.Error:
                pass
            stop.wait(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        sys.stderr.write(out[-5000:])
        raise SystemExit(f"simulate failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, peak


def _is_ray(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.info.get("cmdline") or [])
    except psutil.Error:
        return False
    return "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "ray/_private" in cmd


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _serialisation_seconds(overrides: list[str]) -> float:
    """Time to turn the model's weights into an ArrayRecord and back (one node, one direction each)."""
    from clients.app import arrays_to_numpy, numpy_to_arrays
    from federation.catalog import Catalog  # noqa: F401  (import cost outside the timing)
    from federation.globalmodel import get_weights
    from federation.model import SASRec, SASRecConfig

    items = next((int(o.split("=")[1]) for o in overrides if o.startswith("data.synthetic.num_items=")), 2000)
    w = get_weights(SASRec(SASRecConfig(num_items=items, max_len=50)))
    t0 = time.perf_counter()
    for _ in range(20):
        rec = numpy_to_arrays(w)
        arrays_to_numpy(rec)
    return (time.perf_counter() - t0) / 20


def overhead(args: argparse.Namespace) -> dict:
    overrides = [
        "partition=iid",
        f"partition.num_partitions={args.nodes}",
        f"data.synthetic.num_users={args.users}",
        f"federation.num_rounds={args.rounds}",
        "federation.central_eval=false",
        f"simulation.num_cpus={args.cpus}",
        "simulation.cpus_per_node=1",
        f"secagg={'on' if args.secagg else 'off'}",
        *NON_PRIVATE,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        wall, peak = _run_simulate(run_dir, overrides)
        rows = _rows(run_dir)
    per_round = []
    for r in rows:
        nodes = r["node_metrics"].values()
        train = sum(m["train_seconds"] for m in nodes)
        setup = sum(m["setup_seconds"] for m in nodes)
        exchange = r["seconds"]["train_exchange"]
        per_round.append(
            {
                "round": r["round"],
                "exchange_s": round(exchange, 2),
                "node_train_s_sum": round(train, 2),
                "node_setup_s_sum": round(setup, 2),
                "ideal_s": round(train / args.cpus, 2),
                "ratio": round(exchange / (train / args.cpus), 3),
                "aggregate_s": round(r["seconds"]["aggregate"], 3),
                "federated_eval_s": round(r["seconds"]["federated_eval"], 2),
            }
        )
    steady = [p for p in per_round if p["round"] > 1] or per_round
    ser = _serialisation_seconds(overrides)
    return {
        "mode": "overhead",
        "nodes": args.nodes,
        "cpus": args.cpus,
        "secagg": args.secagg,
        "users": args.users,
        "rounds": per_round,
        "steady_ratio_mean": round(statistics.mean(p["ratio"] for p in steady), 3),
        "steady_breakdown_mean_s": {
            "exchange_wall": round(statistics.mean(p["exchange_s"] for p in steady), 2),
            "ideal_training_wall (Σ node training / cpus)": round(statistics.mean(p["ideal_s"] for p in steady), 2),
            "node_setup_per_round (Σ / cpus)": round(
                statistics.mean(p["node_setup_s_sum"] for p in steady) / args.cpus, 2
            ),
            "serialisation_per_node_both_ways": round(2 * ser, 4),
            "aggregation": round(statistics.mean(p["aggregate_s"] for p in steady), 3),
            "federated_evaluation": round(statistics.mean(p["federated_eval_s"] for p in steady), 2),
        },
        "total_wall_s": round(wall, 1),
        "peak_rss_gib": round(peak, 2),
    }


def scale(args: argparse.Namespace) -> dict:
    overrides = [
        "partition=merchant",
        f"data.synthetic.num_users={args.users}",
        f"data.synthetic.num_merchants={args.merchants}",
        "data.synthetic.num_items=20000",
        f"federation.num_rounds={args.rounds}",
        f"federation.fraction_train={args.sampled / args.merchants}",
        f"federation.fraction_evaluate={args.sampled / args.merchants}",
        f"federation.min_train_nodes={args.sampled}",
        f"federation.min_evaluate_nodes={args.sampled}",
        "federation.central_eval_users=2000",
        f"simulation.num_cpus={args.cpus}",
        "secagg=off",  # the engine at 1,000 nodes is measured here; secure rounds: bench/secagg_bench.py
        *NON_PRIVATE,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        wall, peak = _run_simulate(run_dir, overrides)
        rows = _rows(run_dir)
        nodes = json.loads((run_dir / "nodes.json").read_text())
    return {
        "mode": "scale",
        "merchants_with_data": len(nodes),
        "interactions": sum(n["events"] for n in nodes),
        "sampled_per_round": [len(r["sampled"]) for r in rows],
        "round_seconds": [round(r["seconds"]["total"], 1) for r in rows],
        "central_test_ndcg@10": [round(r["central_eval"].get("test_ndcg@10", float("nan")), 4) for r in rows],
        "total_wall_s": round(wall, 1),
        "peak_rss_gib_process_tree": round(peak, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    o = sub.add_parser("overhead")
    o.add_argument("--nodes", type=int, default=10)
    o.add_argument("--rounds", type=int, default=4)
    o.add_argument("--users", type=int, default=20000)
    o.add_argument("--cpus", type=int, default=2)
    o.add_argument("--secagg", action="store_true", help="with secure aggregation (default: plain FedAvg)")
    s = sub.add_parser("scale")
    s.add_argument("--merchants", type=int, default=1000)
    s.add_argument("--sampled", type=int, default=50)
    s.add_argument("--users", type=int, default=50000)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    if args.mode is None:
        args = p.parse_args(["overhead"])
    result = overhead(args) if args.mode == "overhead" else scale(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
