"""CPU cost of one whole secure-aggregation session in one process: semi-honest against active.

No Flower and no network: :func:`privacy.secagg.local_round.run_round_locally` plays every node
and the coordinator in turn, so the figure is the protocol's own CPU work a round (key
agreement, shares, masks, the active mode's checks), summed over all nodes, plus the
coordinator's. CPU time (``time.process_time``) rather than wall time, so that it holds on a
shared machine; the modes alternate, round by round, with the same inputs. Node identities
and channel keys persist across rounds (as a running node's do), so each channel-key certificate
is verified once.

    python bench/secagg_local.py --sizes 50x200000,10x1000000 --rounds 6 --out bench/results/secagg_local.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from privacy.secagg.identity import in_memory_identities
from privacy.secagg.key_agreement import new_channel_keypair
from privacy.secagg.local_round import run_round_locally

MODES = ("semi-honest", "active")


def measure(nodes: int, params: int, rounds: int, threshold: float) -> dict:
    rng = np.random.default_rng(0)
    inputs = {u: rng.integers(0, 2**16, params, dtype=np.uint32) for u in range(1, nodes + 1)}
    ids = in_memory_identities(sorted(inputs))
    channel = {u: new_channel_keypair() for u in inputs}  # long-lived, as a running node's
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds + 1):  # round 0 warms up (and verifies the channel certificates once)
        for mode in MODES if r % 2 else reversed(MODES):
            t = time.process_time()
            total, _ = run_round_locally(
                inputs,
                threshold=threshold,
                adversary=mode,
                identities=ids if mode == "active" else None,
                server_round=r + 1,
                channel=channel,
            )
            if r:
                cpu[mode].append(time.process_time() - t)
            assert int(total[0]) == int(sum(int(x[0]) for x in inputs.values()) % 2**32)
    med = {m: statistics.median(v) for m, v in cpu.items()}
    return {
        "nodes": nodes,
        "params": params,
        "rounds": rounds,
        "cpu_s": cpu,
        "median_cpu_s": med,
        "active_minus_semi_s": med["active"] - med["semi-honest"],
        "active_minus_semi_per_node_ms": 1000 * (med["active"] - med["semi-honest"]) / nodes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50x200000,10x1000000")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    results = []
    for size in a.sizes.split(","):
        n, d = (int(x) for x in size.split("x"))
        res = measure(n, d, a.rounds, a.threshold)
        results.append(res)
        m = res["median_cpu_s"]
        print(
            f"{n} x {d}: semi-honest {m['semi-honest']:.3f} s CPU, active {m['active']:.3f} s CPU a round "
            f"(+{res['active_minus_semi_s']:.3f} s, {res['active_minus_semi_per_node_ms']:.1f} ms a node)",
            flush=True,
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
        }
        a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
