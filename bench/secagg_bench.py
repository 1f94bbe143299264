"""Cost of secure aggregation: one federated round without it, with Flower's SecAgg+, with fedmart's.

Every arm runs in Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend,
one CPU per ClientApp actor, so two nodes run at once on a 2-core machine), in its own
subprocess, with the same tiny numpy "training" (``new = global + 1e-3 * (pid + 1)``: a
vectorised add, so the numbers are the cost of the round's protocol, not of learning):

``none``             Message API ``FedAvg`` (what fedmart runs with ``secagg=off``);
``flower-legacy``    Flower's legacy path without secure aggregation (``DefaultWorkflow`` +
                     ``NumPyClient``): the baseline of the next arm's own machinery;
``flower-secagg+``   Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) on that path;
``fedmart``          ``SecAggStrategy(FedAvg)`` + ``secagg_mod`` (``privacy/secagg``), semi-honest mode;
``fedmart-active``   the same in the active-adversary mode (the default of ``fedmart simulate``):
                     each node holds a roster identity (the seed-derived demo roster of ``flwr run .``),
                     authenticates its keys to its peers, checks theirs, a threshold above 2n/3;
``fedmart-nopipe``   the same with ``pipeline=False`` (a separate share-keys exchange every round);
``none-echo``        ``none`` plus one exchange of empty messages with every node after the
                     aggregation (polled like fedmart's unmask stage): the engine's price of
                     one more exchange, the floor under any protocol that needs a second one.

Timing is the same for every arm: the wall-clock time of one *fit round* in the ServerApp
(Message API: ``configure_train`` entry to ``aggregate_train`` exit; legacy: the fit workflow
call, which contains ``configure_fit`` .. ``aggregate_fit``), and per stage the wall-clock
time of each exchange with the nodes (``send_and_receive``, or push..last pull), i.e. the
messages there and back plus the nodes' work. Round 1 starts Ray's actors (and, for
fedmart, advertises channel keys once), so it is reported apart; the table shows the median
(and mean) over the later rounds of all runs of an arm (``--reps`` processes per arm,
interleaved). Before each round the ServerApp waits a random, untimed 0..0.1 s so that rounds
do not lock onto one phase of the engine's 0.1 s timers (``--no-dephase`` turns it off).
Both secure arms use the complete graph (every node a neighbour of every other) unless a
size names ``:K``, threshold 1/2, 16-bit quantisation, modulus 2**32, max weight 1000.

``--micro`` also times, in one process and without Flower's engine, the per-node masking work
of both implementations (quantise + one self mask + n-1 pairwise masks) for the same sizes.

    python bench/secagg_bench.py                               # both sizes, all arms, 4 rounds
    python bench/secagg_bench.py --sizes 10x1000000 --rounds 5 --micro
    python bench/secagg_bench.py --sizes 10x1000000,50x200000:12 --arms none,none-echo,fedmart --rounds 21 --reps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("none", "none-echo", "flower-legacy", "flower-secagg+", "fedmart", "fedmart-active", "fedmart-nopipe")
THRESHOLD = 0.5
CLIP, BITS, MAX_WEIGHT = 0.5, 16, 1000


# ----------------------------------------------------------------------------- one arm (subprocess)
def shorten_engine_tick(tick: float) -> None:
    """Make Flower's simulation engine dispatch and collect messages every ``tick`` seconds.

    Flower 1.41's engine moves pushed messages to its workers on a fixed 0.1 s timer
    (``vce_api.add_messages_to_queue``) and ``InMemoryGrid.send_and_receive`` pulls replies
    every 0.1 s, so every exchange waits ~0.05 s for the first timer and up to 0.1 s for the
    second, whatever it carries. This replaces both timers for **every arm alike**, to show
    what the protocols themselves cost once the engine's fixed waits are out of the way.
    """
    import threading

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    def dispatch(state, queue, nodes_mapping, f_stop: threading.Event) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(tick)

    vce_api.add_messages_to_queue = dispatch
    InMemoryGrid.__init__.__defaults__ = (tick,)


def run_arm(
    arm: str, nodes: int, params: int, rounds: int, neighbours: int = 0, tick: float = 0.0, dephase: bool = True
) -> dict:
    """Run ``rounds`` rounds of one arm in Flower's simulation engine; return the timings.

    ``tick > 0`` shortens the engine's two 0.1 s timers (:func:`shorten_engine_tick`).
    ``dephase`` waits a random 0..0.1 s (untimed) before each round: the engine's timers
    tick every 0.1 s regardless of the rounds, and back-to-back rounds lock onto one phase
    of them that depends on the arm's own stage timings, which biases a comparison of arms
    by up to a whole tick per exchange. Real rounds are separated by evaluation and
    checkpointing, so a random phase is also the realistic case.
    """
    import random

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    if tick > 0:
        shorten_engine_tick(tick)
    timings: dict = {"rounds": [], "stages": []}  # stages: (round, label, seconds)
    state = {"round": 0}

    class TimedGrid(Grid):
        """Delegates to the engine's grid; times each exchange with the nodes."""

        def __init__(self, inner: Grid) -> None:
            self.inner = inner
            self._pushed: dict[str, tuple[str, float]] = {}

        def set_run(self, run):
            return self.inner.set_run(run)

        @property
        def run(self):
            return self.inner.run

        def create_message(self, *a, **k):
            return self.inner.create_message(*a, **k)

        def get_node_ids(self):
            return self.inner.get_node_ids()

        def get_nodes(self):
            return self.inner.get_nodes()

        def push_messages(self, messages):
            messages = list(messages)
            label, t0 = _label(messages[0]) if messages else "?", time.perf_counter()
            ids = list(self.inner.push_messages(messages))
            for i in ids:
                self._pushed[i] = (label, t0)
            self._open = {"label": label, "t0": t0, "ids": set(ids)}
            return ids

        def pull_messages(self, message_ids):
            out = list(self.inner.pull_messages(message_ids))
            if out and getattr(self, "_open", None):
                self._open["ids"] -= {m.metadata.reply_to_message_id for m in out}
                self._open["t_last"] = time.perf_counter()
                if not self._open["ids"]:
                    self._close()
            return out

        def _close(self) -> None:
            o, self._open = self._open, None
            timings["stages"].append((state["round"], o["label"], o.get("t_last", time.perf_counter()) - o["t0"]))

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if not messages:
                return []
            label, t0 = _label(messages[0]), time.perf_counter()
            out = list(self.inner.send_and_receive(messages, timeout=timeout))
            timings["stages"].append((state["round"], label, time.perf_counter() - t0))
            self._open = None
            return out

    def _label(msg: Message) -> str:
        c = msg.content
        for key in ("secagg", "secaggplus_configs", "echo"):
            if key in c.config_records:
                return str(c.config_records[key]["stage"])
        return msg.metadata.message_type

    def wait(grid: Grid) -> None:
        while len(list(grid.get_node_ids())) < nodes:
            time.sleep(0.1)

    def delta(pid: int) -> float:
        return 1e-3 * (pid + 1)

    init = np.zeros(params, np.float32)

    if arm in ("none", "none-echo", "fedmart", "fedmart-active", "fedmart-nopipe"):
        from flwr.serverapp.strategy import FedAvg

        from privacy.secagg import SecAggConfig, SecAggStrategy, secagg_mod
        from privacy.secagg.mod import make_secagg_mod

        mod = secagg_mod
        if arm == "fedmart-active":
            # Each node's roster identity, made in the node's own process (keys do not pickle to
            # Ray's actors): `flwr run .`'s demo roster, derived from a seed, cached per actor.
            from clients.node_policy import demo_identity

            cache: dict = {}

            def identity_of(ctxt: Context):
                pid = int(ctxt.node_config["partition-id"])
                if pid not in cache:
                    cache[pid] = demo_identity(0, nodes, pid, "active")
                return cache[pid]

            mod = make_secagg_mod(identity_of)
        client = ClientApp(mods=[mod] if arm.startswith("fedmart") else [])

        @client.train()
        def train(msg: Message, context: Context) -> Message:
            if "echo" in msg.content.config_records:
                return Message(RecordDict({"echo": msg.content.config_records["echo"]}), reply_to=msg)
            pid = int(context.node_config["partition-id"])
            w = msg.content["arrays"]["w"].numpy() + np.float32(delta(pid))
            metrics = MetricRecord({"num-examples": 10 * (pid + 1)})
            return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": metrics}), reply_to=msg)

        def timed(cls: type) -> type:
            class Timed(cls):
                def configure_train(self, server_round, arrays, config, grid):
                    state["round"] = server_round
                    if dephase:
                        time.sleep(random.uniform(0.0, 0.1))
                    self._t0 = time.perf_counter()
                    self._grid = grid
                    return super().configure_train(server_round, arrays, config, grid)

                def aggregate_train(self, server_round, replies):
                    replies = list(replies)
                    out = super().aggregate_train(server_round, replies)
                    if arm == "none-echo":
                        echo(self._grid, [r.metadata.src_node_id for r in replies], server_round)
                    timings["rounds"].append(time.perf_counter() - self._t0)
                    report = getattr(self, "last_report", None)
                    if report is not None:
                        timings.setdefault("reports", []).append(report.seconds)
                    return out

            return Timed

        def echo(grid: Grid, node_ids: list[int], server_round: int) -> None:
            """One exchange of empty messages, polled as a secure-aggregation stage polls (stage_exchange)."""
            from privacy.secagg.stage_exchange import POLL_FIRST, POLL_MAX

            messages = [
                Message(
                    RecordDict({"echo": ConfigRecord({"stage": "echo"})}),
                    dst_node_id=n,
                    message_type="train",
                    group_id=str(server_round),
                )
                for n in node_ids
            ]
            pending, pause = set(grid.push_messages(messages)), POLL_FIRST
            while pending:
                for r in grid.pull_messages(pending):
                    pending.discard(r.metadata.reply_to_message_id)
                if pending:
                    time.sleep(pause)
                    pause = min(2 * pause, POLL_MAX)

        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            grid = TimedGrid(grid)
            wait(grid)
            fedavg = FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes)
            if arm.startswith("fedmart"):
                cfg = SecAggConfig(
                    enabled=True,
                    adversary="active" if arm == "fedmart-active" else "semi-honest",
                    threshold=THRESHOLD,
                    clip_range=CLIP,
                    bits=BITS,
                    max_weight=MAX_WEIGHT,
                    max_nodes=max(nodes, 2),
                    neighbours=neighbours,
                    timeout=600,
                )
                strategy = timed(SecAggStrategy)(fedavg, config=cfg, pipeline=arm in ("fedmart", "fedmart-active"))
            else:
                strategy = timed(FedAvg)(fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes)
            result = strategy.start(grid, ArrayRecord({"w": Array(init)}), num_rounds=rounds, timeout=3600)
            timings["final_mean"] = float(result.arrays["w"].numpy().mean())

    else:
        from flwr.client import NumPyClient
        from flwr.client.mod import secaggplus_mod
        from flwr.common import ndarrays_to_parameters
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.strategy import FedAvg as LegacyFedAvg
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
        from flwr.server.workflow.default_workflows import default_fit_workflow

        class Node(NumPyClient):
            def __init__(self, pid: int) -> None:
                self.pid = pid

            def fit(self, parameters, config):
                return [parameters[0] + np.float32(delta(self.pid))], 10 * (self.pid + 1), {}

        def client_fn(context: Context):
            return Node(int(context.node_config["partition-id"])).to_client()

        client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if arm == "flower-secagg+" else [])

        if arm == "flower-secagg+":
            base = SecAggPlusWorkflow(
                num_shares=neighbours + 1 if neighbours else 1.0,  # shares = neighbours + self; 1.0 = all
                reconstruction_threshold=THRESHOLD,
                max_weight=MAX_WEIGHT,
                clipping_range=CLIP,
                quantization_range=2**BITS,
                modulus_range=2**32,
                timeout=600,
            )
        else:
            base = default_fit_workflow

        def fit_workflow(grid: Grid, context) -> None:
            state["round"] = int(context.state.config_records["config"]["current_round"])
            if dephase:
                time.sleep(random.uniform(0.0, 0.1))
            t0 = time.perf_counter()
            base(grid, context)
            timings["rounds"].append(time.perf_counter() - t0)

        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            grid = TimedGrid(grid)
            wait(grid)
            strategy = LegacyFedAvg(
                fraction_fit=1.0,
                fraction_evaluate=0.0,
                min_fit_clients=nodes,
                min_available_clients=nodes,
                initial_parameters=ndarrays_to_parameters([init]),
            )
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
            DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)

    run_simulation(server, client, num_supernodes=nodes, backend_config={"client_resources": {"num_cpus": 1}})
    return timings


