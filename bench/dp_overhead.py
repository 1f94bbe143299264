"""DP-SGD overhead on the recommender: throughput and peak memory with and without Opacus.

Same model (SASRec, 2 layers, 64 wide, ~2000 items, max_len 50), same data (synthetic,
``clients.synthetic.generate``), same optimizer (AdamW), same batch size, CPU. Five arms,
each in its own subprocess (fair peak memory, no warm caches shared):

``nodp-mean``   the fastest non-private path: ``reduction="mean"`` scores only positions
                with a target (a compact head over ``h[valid]``);
``nodp-none``   the per-example path without DP: ``reduction="none"`` scores every
                position (the head over all ``b*t`` positions) and averages;
``dp-hooks``    ``privacy.dp.make_private`` with Opacus per-sample gradients;
``dp-ghost``    ``privacy.dp.make_private`` with Opacus ghost clipping;
``dp-bk``       ``privacy.dp.make_private`` with fedmart's one-pass book-keeping clipping
                (``privacy.bookkeeping``) and the packed head (positions with a target
                only, like ``nodp-mean``); Opacus samples, noises and accounts.

Opacus's modes need ``reduction="none"`` (every activation keeps its batch dimension), so the DP
arms are compared both with the fastest non-private path (what DP costs a node) and with
the same per-example path without DP (what Opacus itself costs). Batches are drawn before
timing (fixed batches of ``--batch-size`` for the non-private arms, Poisson batches of
that expected size for the DP arms), so the numbers are training-step compute; throughput
counts the examples actually processed. Arms are interleaved over ``--reps`` repetitions
and the median is reported, because the machine may be shared; examples per CPU-second
(process time of all threads) is reported beside wall-clock examples/s, as it is far
less sensitive to other processes competing for the cores.

    python bench/dp_overhead.py                    # 3 reps x 5 arms, 20 timed steps each
    python bench/dp_overhead.py --reps 5 --steps 30 --out bench/results/dp_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ARMS = ("nodp-mean", "nodp-none", "dp-hooks", "dp-ghost", "dp-bk")
ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    """One arm in this process; returns its measurements."""
    import torch

    from clients.sequences import TrainDataset, build_sequences, leave_one_out
    from clients.synthetic import generate
    from clients.trainer import make_loader, make_optimizer
    from conf.settings import SyntheticSettings, TrainSettings
    from federation.model import SASRec, SASRecConfig
    from privacy.dp import DPConfig, make_private

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    catalog, inter = generate(SyntheticSettings(num_users=args.users, num_items=args.items, seed=0))
    dataset = TrainDataset(leave_one_out(build_sequences(inter)).train, args.max_len)
    model = SASRec(SASRecConfig(num_items=catalog.num_items, max_len=args.max_len, hidden=64, layers=2, heads=2))
    optim = TrainSettings(batch_size=args.batch_size)
    opt = make_optimizer(model, optim)
    loader = make_loader(dataset, args.batch_size, seed=0)
    private = arm.startswith("dp-")
    cfg = (
        DPConfig(mode="dp", noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=arm[3:])
        if private
        else DPConfig(mode="off")
    )
    pt = make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1)
    reduction = "mean" if arm == "nodp-mean" else "none"
    extra = {"packed": True} if arm == "dp-bk" else {}
    batches = []
    for x, y in pt.data_loader:  # drawn up front: time the training step, not the data pipeline
        if len(x):
            batches.append((x, y))
        if len(batches) == args.warmup + args.steps:
            break
    if len(batches) < args.warmup + args.steps:
        raise SystemExit(f"only {len(batches)} batches: use more --users or fewer --steps")
    pt.module.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        pt.optimizer.zero_grad(set_to_none=True)
        _, loss = pt.module(x, y, reduction=reduction, **extra)
        pt.loss_fn(loss).backward()
        pt.optimizer.step()

    rss_setup, max_rss_setup = _rss_mib(), _max_rss_mib()
    for x, y in batches[: args.warmup]:
        step(x, y)
    timed = batches[args.warmup :]
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in timed:
        step(x, y)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    examples = sum(len(x) for x, _ in timed)
    return {
        "arm": arm,
        "examples": examples,
        "steps": len(timed),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "examples_per_s": examples / seconds,
        "examples_per_cpu_s": examples / cpu_seconds,
        "rss_setup_mib": rss_setup,
        "max_rss_setup_mib": max_rss_setup,
        "peak_rss_mib": _max_rss_mib(),
        "training_peak_mib": _max_rss_mib() - rss_setup,
        "sample_rate": pt.sample_rate,
        "users": len(dataset),
    }


def _child(arm: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm]
    for key in ("steps", "warmup", "batch_size", "users", "items", "max_len", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"arm {arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=ARMS, help="run one arm in this process (used by the driver)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--users", type=int, default=6000)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.arm:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(run_arm(args.arm, args)))
        return
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {a: [] for a in ARMS}
    for rep in range(args.reps):
        order = ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]  # rotate: no arm always first
        for arm in order:
            r = _child(arm, args)
            runs[arm].append(r)
            print(f"rep {rep + 1} {arm:10s} {r['examples_per_s']:8.1f} ex/s {r['examples_per_cpu_s']:8.1f} ex/CPU-s "
                  f"peak RSS {r['peak_rss_mib']:7.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    med = {a: statistics.median(r["examples_per_s"] for r in runs[a]) for a in ARMS}
    cpu = {a: statistics.median(r["examples_per_cpu_s"] for r in runs[a]) for a in ARMS}
    peak = {a: max(r["peak_rss_mib"] for r in runs[a]) for a in ARMS}
    grow = {a: statistics.median(r["training_peak_mib"] for r in runs[a]) for a in ARMS}
    lines = [
        "| arm | examples/s wall (median) | runs | ÷ nodp-mean | ÷ nodp-none "
        "| examples/CPU-s (median) | ÷ nodp-mean | ÷ nodp-none | peak RSS MiB | peak − setup RSS MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in ARMS:
        each = ", ".join(f"{r['examples_per_s']:.0f}" for r in runs[a])
        lines.append(
            f"| {a} | {med[a]:.1f} | {each} | {med[a] / med['nodp-mean']:.2f} | {med[a] / med['nodp-none']:.2f} "
            f"| {cpu[a]:.1f} | {cpu[a] / cpu['nodp-mean']:.2f} | {cpu[a] / cpu['nodp-none']:.2f} "
            f"| {peak[a]:.0f} | {grow[a]:.0f} |"
        )
    table = "\n".join(lines)
    import torch

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "median_examples_per_s": med,
        "ratios_vs_nodp_mean": {a: med[a] / med["nodp-mean"] for a in ARMS},
        "ratios_vs_nodp_none": {a: med[a] / med["nodp-none"] for a in ARMS},
        "median_examples_per_cpu_s": cpu,
        "cpu_ratios_vs_nodp_mean": {a: cpu[a] / cpu["nodp-mean"] for a in ARMS},
        "cpu_ratios_vs_nodp_none": {a: cpu[a] / cpu["nodp-none"] for a in ARMS},
        "peak_rss_mib": peak,
        "runs": runs,
    }
    print(table)
    print(f"load average before/after: {load_before} / {os.getloadavg()}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
