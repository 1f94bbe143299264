"""Fingerprint of a run's results: SHA-256 of ``metrics.jsonl`` without timings, and of the final weights.

Two runs with the same fingerprint computed the same thing bit for bit: every metric, every
per-node number and every weight. What depends on the wall clock is left out: any key
ending in ``seconds``, and the order of the node lists (``replied`` is in arrival order).
Used to show that a refactoring changed no behaviour::

    fedmart simulate hydra.run.dir=/tmp/a && python bench/run_fingerprint.py /tmp/a
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

_ARRIVAL_ORDER = ("replied", "sampled", "timed_out")


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: sorted(v) if k in _ARRIVAL_ORDER and isinstance(v, list) else _strip(v)
            for k, v in obj.items()
            if not k.endswith("seconds")
        }
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def fingerprint(run: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    rows = [_strip(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    weights = load_file(str(run / "state" / "global.safetensors"))
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].tobytes())
    last = rows[-1] if rows else {}
    ndcg = (last.get("central_eval") or last.get("federated_eval") or {}).get("test_ndcg@10")
    return {
        "metrics_sha256": metrics,
        "weights_sha256": h.hexdigest(),
        "rounds": str(len(rows)),
        "test_ndcg@10": str(ndcg),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, nargs="+", help="run directories (outputs/<run>)")
    args = p.parse_args()
    for run in args.run:
        print(json.dumps({"run": str(run), **fingerprint(run)}))


if __name__ == "__main__":
    main()