# ----------------------------------------------------------------------------- micro: per-node masking
def micro(nodes: int, params: int, reps: int = 3) -> dict:
    """Per-node masking work of each implementation, in this process, no engine."""

    import numpy as np
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from privacy.secagg.crypto import add_masks
    from privacy.secagg.encoding import EncodingParams, encode

    x = np.random.default_rng(0).normal(0, 0.01, params).astype(np.float32)
    seeds = [os.urandom(32) for _ in range(nodes)]
    p = EncodingParams(clip_range=CLIP, bits=BITS, max_weight=MAX_WEIGHT, max_nodes=max(nodes, 2))

    def ours() -> None:
        y = encode(x, 10, p)
        add_masks(y, seeds, [1] + [(-1) ** i for i in range(nodes - 1)])

    def flower() -> None:
        q = quantize([x * 10], CLIP, 2**BITS)
        for s in seeds:  # self mask + n-1 pairwise masks, as in secaggplus_mod
            m = pseudo_rand_gen(s, 2**32, [(params,)])
            q = [np.mod(q[0] + m[0], 2**32)]

    out = {}
    for name, fn in (("fedmart", ours), ("flower-secagg+", flower)):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = min(ts)
    return out


# ----------------------------------------------------------------------------- driver
def _summary(t: dict, arm: str) -> dict:
    rounds = t["rounds"]
    later = rounds[1:] if len(rounds) > 1 else rounds
    stages: dict[str, list[float]] = {}
    for r, label, sec in t["stages"]:
        if r > 1:
            stages.setdefault(label, []).append(sec)
    return {
        "arm": arm,
        "round1_s": rounds[0] if rounds else None,
        "round_s": statistics.median(later) if later else None,
        # rounds move in steps of the engine's 0.1 s timers, so the median can flip between
        # two steps from run to run; the mean is steadier
        "round_mean_s": statistics.fmean(later) if later else None,
        "rounds_s": rounds,
        "stages_s": {k: statistics.median(v) for k, v in stages.items()},
        "reports": t.get("reports"),
    }


