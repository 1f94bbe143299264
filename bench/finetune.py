"""Fine-tuning pays (issue 16): a federation that starts from a signed, pretrained version.

MovieLens-100K's users are cut in two halves by a seeded hash of their user_id. Half A
pretrains a model centrally; half B is the federation's. Both halves are written as fedmart
data sources (``data=files``: an interactions file each, and one shared copy of the full
catalog, so the pretrained version's items map one to one onto the federation's)::

    python bench/finetune.py [--models sasrec,sasrec_text] [--rounds 60] [--nodes 10]
                             [--runs DIR] [--out bench/results/finetune.json]

Stages, each through the real CLI in a subprocess (logs in ``--runs``):

1. **Pretrain** per model: ``fedmart train-central experiment=ml100k data=files`` on half A
   (the centralized recipe of BENCHMARKS.md, one seed, early stopping on validation NDCG@10),
   ``registry.root=...``: the best model is published as a signed version, signed with the
   bench's own ``central.key``.
2. **Tampered start**: a copy of that version with one byte of its weights flipped; ``fedmart
   simulate federation.init=<copy>`` must exit 2 with a one-line error before any data is
   prepared (no training).
3. **Federations** on half B, ``experiment=ml100k_fed`` (non-private: no DP, no secure
   aggregation; the nodes' policy allows it), ``partition=iid`` over ``--nodes`` nodes
   (``data=files`` has no occupation column: occupation silos need ``data=movielens``):

   * ``scratch/<model>``: random weights (``scratch/sasrec`` is the ID-only baseline);
   * ``finetune/<model>``: ``federation.init=<the signed version>``,
     ``federation.init_public_key=<central.key.pub>``.

   Central evaluation of all half-B users (leave-one-out, full ranking, seen items masked)
   every ``--eval-every`` rounds, read from each run's ``metrics.jsonl``; round 0 (the
   starting weights) is evaluated here with the run's own ``CentralEvaluator``.

Reported: per arm the test NDCG@10 curve, its final and best values, the round the best
validation NDCG@10 selects, and the first round at which it reaches the target, the ID-only
from-scratch run's final test NDCG@10 (also at 90% of it: one round's value on ~470 users is
noisy). A stage that finished the same command in ``--runs`` is reused, not rerun.

    python bench/finetune.py --models sasrec --rounds 2 --max-epochs 1 --patience 1   # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("sasrec", "sasrec_text")
FRACTIONS = (1.0, 0.9)  # of the target: rounds to reach each


def user_half(user_id: str, seed: int) -> int:
    """0 (half A, pretraining) or 1 (half B, the federation): a seeded hash, stable across runs and machines."""
    return hashlib.sha256(f"fedmart-finetune:{seed}:{user_id}".encode()).digest()[0] & 1


def split_halves(ml_dir: Path, out: Path, seed: int) -> dict[str, Any]:
    """Write ``catalog.parquet``, ``half-a.parquet``, ``half-b.parquet`` under ``out``; every row lands in one half."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clients import movielens

    if not any((ml_dir / f).is_file() for f in ("ml-100k.inter", "u.data")):
        movielens.fetch(ml_dir)
    catalog, table, _ = movielens.load(ml_dir)
    out.mkdir(parents=True, exist_ok=True)
    catalog.save(out / "catalog.parquet")
    users = np.asarray(table["user_id"].to_pylist(), dtype=str)
    half = {u: user_half(u, seed) for u in np.unique(users)}
    in_b = np.fromiter((half[u] for u in users), dtype=bool, count=len(users))
    parts = {"a": table.filter(pa.array(~in_b)), "b": table.filter(pa.array(in_b))}
    if sum(p.num_rows for p in parts.values()) != table.num_rows:
        raise RuntimeError("the halves do not cover every interaction")
    info: dict[str, Any] = {"catalog": str(out / "catalog.parquet"), "catalog_version": catalog.version}
    for name, part in parts.items():
        path = out / f"half-{name}.parquet"
        pq.write_table(part, path)
        n_users = len(set(part["user_id"].to_pylist()))
        info[name] = {"path": str(path), "users": n_users, "events": part.num_rows}
    return info


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run ``python -m fedmart CMD`` from the repository root, output to ``log``; (exit code, seconds)."""
    t0 = time.perf_counter()
    full = [sys.executable, "-m", "fedmart", *cmd]
    print("$", " ".join(full[2:]), f"  (log {log})", flush=True)
    with log.open("w") as f:
        rc = subprocess.run(full, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def _stage(cmd: list[str], out: Path, done: str, log: Path, *, clean: tuple[Path, ...] = ()) -> float:
    """Run a stage whose outputs go to ``out``, unless ``out`` already finished the same command; its seconds.

    ``done`` is the file that marks a finished stage; ``clean`` (and ``out``) are removed before a run.
    """
    record = out / "bench-command.json"
    if (out / done).is_file() and record.is_file() and (kept := json.loads(record.read_text()))["command"] == cmd:
        print("reusing", out, flush=True)
        return float(kept["seconds"])
    for path in (out, *clean):
        shutil.rmtree(path, ignore_errors=True)  # an unfinished or different earlier attempt
    rc, seconds = _run(cmd, log)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"failed (exit {rc}); the end of {log}:\n{tail}")
    record.write_text(json.dumps({"command": cmd, "seconds": round(seconds, 1)}) + "\n")
    return seconds


def pretrain(model: str, data: dict[str, Any], runs: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``fedmart train-central`` on half A, published as a signed version; reused when already there."""
    from federation.registry import ModelRegistry

    out, registry, key = runs / f"central-{model}", runs / f"registry-{model}", runs / "keys" / "central.key"
    cmd = [
        "train-central",
        "experiment=ml100k",
        f"model={model}",
        "data=files",
        f"data.path={data['a']['path']}",
        f"data.catalog={data['catalog']}",
        f"seed={args.seed}",
        f"seeds=[{args.seed}]",
        f"max_epochs={args.max_epochs}",
        f"patience={args.patience}",
        f"registry.root={registry}",
        f"registry.signing_key={key}",
        f"hydra.run.dir={out}",
        *([f"model.id_dropout={args.id_dropout}"] if model == "sasrec_text" else []),
        *args.extra_central,
    ]
    seconds = _stage(cmd, out, "results.json", runs / f"central-{model}.log", clean=(registry,))
    versions = ModelRegistry(registry, public_key_path=key.with_name(key.name + ".pub")).versions()
    result = json.loads((out / "results.json").read_text())
    return {
        "version": str(registry / versions[-1]),
        "public_key": str(key.with_name(key.name + ".pub")),
        "half_a_test_ndcg@10": result["test_ndcg@10"]["mean"],
        "best_epoch": result["runs"][0]["best_epoch"],
        "seconds": round(seconds, 1),
    }


