"""Cold start and warm quality of the text tower (``model=sasrec_text``) on MovieLens-100K (issue 16).

    python bench/cold_start.py [--mode cold|warm|both] [--seeds 3] [--out results.json]
                               [--holdout 0.1] [--max-epochs N] [--patience N]

**cold** (per seed): a random ``--holdout`` share of the catalog's items is held out entirely
from training: training knows only the *warm catalog* (the other items, reindexed), so the
held-out items are neither targets nor negatives of its softmax, as items added to the
catalog after training. Each model trains centrally with the hyperparameters of
``experiment=ml100k`` (``conf/experiment/ml100k.yaml``: max_len 50, 2 layers, 64 wide, dropout
0.5, label smoothing 0.1, AdamW 1e-3, batch 128), selected by early stopping on the warm
validation NDCG@10 (leave-one-out on the warm data), and is then moved onto the full catalog
as ``federation.init`` moves a version (``federation.catalog_map.map_item_rows``: known items
keep their rows, the new ones get a fresh model's rows: for the tower a zero ID residual and
bias, for the ID-only model random rows). Every position of every user's full, time-ordered
history whose target is a held-out item is a test case: the input is the history before it
(its last 50 items, held-out ones included), the ranking is over all items with the history
masked, as in ``clients/trainer.evaluate``. Trained arms (``--train``):

* ``tower``: ``model=sasrec_text`` with ``model.id_dropout=0``;
* ``tower_id_dropout``: the same with ``model.id_dropout=--id-dropout`` (each training step
  ranks that share of the items by their text alone);
* ``id_only``: SASRec on item IDs (``model=sasrec``).

Each tower is scored four ways: as moved (``tower``), with the new items' bias set to the known
items' mean (``_mean_bias``), ranking only the new items (``_new_only``: the content baseline's
privilege), and with every item's residual and bias dropped (``_text_only``). Baselines:
``popularity`` (training counts: a held-out item has none) and ``content`` (the held-out items
ranked by cosine similarity of their text embedding, the tower's frozen MiniLM embedding of
title and genre, to the mean of the history's; every other item below them: it is told which
items are new).

**warm**: ``fedmart train-central experiment=ml100k`` (the command of the ID-only 0.0715 in
BENCHMARKS.md, "Centralized baseline: MovieLens-100K") with ``model=sasrec`` and with
``model=sasrec_text``, the same seeds, run as subprocesses; their ``results.json`` summaries
are copied into ``--out``.

``--max-epochs 1`` is a smoke test: its numbers are not results.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.datasets import load_dataset
from clients.sequences import Split, TrainDataset, build_sequences, leave_one_out
from clients.trainer import evaluate, make_loader, make_optimizer, seed_everything, train_epoch
from conf.settings import CentralSettings
from federation.catalog import Catalog
from federation.catalog_map import item_keys, map_item_rows, rows_from
from federation.globalmodel import build_model, get_weights, set_weights
from federation.metrics import RankingMetrics, popularity_scores, ranks
from federation.text import item_text_embeddings

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TOWER_VIEWS = ("", "_mean_bias", "_new_only", "_text_only")
ARMS = (
    *(f"tower{v}" for v in TOWER_VIEWS),
    *(f"tower_id_dropout{v}" for v in TOWER_VIEWS),
    "id_only",
    "popularity",
    "content",
)


def compose(overrides: list[str]) -> CentralSettings:
    """``conf/central.yaml`` with ``overrides``, as ``fedmart train-central`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from conf.typed import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="central", overrides=overrides)
        return CentralSettings.from_dict(OmegaConf.to_container(cfg, resolve=True))


def train(cfg: CentralSettings, catalog, split: Split, seed: int, cache_dir: Path, log: list) -> torch.nn.Module:
    """The loop of ``clients/central.run_central`` on a given split: best validation NDCG@10 wins."""
    seed_everything(seed)
    model = build_model(catalog, cfg.model, cfg.data.max_len, seed=seed, text_cache=cache_dir / "title_emb.npy")
    opt = make_optimizer(model, cfg.train)
    loader = make_loader(TrainDataset(split.train, cfg.data.max_len), cfg.train.batch_size, seed)
    best, best_epoch, best_weights = -1.0, 0, None
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        stats = train_epoch(model, loader, opt, CPU)
        val = evaluate(model, split, "valid", CPU, batch_size=cfg.eval_batch_size)["ndcg@10"]
        if val > best:
            best, best_epoch, best_weights = val, epoch, get_weights(model)
        log.append({"model": cfg.model.name, "seed": seed, "epoch": epoch, "loss": stats["loss"], "valid": val})
        print(
            f"  {cfg.model.name} seed {seed} epoch {epoch}: loss {stats['loss']:.4f} valid NDCG@10 {val:.4f}"
            f" ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
        if epoch - best_epoch >= cfg.patience:
            break
    set_weights(model, best_weights)
    model.best_epoch = best_epoch  # type: ignore[attr-defined]
    return model.eval()


def cold_cases(seqs, cold: np.ndarray, max_len: int):
    """Every (history, target) with a held-out target, from the full time-ordered sequences."""
    hists, targets = [], []
    for u in range(seqs.num_users):
        items = seqs.of(u)
        for p in np.flatnonzero(cold[items]):
            if p > 0:
                hists.append(items[max(0, p - max_len) : p])
                targets.append(int(items[p]))
    return hists, np.asarray(targets, dtype=np.int64)


def batches(hists, targets, max_len: int, size: int = 256):
    for s in range(0, len(targets), size):
        h = hists[s : s + size]
        x = np.zeros((len(h), max_len), dtype=np.int64)
        for i, row in enumerate(h):
            x[i, max_len - len(row) :] = row
        yield torch.from_numpy(x), torch.from_numpy(targets[s : s + size]), h


def sub_catalog(catalog: Catalog, keep: np.ndarray) -> tuple[Catalog, np.ndarray]:
    """The catalog of the items ``keep`` marks ((n + 1,) bool, row 0 ignored), and old index -> new index (0: gone)."""
    rows = np.flatnonzero(keep[1:])
    sub = Catalog(*(getattr(catalog, c)[rows] for c in ("item_id", "title", "department", "merchant", "price")))
    new_index = np.zeros(catalog.num_items + 1, dtype=np.int64)
    new_index[rows + 1] = np.arange(1, len(rows) + 1)
    return sub, new_index


def onto_full_catalog(model, cfg: CentralSettings, old: Catalog, full: Catalog, seed: int, cache_dir: Path):
    """``model`` (trained on ``old``) moved onto ``full`` as ``federation.init`` moves a version.

    Kept items keep their rows; the new items get the rows of a freshly built model of ``full``:
    for the tower a zero ID residual and bias (a new item is its text alone), for the ID-only
    model its random initial rows (it knows nothing of them).
    """
    fresh = build_model(full, cfg.model, cfg.data.max_len, seed=seed, text_cache=cache_dir / "title_emb.npy")
    state = get_weights(model)
    mapped = map_item_rows(state, old, full, item_keys(state), rows_from(get_weights(fresh)))
    set_weights(fresh, mapped)
    return fresh.eval()


def cold_seed(seed: int, holdout: float, args: argparse.Namespace, out_dir: Path, log: list) -> dict[str, Any]:
    base = ["experiment=ml100k", f"max_epochs={args.max_epochs}", f"patience={args.patience}"]
    cfg_id, cfg_text = compose([*base, "model=sasrec"]), compose([*base, "model=sasrec_text", "model.id_dropout=0"])
    cfg_idd = compose([*base, "model=sasrec_text", f"model.id_dropout={args.id_dropout}"])
    data = load_dataset(cfg_id.data)
    catalog, inter = data.catalog, data.interactions
    n = catalog.num_items
    rng = np.random.default_rng(seed)
    cold = np.zeros(n + 1, dtype=bool)
    cold[rng.choice(np.arange(1, n + 1), size=round(holdout * n), replace=False)] = True
    # Training knows only the warm catalog: the held-out items do not exist yet (they are
    # neither targets nor negatives of its softmax), as items added to the catalog later.
    warm_catalog, new_index = sub_catalog(catalog, ~cold)
    warm_inter = inter.take(np.flatnonzero(~cold[inter.item]))
    warm_inter = dataclasses.replace(warm_inter, item=new_index[warm_inter.item])
    split = leave_one_out(build_sequences(warm_inter))
    hists, targets = cold_cases(build_sequences(inter), cold, cfg_id.data.max_len)
    print(f"seed {seed}: {int(cold.sum())} held-out items, {len(targets)} cold test positions", flush=True)

    models = {}
    cfgs = {"tower": cfg_text, "id_only": cfg_id, "tower_id_dropout": cfg_idd}
    arms = [(arm, cfgs[arm]) for arm in args.train.split(",")]
    for arm, cfg in arms:
        trained = train(cfg, warm_catalog, split, seed, out_dir, log)
        models[arm] = onto_full_catalog(trained, cfg, warm_catalog, catalog, seed, out_dir)
        models[arm].best_epoch = trained.best_epoch
        models[arm + "_warm"] = trained
    text = item_text_embeddings(catalog, out_dir)  # (n + 1, 384), unit rows
    counts = np.zeros(n + 1, dtype=np.int64)
    counts[np.flatnonzero(~cold)] = split.item_counts(warm_catalog.num_items)[new_index[~cold]]
    cold_t = torch.from_numpy(cold)
    only_new = torch.where(cold_t, 0.0, float("-inf"))

    def content(x: torch.Tensor) -> torch.Tensor:
        user = torch.nn.functional.normalize(text[x].sum(1), dim=-1)  # mean of the history's (pads are 0)
        return user @ text.T + only_new

    scorers = {
        "popularity": lambda x: popularity_scores(counts, len(x)),
        "content": content,
    }
    if "id_only" in models:
        scorers["id_only"] = models["id_only"].score_last
    for arm in ("tower", "tower_id_dropout"):
        if arm not in models:
            continue
        m = models[arm]
        with torch.no_grad():
            mean_bias = copy.deepcopy(m)  # a new item's bias: the mean of the known items' instead of zero
            warm_rows = torch.from_numpy(~cold)
            warm_rows[0] = False
            mean_bias.tower.bias[cold_t] = m.tower.bias[warm_rows].mean()
            text_only = copy.deepcopy(m)  # every item by its text alone: known items lose their ID part too
            text_only.tower.residual.zero_()
            text_only.tower.bias.zero_()
        scorers[arm] = m.score_last
        scorers[arm + "_mean_bias"] = mean_bias.score_last
        scorers[arm + "_new_only"] = lambda x, m=m: m.score_last(x) + only_new
        scorers[arm + "_text_only"] = text_only.score_last
    result: dict[str, Any] = {"seed": seed, "held_out_items": int(cold.sum()), "cold_positions": len(targets)}
    for arm, score in scorers.items():
        m = RankingMetrics((10,))
        with torch.no_grad():
            for x, y, seen in batches(hists, targets, cfg_id.data.max_len):
                m.update(ranks(score(x), y, seen))
        result[arm] = m.compute()
    warm_test = {arm: evaluate(models[arm + "_warm"], split, "test", CPU) for arm, _ in arms}
    for arm, _ in arms:  # the text-only view's warm quality: what dropping every ID part costs
        if arm.startswith("tower"):
            view = copy.deepcopy(models[arm + "_warm"])
            with torch.no_grad():
                view.tower.residual.zero_()
                view.tower.bias.zero_()
            warm_test[arm + "_text_only"] = evaluate(view, split, "test", CPU)
    result["warm_test_of_the_filtered_split"] = warm_test
    result["best_epoch"] = {arm: models[arm].best_epoch for arm, _ in arms}
    return result


def summarise(runs: list[dict], arms, key: str) -> dict[str, dict[str, float]]:
    out = {}
    for arm in arms:
        vals = [r[arm][key] for r in runs]
        out[arm] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def warm(seeds: list[int], args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """``fedmart train-central experiment=ml100k`` with each model, as a subprocess (the BENCHMARKS protocol)."""
    out = {}
    for name in args.warm_models.split(","):
        run_dir = out_dir / f"warm-{name}"
        cmd = [
            sys.executable, "-m", "fedmart", "train-central", "experiment=ml100k", f"model={name}",
            f"seeds=[{','.join(map(str, seeds))}]", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        cmd += args.warm_overrides.split()
        if args.max_epochs != 200:
            cmd.append(f"max_epochs={args.max_epochs}")
        if args.patience != 20:
            cmd.append(f"patience={args.patience}")
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        summary = json.loads((run_dir / "results.json").read_text())
        out[name] = {"command": " ".join(cmd[2:-1]), **summary}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("cold", "warm", "both"), default="both")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--holdout", type=float, default=0.1, help="share of the catalog held out of training")
    p.add_argument("--id-dropout", type=float, default=0.5, help="a third arm: the tower with model.id_dropout=P")
    p.add_argument("--train", default="tower,id_only,tower_id_dropout", help="cold mode's trained arms")
    p.add_argument("--warm-models", default="sasrec,sasrec_text", help="warm mode's models, comma-separated")
    p.add_argument("--warm-overrides", default="", help="extra train-central overrides for warm mode, space-separated")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("outputs/cold_start/results.json"))
    args = p.parse_args()
    if not 0 < args.holdout < 1 or args.seeds < 1:
        raise SystemExit("--holdout must be in (0, 1) and --seeds >= 1")
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    result: dict[str, Any] = {
        "protocol": {
            "data": "MovieLens-100K (recbole 1.2.1 files), experiment=ml100k hyperparameters",
            "holdout": args.holdout,
            "seeds": seeds,
            "max_epochs": args.max_epochs,
            "patience": args.patience,
            "smoke": args.max_epochs < 5,
        }
    }
    if args.mode in ("cold", "both"):
        log: list[dict] = []
        runs = [cold_seed(s, args.holdout, args, out_dir, log) for s in seeds]
        result["cold"] = {
            "runs": runs,
            "ndcg@10": summarise(runs, [a for a in ARMS if a in runs[0]], "ndcg@10"),
            "hr@10": summarise(runs, [a for a in ARMS if a in runs[0]], "hr@10"),
            "mrr": summarise(runs, [a for a in ARMS if a in runs[0]], "mrr"),
            "epochs": log,
        }
        print("\ncold start (targets held out of training), mean ± std over seeds:")
        for arm in [a for a in ARMS if a in runs[0]]:
            nd, hr = result["cold"]["ndcg@10"][arm], result["cold"]["hr@10"][arm]
            print(f"  {arm:28s} NDCG@10 {nd['mean']:.4f} ± {nd['std']:.4f}  HR@10 {hr['mean']:.4f} ± {hr['std']:.4f}")
    if args.mode in ("warm", "both"):
        result["warm"] = warm(seeds, args, out_dir)
        for name, s in result["warm"].items():
            print(f"warm {name}: test NDCG@10 {s['test_ndcg@10']['mean']:.4f} ± {s['test_ndcg@10']['std']:.4f}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