def _parse_size(size: str) -> tuple[int, int, int]:
    """``NODESxPARAMS[:K]`` -> (nodes, params, neighbours); K = 0 is the complete graph."""
    dims, _, k = size.partition(":")
    nodes, params = (int(v) for v in dims.split("x"))
    return nodes, params, int(k or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes",
        default="10x1000000,50x200000,50x200000:12",
        help="comma-separated NODESxPARAMS[:K], K = neighbours of the SecAgg+ graph (default 0 = complete)",
    )
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run; the first is reported apart")
    ap.add_argument(
        "--engine-tick",
        type=float,
        default=0.0,
        help="seconds; replace the engine's fixed 0.1 s dispatch and pull timers in every arm (0 = Flower's)",
    )
    ap.add_argument(
        "--no-dephase",
        action="store_true",
        help="start each round right after the last (default: after a random, untimed 0-0.1 s wait)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=1,
        help="runs (processes) per arm, interleaved arm by arm; the plain round's pace differs from one "
        "process to the next by up to 1.6x at 10 x 1M, so ratios need several",
    )
    ap.add_argument("--micro", action="store_true", help="also time the per-node masking work in-process")
    ap.add_argument("--out", type=Path, default=None, help="write all results as JSON")
    ap.add_argument("--_arm", help=argparse.SUPPRESS)
    ap.add_argument("--_size", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._arm:  # child process: one arm, JSON on the last stdout line
        logging.disable(logging.WARNING)
        nodes, params, k = _parse_size(args._size)
        print(json.dumps(run_arm(args._arm, nodes, params, args.rounds, k, args.engine_tick, not args.no_dephase)))
        return

    results = []
    for size in args.sizes.split(","):
        nodes, params, k = _parse_size(size)
        for rep, arm in ((rep, arm) for rep in range(args.reps) for arm in args.arms.split(",")):
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            proc = subprocess.run(
                [
                    *(sys.executable, __file__, "--_arm", arm, "--_size", size),
                    *("--rounds", str(args.rounds), "--engine-tick", str(args.engine_tick)),
                    *(("--no-dephase",) if args.no_dephase else ()),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(f"{size} {arm}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            timings = json.loads(proc.stdout.strip().splitlines()[-1])
            s = _summary(timings, arm) | {
                "nodes": nodes,
                "params": params,
                "neighbours": k,
                "engine_tick_s": args.engine_tick or 0.1,
                "dephased": not args.no_dephase,
                "rep": rep,
                "wall_s": time.perf_counter() - t0,
                "load1": [load0, os.getloadavg()[0]],
            }
            results.append(s)
            stages = ", ".join(f"{k} {v:.3f}" for k, v in s["stages_s"].items())
            head = f"{nodes:>3} x {params:>8} k={k:<2} {arm:<15}"
            load = "load {:.1f}-{:.1f}".format(*s["load1"])
            print(f"{head} round1 {s['round1_s']:7.2f}s  round {s['round_s']:6.3f}s  [{stages}] {load}", flush=True)
        if args.micro:
            m = micro(nodes, params)
            results.append({"nodes": nodes, "params": params, "micro_s": m})
            print(
                f"{nodes:>3} x {params:>8} per-node masking: "
                + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m.items())
            )

    pooled = _pool(results)
    base = {key[:2]: p for key, p in pooled.items() if key[2] == "none"}
    for (nodes, params, arm), p in pooled.items():
        if (nodes, params) in base:
            b = base[(nodes, params)]
            print(
                f"{nodes:>3} x {params:>8} {arm:<15} {p['round_s'] / b['round_s']:.2f}x plain (median), "
                f"{p['round_mean_s'] / b['round_mean_s']:.2f}x (mean); {p['rounds']} rounds in {p['reps']} runs, "
                f"per-run medians {', '.join(f'{m:.3f}' for m in p['run_medians_s'])} s"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "python": platform.python_version()}
        pooled_out = [{"nodes": n, "params": d, "arm": a} | p for (n, d, a), p in pooled.items()]
        args.out.write_text(json.dumps({"meta": meta, "results": results, "pooled": pooled_out}, indent=2))


def _pool(results: list[dict]) -> dict[tuple[int, int, str], dict]:
    """Per (nodes, params, arm): median and mean over the later rounds of all its runs."""
    groups: dict[tuple[int, int, str], list[dict]] = {}
    for r in results:
        if r.get("arm"):
            groups.setdefault((r["nodes"], r["params"], r["arm"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        later = [x for r in runs for x in (r["rounds_s"][1:] or r["rounds_s"])]
        stages: dict[str, list[float]] = {}
        for r in runs:
            for label, v in r["stages_s"].items():
                stages.setdefault(label, []).append(v)
        out[key] = {
            "round_s": statistics.median(later),
            "round_mean_s": statistics.fmean(later),
            "rounds": len(later),
            "reps": len(runs),
            "run_medians_s": [r["round_s"] for r in runs],
            "stages_s": {k: statistics.median(v) for k, v in stages.items()},
        }
    return out


if __name__ == "__main__":
    main()