def _simulate_cmd(model: str, data: dict[str, Any], run_dir: Path, args: argparse.Namespace) -> list[str]:
    return [
        "simulate",
        "experiment=ml100k_fed",
        f"model={model}",
        "data=files",
        f"data.path={data['b']['path']}",
        f"data.catalog={data['catalog']}",
        "partition=iid",
        f"partition.num_partitions={args.nodes}",
        f"seed={args.seed}",
        f"federation.num_rounds={args.rounds}",
        # the recorded figures' recipe: 5 steps a round (the default cap when they were measured;
        # ml100k_fed itself now trains whole local epochs)
        f"federation.local_steps={args.local_steps}",
        f"federation.eval_every={args.eval_every}",
        *([f"model.id_dropout={args.id_dropout}"] if model == "sasrec_text" else []),
        "federation.fraction_evaluate=0.0",  # the central evaluation is what is reported
        f"registry.signing_key={run_dir.parent / 'keys' / 'coordinator.key'}",
        f"hydra.run.dir={run_dir}",
    ]


def tamper_check(
    model: str, pre: dict[str, Any], data: dict[str, Any], runs: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """A copy of the pretrained version with one weight byte flipped: the launch must refuse it (exit 2, one line)."""
    from federation.registry import WEIGHTS

    src = Path(pre["version"])
    copy = runs / "tampered" / "registry" / src.name
    shutil.rmtree(copy.parent.parent, ignore_errors=True)
    shutil.copytree(src, copy)
    weights = copy / WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # inside the tensor data, past the safetensors header
    weights.write_bytes(bytes(blob))
    log = runs / "tampered" / "simulate.log"
    cmd = [
        *_simulate_cmd(model, data, log.parent / "run", args),
        f"federation.init={copy}",
        f"federation.init_public_key={pre['public_key']}",
    ]
    rc, seconds = _run(cmd, log)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("fedmart: error:")]
    ok = rc == 2 and len(errors) == 1 and "Traceback" not in "\n".join(lines) and "refused" in errors[0]
    return {"exit_code": rc, "error": errors[0] if errors else None, "refused": ok, "seconds": round(seconds, 1)}


