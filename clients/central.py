"""``fedmart train-central``: the centralized baseline, i.e. one node that holds all the data.

It is the yardstick federated and private runs are measured against, so it uses
the same model, split, loop and metrics as a node. Model selection is on the
validation NDCG@10 with early stopping; the test metrics are those of the best
validation checkpoint.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from clients.datasets import load_dataset
from clients.sequences import TrainDataset, build_sequences, leave_one_out
from clients.trainer import (
    evaluate,
    evaluate_popularity,
    make_loader,
    make_optimizer,
    seed_everything,
    train_epoch,
)
from conf.settings import CentralSettings
from federation.device import select_device
from federation.globalmodel import build_model, get_weights, save_weights, set_weights

__all__ = ["run_central", "format_summary"]

log = logging.getLogger(__name__)


def _jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_central(cfg: CentralSettings, out_dir: Path) -> dict[str, Any]:
    """Train one model per seed and return the summary (also written to ``results.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.device)
    data_cfg = cfg.data
    data = load_dataset(data_cfg, report_dir=out_dir / "data")
    data.catalog.save(out_dir / "catalog.parquet")  # what the models were trained on (fedmart/central_cmd.py signs it)
    split = leave_one_out(build_sequences(data.interactions))
    dataset = TrainDataset(split.train, data_cfg.max_len)
    optim = cfg.train
    model_cfg = cfg.model
    pop = {w: evaluate_popularity(split, data.catalog.num_items, w) for w in ("valid", "test")}
    log.info(
        "data: %d users (%d evaluated), %d items; popularity test NDCG@10 %.4f HR@10 %.4f",
        split.train.num_users,
        len(split.eval_users),
        data.catalog.num_items,
        pop["test"]["ndcg@10"],
        pop["test"]["hr@10"],
    )
    metrics_path = out_dir / "metrics.jsonl"
    runs = []
    for seed in cfg.seeds:
        seed_everything(seed)
        model = build_model(
            data.catalog,
            model_cfg,
            data_cfg.max_len,
            seed=seed,
            text_cache=out_dir / "title_emb.npy",
        ).to(device)
        opt = make_optimizer(model, optim)
        loader = make_loader(dataset, optim.batch_size, seed)
        best, best_epoch, best_weights, epoch_times = -1.0, 0, None, []
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            stats = train_epoch(model, loader, opt, device)
            epoch_times.append(time.perf_counter() - t0)
            if epoch % cfg.eval_every:
                continue
            val = evaluate(model, split, "valid", device, batch_size=cfg.eval_batch_size)
            improved = val["ndcg@10"] > best
            if improved:
                best, best_epoch, best_weights = val["ndcg@10"], epoch, get_weights(model)
            _jsonl(
                metrics_path,
                {
                    "seed": seed,
                    "epoch": epoch,
                    "loss": stats["loss"],
                    "valid_ndcg@10": val["ndcg@10"],
                    "valid_hr@10": val["hr@10"],
                    "epoch_seconds": epoch_times[-1],
                },
            )
            log.info(
                "seed %d epoch %3d  loss %.4f  valid NDCG@10 %.4f HR@10 %.4f%s  (%.1fs)",
                seed, epoch, stats["loss"], val["ndcg@10"], val["hr@10"], " *" if improved else "", epoch_times[-1],
            )  # fmt: skip
            if epoch - best_epoch >= cfg.patience:
                break
        assert best_weights is not None
        set_weights(model, best_weights)
        save_weights(best_weights, out_dir / f"best-seed{seed}.safetensors", {"epoch": str(best_epoch)})
        test = evaluate(model, split, "test", device, batch_size=cfg.eval_batch_size)
        runs.append(
            {
                "seed": seed,
                "best_epoch": best_epoch,
                "valid_ndcg@10": best,
                "test": test,
                "epoch_seconds": statistics.mean(epoch_times),
            }
        )
        log.info(
            "seed %d: best epoch %d, test NDCG@10 %.4f HR@10 %.4f",
            seed,
            best_epoch,
            test["ndcg@10"],
            test["hr@10"],
        )
    summary = _summarise(runs, pop, device)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summarise(runs: list[dict], pop: dict, device: torch.device) -> dict[str, Any]:
    def stat(key: str) -> dict[str, float]:
        vals = [r["test"][key] for r in runs]
        return {
            "mean": statistics.mean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals),
            "max": max(vals),
        }

    ndcg = stat("ndcg@10")
    return {
        "runs": runs,
        "test_ndcg@10": ndcg,
        "test_hr@10": stat("hr@10"),
        "test_mrr": stat("mrr"),
        "popularity": pop,
        "ratio_to_popularity_ndcg@10": ndcg["mean"] / max(pop["test"]["ndcg@10"], 1e-12),
        "epoch_seconds": statistics.mean(r["epoch_seconds"] for r in runs),
        "device": str(device),
    }


def format_summary(summary: dict[str, Any]) -> str:
    n, h = summary["test_ndcg@10"], summary["test_hr@10"]
    p = summary["popularity"]["test"]
    lines = [
        f"centralized SASRec over {len(summary['runs'])} seed(s), test (full ranking, seen masked):",
        f"  NDCG@10 {n['mean']:.4f} ± {n['std']:.4f}  [min {n['min']:.4f}, max {n['max']:.4f}]",
        f"  HR@10   {h['mean']:.4f} ± {h['std']:.4f}  [min {h['min']:.4f}, max {h['max']:.4f}]",
        f"  popularity NDCG@10 {p['ndcg@10']:.4f} HR@10 {p['hr@10']:.4f}  -> model/popularity NDCG@10 "
        f"{summary['ratio_to_popularity_ndcg@10']:.2f}x",
        f"  mean epoch time {summary['epoch_seconds']:.2f}s on {summary['device']}",
    ]
    for r in summary["runs"]:
        lines.append(
            f"  seed {r['seed']}: best epoch {r['best_epoch']}, test NDCG@10 {r['test']['ndcg@10']:.4f} "
            f"HR@10 {r['test']['hr@10']:.4f}"
        )
    return "\n".join(lines)
