"""Generator benchmark: time and peak memory to generate N synthetic interactions.

Usage: python bench/synthetic_bench.py [--events 10000000] [--items 100000]
Runs the generator in a fresh subprocess so the peak RSS is the generator's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(events: int, items: int, per_user: float) -> None:
    from clients.synthetic import generate
    from conf.settings import SyntheticSettings

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    catalog, inter = generate(
        SyntheticSettings(
            num_users=int(events / per_user),
            num_items=items,
            num_departments=10,
            num_merchants=1000,
            events_per_user=per_user,
            seed=0,
        )
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "events": len(inter),
                "users": inter.num_users,
                "items": catalog.num_items,
                "seconds": round(seconds, 2),
                "peak_rss_gib": round(peak / 2**20, 3),
                "rss_before_gib": round(base / 2**20, 3),
                "events_per_second": round(len(inter) / seconds),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--events-per-user", type=float, default=20.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.events, a.items, a.events_per_user)
        return
    cmd = [sys.executable, __file__, "--child", "--events", str(a.events), "--items", str(a.items),
           "--events-per-user", str(a.events_per_user)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    print(json.dumps(r, indent=1))
    ok_t, ok_m = r["seconds"] < 60, r["peak_rss_gib"] < 4
    print(f"goal <60 s: {'met' if ok_t else 'MISSED'}; goal <4 GiB: {'met' if ok_m else 'MISSED'}")


if __name__ == "__main__":
    main()