def federate(
    model: str, arm: str, data: dict[str, Any], pre: dict[str, Any], runs: Path, args: argparse.Namespace
) -> tuple[Path, float]:
    """One federation on half B (``arm``: scratch or finetune) and its seconds."""
    run_dir = runs / f"fed-{arm}-{model}"
    cmd = _simulate_cmd(model, data, run_dir, args)
    if arm == "finetune":
        cmd += [f"federation.init={pre['version']}", f"federation.init_public_key={pre['public_key']}"]
    cmd += args.extra_fed
    return run_dir, _stage(cmd, run_dir, "report.md", runs / f"fed-{arm}-{model}.log")


def round_zero(run_dir: Path) -> dict[str, float]:
    """The central evaluation of the run's starting weights: what the federation begins from."""
    from omegaconf import OmegaConf
    from transformers.utils import logging as hf_logging

    from conf.settings import SimulateSettings
    from federation.catalog import Catalog
    from federation.globalmodel import build_model, get_weights
    from federation.init_model import load_init
    from federation.outputs import to_arrays
    from federation.server import CentralEvaluator

    hf_logging.disable_progress_bar()  # the text tower's encoder load: keep the table readable
    sim = json.loads((run_dir / "sim.json").read_text())
    settings = SimulateSettings.from_dict(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True))
    catalog = Catalog.load(sim["catalog"])
    if settings.federation.init:
        weights = load_init(settings, catalog).weights  # verified and mapped, as initial_arrays does
    else:
        weights = get_weights(build_model(catalog, settings.model, settings.data.max_len, seed=settings.seed))
    evaluator = CentralEvaluator(catalog, Path(sim["central-data"]), settings)
    return {"round": 0, **evaluator(0, to_arrays(weights)), "popularity_test_ndcg@10": evaluator.popularity["ndcg@10"]}


