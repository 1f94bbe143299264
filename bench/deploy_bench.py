"""Round time of the deployed federation against the simulated one, for the same config.

Both arms run the real CLI in subprocesses on the same silos:

``simulated``: ``fedmart simulate`` (Flower's simulation engine, Ray, 2 nodes at a time);
``deployed``: ``fedmart coordinate`` (a SuperLink with TLS and SuperNode authentication,
the ServerApp in Flower's subprocess isolation) plus one ``fedmart node`` per silo (a
SuperNode, the ClientApp warm in the node's own process), all on 127.0.0.1.

The deployed nodes read the very partitions ``fedmart simulate`` wrote (``nodes/node-XXXX``
with ``interactions.npz``), so both arms train on the same data with the same seeds.
Per round it reads the ServerApp's own timings from ``metrics.jsonl`` (configure = secure
aggregation's key stages, train exchange, aggregate = unmasking, federated evaluation),
and the whole command's wall time.

``--what-if-fast-polling`` adds a third arm, an experiment and not a fedmart setting: the
deployed run again with Flower's fixed waits shortened in every Flower process (a
``sitecustomize`` on ``PYTHONPATH``): the SuperNode's 3 s sleep when it finds no message
(capped at 0.2 s) and the 1 s -> 10 s backoff for a message object not uploaded yet
(0.05 s -> 0.5 s). It shows how much of the deployed round is Flower's polling.

Usage::

    python bench/deploy_bench.py --rounds 3 [--what-if-fast-polling]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "fedmart"]
CONFIG = [
    "data.synthetic.num_users=300",
    "data.synthetic.num_items=100",
    "data.synthetic.num_departments=3",
    "data.synthetic.num_merchants=6",
    "data.max_len=20",
    "model.hidden=16",
    "model.heads=1",
    "privacy=dp",
    "secagg=on",
    "train=default",  # small batches, whole local epochs: the recipe of its first measurement
    "federation.local_steps=0",
    "federation.central_eval=false",
    "federation.round_timeout=300",
]
STAGES = ("configure", "train_exchange", "aggregate", "federated_eval", "total")
FAST_POLLING = """
import time as _time
try:
    from flwr.supercore.inflatable import inflatable_utils as _u
    for _f in (_u.pull_objects, _u.pull_and_inflate_object_from_tree):
        _f.__kwdefaults__.update(initial_backoff=0.05, backoff_cap=0.5)
    import flwr.supernode.start_client_internal as _s

    class _Time:
        def __getattr__(self, name):
            return getattr(_time, name)

        @staticmethod
        def sleep(seconds):
            _time.sleep(min(seconds, 0.2))

    _s.time = _Time()
except Exception:
    pass
"""


def _load() -> float:
    return os.getloadavg()[0]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def simulated(base: Path, rounds: int) -> tuple[float, list[dict], Path]:
    run_dir = base / "sim"
    t0 = time.perf_counter()
    subprocess.run(
        [*CLI, "simulate", *CONFIG, f"federation.num_rounds={rounds}", f"hydra.run.dir={run_dir}"],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0, _rows(run_dir), run_dir


def deployed(
    base: Path, rounds: int, sim_dir: Path, arm: str = "dep", fast: bool = False, env_extra: dict | None = None
) -> tuple[float, list[dict]]:
    from fedmart.supervise import free_port

    nodes = sorted((sim_dir / "nodes").glob("node-*"))
    names = [json.loads((n / "node.json").read_text())["name"].lower().replace(" ", "") for n in nodes]
    subprocess.run([*CLI, "certs", "--out", "certs", "--node-keys", ",".join(names)], cwd=base, check=True,
                   capture_output=True)  # fmt: skip
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    if fast:
        patch = base / "fast-polling"
        patch.mkdir(exist_ok=True)
        (patch / "sitecustomize.py").write_text(FAST_POLLING)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(patch), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    coord = subprocess.Popen(
        [*CLI, "coordinate", *CONFIG, f"federation.num_rounds={rounds}", "deploy.certs=certs", f"deploy.port={port}",
         f"deploy.catalog={sim_dir / 'catalog.parquet'}", f"hydra.run.dir=outputs/{arm}",
         f"deploy.database=outputs/{arm}-db/state.db"],
        cwd=base, env=env, stdout=open(base / f"{arm}.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )  # fmt: skip
    while "SuperLink on" not in (base / f"{arm}.log").read_text():
        if coord.poll() is not None:
            raise RuntimeError((base / f"{arm}.log").read_text()[-2000:])
        time.sleep(0.5)
    procs = []
    for node_dir, name in zip(nodes, names, strict=True):
        procs.append(
            subprocess.Popen(
                [
                    *CLI,
                    "node",
                    "--data",
                    str(node_dir),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--root-cert",
                    "certs/ca.pem",
                    "--auth-key",
                    f"certs/nodes/{name}.key",
                    "--max-epsilon",
                    "1000",
                ],
                cwd=base,
                env=env,
                stdout=open(base / f"{arm}-{name}.log", "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
    try:
        rc = coord.wait(timeout=3600)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError((base / f"{arm}.log").read_text()[-2000:])
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    return wall, _rows(base / "outputs" / arm)


def _table(label: str, wall: float, rows: list[dict], load: tuple[float, float]) -> None:
    later = rows[1:] or rows
    print(f"\n{label}: wall {wall:.0f} s for {len(rows)} rounds (load avg {load[0]:.1f} -> {load[1]:.1f})")
    print("| stage | round 1 | median of rounds 2.. |")
    print("|---|---:|---:|")
    for stage in STAGES:
        first = rows[0]["seconds"][stage]
        med = statistics.median(r["seconds"][stage] for r in later)
        print(f"| {stage} | {first:.1f} | {med:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--what-if-fast-polling", action="store_true", help="add the experiment arm (see the docstring)")
    p.add_argument("--what-if-concurrency", type=int, default=0, help="add an arm with N concurrent object transfers")
    p.add_argument("--skip-default", action="store_true", help="run only the simulated and the what-if arms")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        base = Path(tmp)
        l0 = _load()
        sim_wall, sim_rows, sim_dir = simulated(base, args.rounds)
        l1 = _load()
        _table("simulated (fedmart simulate)", sim_wall, sim_rows, (l0, l1))
        l2 = l1
        if not args.skip_default:
            dep_wall, dep_rows = deployed(base, args.rounds, sim_dir)
            l2 = _load()
            _table("deployed (fedmart coordinate + fedmart node x3)", dep_wall, dep_rows, (l1, l2))
            same = [a["train_metrics"].get("train_loss") == b["train_metrics"].get("train_loss")
                    for a, b in zip(sim_rows, dep_rows, strict=True)]  # fmt: skip
            print(f"\nsame training loss per round in both arms: {same}")
        if args.what_if_concurrency:
            n = str(args.what_if_concurrency)
            extra = {"FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": n, "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": n}
            conc_wall, conc_rows = deployed(base, args.rounds, sim_dir, arm="dep-conc", env_extra=extra)
            _table(f"deployed, {n} concurrent object transfers (experiment)", conc_wall, conc_rows, (l2, _load()))
        if args.what_if_fast_polling:
            fast_wall, fast_rows = deployed(base, args.rounds, sim_dir, arm="dep-fast", fast=True)
            _table("deployed, Flower's fixed waits shortened (experiment)", fast_wall, fast_rows, (l2, _load()))


if __name__ == "__main__":
    main()