def curve(run_dir: Path) -> list[dict[str, Any]]:
    """Round 0 and every centrally evaluated round: round, valid and test NDCG@10, test HR@10."""
    from federation.outputs import read_metrics

    zero = round_zero(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    points = [zero] + [{"round": r["round"], **r["central_eval"]} for r in rows if r.get("central_eval")]
    keep = ("round", "valid_ndcg@10", "test_ndcg@10", "test_hr@10")
    return [{k: p[k] for k in keep} for p in points]


def first_round(points: list[dict[str, Any]], target: float) -> int | None:
    """The first evaluated round whose test NDCG@10 reaches ``target`` (round 0 counts), or None."""
    return next((p["round"] for p in points if p["test_ndcg@10"] >= target), None)


def summarise(arms: dict[str, list[dict[str, Any]]], baseline: str) -> dict[str, Any]:
    """Per arm: final, best, validation-selected and rounds to reach the baseline's final test NDCG@10."""
    target = arms[baseline][-1]["test_ndcg@10"]
    out: dict[str, Any] = {"baseline": baseline, "target_test_ndcg@10": target, "arms": {}}
    for name, points in arms.items():
        selected = max(points[1:] or points, key=lambda p: p["valid_ndcg@10"])
        out["arms"][name] = {
            "start_test_ndcg@10": points[0]["test_ndcg@10"],
            "final_test_ndcg@10": points[-1]["test_ndcg@10"],
            "best_test_ndcg@10": max(p["test_ndcg@10"] for p in points),
            "selected_round": selected["round"],
            "selected_test_ndcg@10": selected["test_ndcg@10"],
            **{f"rounds_to_{int(f * 100)}pct": first_round(points, f * target) for f in FRACTIONS},
        }
    return out


def print_table(summary: dict[str, Any], arms: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\ntarget: {summary['baseline']}'s final test NDCG@10 = {summary['target_test_ndcg@10']:.4f}")
    head = f"{'arm':<22} {'start':>7} {'final':>7} {'best':>7} {'sel.rd':>6} {'sel.test':>8}"
    print(head + "".join(f" {f'to {int(f * 100)}%':>7}" for f in FRACTIONS))
    for name, s in summary["arms"].items():
        reach = "".join(f" {str(s[f'rounds_to_{int(f * 100)}pct']):>7}" for f in FRACTIONS)
        print(
            f"{name:<22} {s['start_test_ndcg@10']:>7.4f} {s['final_test_ndcg@10']:>7.4f} "
            f"{s['best_test_ndcg@10']:>7.4f} {s['selected_round']:>6} {s['selected_test_ndcg@10']:>8.4f}{reach}"
        )
    print("\ntest NDCG@10 per evaluated round:")
    for name, points in arms.items():
        print(f"  {name:<20} " + " ".join(f"{p['round']}:{p['test_ndcg@10']:.4f}" for p in points))


def plot(arms: dict[str, list[dict[str, Any]]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, points in arms.items():
        ax.plot([p["round"] for p in points], [p["test_ndcg@10"] for p in points], marker=".", label=name)
    ax.axhline(target, color="grey", linestyle="--", label="target (scratch/sasrec final)")
    ax.set(xlabel="round", ylabel="test NDCG@10 (half B)", title="federation on half B: from scratch vs fine-tuned")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sasrec,sasrec_text", help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--seed", type=int, default=0, help="the user split, pretraining and the federations")
    ap.add_argument("--rounds", type=int, default=60, help="federated rounds (ml100k_fed: 60)")
    ap.add_argument("--local-steps", type=int, default=5, help="federation.local_steps (0: whole epochs)")
    ap.add_argument("--id-dropout", type=float, default=0.0, help="the tower's model.id_dropout (as measured: 0)")
    ap.add_argument("--eval-every", type=int, default=1, help="central evaluation every N rounds")
    ap.add_argument("--nodes", type=int, default=10, help="IID nodes over half B (~47 users each at 10)")
    ap.add_argument("--max-epochs", type=int, default=200, help="pretraining epochs at most (ml100k: 200)")
    ap.add_argument("--patience", type=int, default=20, help="pretraining early-stopping patience (ml100k: 20)")
    ap.add_argument("--data", default="data/ml-100k", help="MovieLens-100K directory (fetched when missing)")
    ap.add_argument("--runs", default=None, help="working directory (default outputs/finetune-<time>)")
    ap.add_argument("--out", default="bench/results/finetune.json", help="the JSON summary (a .png beside it)")
    ap.add_argument("--extra-central", nargs="*", default=[], help="more overrides for train-central")
    ap.add_argument("--extra-fed", nargs="*", default=[], help="more overrides for every federation")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        raise SystemExit(f"--models: comma-separated names of {', '.join(MODELS)}")
    if "sasrec" not in models:
        raise SystemExit("--models must include sasrec: the ID-only federation from scratch is the baseline")
    runs = (ROOT / (args.runs or f"outputs/finetune-{time.strftime('%Y-%m-%d_%H-%M-%S')}")).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    data = split_halves(ROOT / args.data, runs / "data", args.seed)
    print(f"half A: {data['a']['users']} users, {data['a']['events']} events; "
          f"half B: {data['b']['users']} users, {data['b']['events']} events", flush=True)  # fmt: skip
    pre = {m: pretrain(m, data, runs, args) for m in models}
    tamper = tamper_check("sasrec", pre["sasrec"], data, runs, args)
    print(f"tampered start: exit {tamper['exit_code']}, {tamper['error']!r} -> refused: {tamper['refused']}")
    arms: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for m in models:
        for arm in ("scratch", "finetune"):
            run_dir, seconds[f"{arm}/{m}"] = federate(m, arm, data, pre[m], runs, args)
            arms[f"{arm}/{m}"] = curve(run_dir)
    summary = summarise(arms, "scratch/sasrec")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "runs": str(runs),
        "protocol": {
            "split": f"users by sha256('fedmart-finetune:{args.seed}:<user_id>') parity; one shared full catalog",
            "pretrain": "fedmart train-central experiment=ml100k data=files (half A), one seed, a signed version",
            "federation": f"fedmart simulate experiment=ml100k_fed data=files (half B), partition=iid x{args.nodes}, "
            f"{args.rounds} rounds, no DP, no secure aggregation, central eval every {args.eval_every}",
            "seed": args.seed,
            "extra_central": args.extra_central,
            "extra_fed": args.extra_fed,
        },
        "data": data,
        "pretrained": pre,
        "tampered_start": tamper,
        **summary,
        "federation_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "curves": arms,
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(arms, summary["target_test_ndcg@10"], out.with_suffix(".png"))
    print_table(summary, arms)
    print(f"\nwrote {out} and {out.with_suffix('.png')} ({result['wall_seconds'] / 60:.1f} min)")
    if not tamper["refused"]:
        raise SystemExit("the tampered starting version was NOT refused as expected")


if __name__ == "__main__":
    main()
