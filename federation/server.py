"""The coordinator's work: build the strategy and the initial model, run the rounds, write the run.

``federation/app.py`` only wires this into a Flower ``ServerApp``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from federation import wire
from federation.aggregation import HolderFedAdam, HolderFedAvg, with_holders
from federation.catalog import Catalog
from federation.coordinator import Coordinator, RoundRecord, discover_nodes
from federation.device import select_device
from federation.globalmodel import build_model, get_weights, set_weights
from federation.outputs import (
    Checkpointer,
    MetricsWriter,
    RunDir,
    from_arrays,
    load_checkpoint,
    plot_metrics,
    to_arrays,
    write_report,
)
from federation.runconfig import config_hash
from federation.trail import AuditRecorder, RegistryPublisher, open_trail
from privacy.client_dp import ClientDPConfig
from privacy.client_dp_strategy import ClientDPStrategy

__all__ = ["make_strategy", "run_server", "CentralEvaluator"]

log = logging.getLogger(__name__)


def make_strategy(fed: dict[str, Any], num_nodes: int, secagg: dict[str, Any] | None = None) -> Strategy:
    """FedAvg or FedAdam from the ``federation`` group, wrapped in client-level DP and secure aggregation when enabled.

    The stack is ``SecAggStrategy(ClientDPStrategy(inner))``, either wrapper only when enabled.
    """
    inner = _base_strategy(fed, num_nodes)
    if secagg and secagg.get("enabled"):
        from privacy.secagg import SecAggConfig, wrap_strategy

        return wrap_strategy(inner, SecAggConfig.from_mapping(secagg))
    return inner


def client_dp_config(fed: dict[str, Any]) -> ClientDPConfig | None:
    """``federation.client_dp`` as a validated config, or None when the layer is off."""
    c = fed.get("client_dp") or {}
    if not c.get("enabled"):
        return None
    try:
        # Flower's samplers pick a fixed number of nodes: no amplification (q = 1) is the valid bound.
        return ClientDPConfig(
            noise_multiplier=float(c["noise_multiplier"]),
            clipping_norm=float(c["clipping_norm"]),
            delta=float(c.get("delta", 1e-3)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"federation.client_dp: {err}; set clipping_norm > 0, noise_multiplier > 0 and delta in (0, 1)"
        ) from err


class ClientDPAccountant:
    """Adds the client-level ε so far (RDP over the rounds that released an aggregate) to each round's record."""

    def __init__(self, config: ClientDPConfig, released_before: int = 0) -> None:
        self.config = config
        self.released = released_before  # a resumed run: every completed round counts

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord, strategy: Strategy) -> None:
        self.released += int(record.aggregated)
        record.train_metrics["client_dp_epsilon"] = self.config.epsilon(self.released)
        record.train_metrics["client_dp_delta"] = self.config.delta


def _base_strategy(fed: dict[str, Any], num_nodes: int) -> Strategy:
    common = {
        "fraction_train": float(fed.get("fraction_train", 1.0)),
        "fraction_evaluate": float(fed.get("fraction_evaluate", 1.0)),
        "min_train_nodes": min(int(fed.get("min_train_nodes", 2)), num_nodes),
        "min_evaluate_nodes": min(int(fed.get("min_evaluate_nodes", 2)), num_nodes),
        "min_available_nodes": min(int(fed.get("min_available_nodes", 2)), num_nodes),
    }
    name = str(fed.get("strategy", "fedavg")).lower()
    holders = item_rows(fed) == "holders"
    cdp = client_dp_config(fed)
    strategy: FedAvg
    if name == "fedavg":
        strategy = (HolderFedAvg if holders else FedAvg)(**common)
    elif name == "fedadam":
        strategy = (HolderFedAdam if holders else FedAdam)(
            **common,
            eta=float(fed.get("eta", 0.01)),
            eta_l=float(fed.get("eta_l", 0.001)),
            beta_1=float(fed.get("beta_1", 0.9)),
            beta_2=float(fed.get("beta_2", 0.99)),
            tau=float(fed.get("tau", 1e-3)),
        )
    else:
        raise ValueError(f"federation.strategy must be fedavg or fedadam, not {name!r}")
    if cdp is None:
        return strategy
    # noise on the sum of the clipped updates, before the holder division and FedAdam's step
    return ClientDPStrategy(strategy, config=cdp, exclude=(wire.ITEM_HOLDERS,))


def item_rows(fed: dict[str, Any]) -> str:
    """``federation.item_rows``: "holders" (federation/aggregation.py) or "mean" (plain FedAvg)."""
    value = str(fed.get("item_rows", "mean")).lower()
    if value not in ("holders", "mean"):
        raise ValueError(f"federation.item_rows must be holders or mean, not {value!r}")
    return value


class CentralEvaluator:
    """Simulation only: evaluates the global model on the pooled leave-one-out split.

    This is the same split and the same metrics as the centralized baseline, so the
    two are directly comparable. A real coordinator never holds this data.
    """

    def __init__(self, catalog: Catalog, data_path: Path, settings: dict[str, Any]) -> None:
        from clients.interactions import Interactions
        from clients.sequences import build_sequences, leave_one_out

        self.split = leave_one_out(build_sequences(Interactions.load(data_path)))
        self.max_len = int(settings["data"]["max_len"])
        self.model = build_model(catalog, settings["model"], self.max_len)
        self.device = select_device(str(settings.get("device", "auto")))
        self.max_users = int(settings["federation"].get("central_eval_users", 0) or 0)
        if self.max_users and self.max_users < len(self.split.eval_users):
            # A fixed random subset keeps evaluation cheap on big synthetic data.
            keep = np.random.default_rng(0).choice(self.split.eval_users, self.max_users, replace=False)
            mask = np.zeros_like(self.split.test_target, dtype=bool)
            mask[keep] = True
            self.split.valid_target = np.where(mask, self.split.valid_target, 0)
            self.split.test_target = np.where(mask, self.split.test_target, 0)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        from clients.trainer import evaluate

        set_weights(self.model, from_arrays(arrays))
        self.model.to(self.device)
        val = evaluate(self.model, self.split, "valid", self.device)
        test = evaluate(self.model, self.split, "test", self.device)
        return {
            "valid_ndcg@10": val["ndcg@10"],
            "valid_hr@10": val["hr@10"],
            "test_ndcg@10": test["ndcg@10"],
            "test_hr@10": test["hr@10"],
            "test_mrr": test["mrr"],
            "users": test["users"],
        }


class ProgressLine:
    """One summary line per round: the log, and the live display when there is a terminal."""

    def __init__(self, num_rounds: int, t_start: float) -> None:
        self.num_rounds = num_rounds
        self.t_start = t_start

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord, strategy: Strategy) -> None:
        ev = record.central_eval or record.federated_eval
        eps = [m["epsilon"] for m in record.node_metrics.values() if "epsilon" in m]
        parts = [
            f"round {record.round}/{self.num_rounds}",
            f"nodes {len(record.replied)}/{len(record.sampled)} replied",
        ]
        problems = {k: len(getattr(record, k)) for k in ("failed", "declined", "timed_out", "rejected")}
        parts += [f"{v} {k.replace('_', ' ')}" for k, v in problems.items() if v]
        if "train_loss" in record.train_metrics:
            parts.append(f"loss {record.train_metrics['train_loss']:.4f}")
        if "test_ndcg@10" in ev:
            parts.append(f"NDCG@10 {ev['test_ndcg@10']:.4f}")
        if eps:
            parts.append(f"ε≤{max(eps):.2f}")
        if record.abort_reason:
            parts.append(f"ABORTED: {record.abort_reason}")
        parts.append(f"{record.seconds.get('total', 0):.1f}s (elapsed {time.time() - self.t_start:.0f}s)")
        log.info(" | ".join(parts))


def run_server(grid: Grid, settings: dict[str, Any], *, listeners_extra=()) -> ArrayRecord:
    """Run (or resume) a federation described by the unflattened run config."""
    t_start = time.time()
    fed = settings["federation"]
    sim = settings.get("sim") or {}
    run = RunDir(sim.get("run-dir") or "outputs/flwr-run")
    catalog = _catalog(settings)
    expected = int(sim.get("num-nodes") or fed.get("min_available_nodes", 2))
    nodes = discover_nodes(grid, expected=expected, timeout=float(fed.get("round_timeout", 600)))
    if not nodes:
        raise RuntimeError("no node joined the federation; check the nodes' logs")
    log.info("%d nodes joined: %s", len(nodes), ", ".join(sorted(n.name for n in nodes.values()))[:500])
    strategy = make_strategy(fed, len(nodes), settings.get("secagg"))
    start, arrays = load_checkpoint(run, strategy)
    if arrays is None:
        model = build_model(catalog, settings["model"], int(settings["data"]["max_len"]), seed=int(settings["seed"]))
        arrays = to_arrays(get_weights(model))
    else:
        log.info("resuming after round %d from %s", start, run.state)
    if item_rows(fed) == "holders":
        arrays = with_holders(arrays)
    num_rounds = int(fed["num_rounds"])
    registry, audit = open_trail(run.root, settings)
    run_name = run.root.name
    cfg_hash = config_hash({k: v for k, v in settings.items() if k != "sim"})
    audit.append(
        "run_resume" if start else "run_start",
        run=run_name,
        config_hash=cfg_hash,
        catalog_version=catalog.version,
        nodes={n.name: {"users": n.users, "events": n.events, "dataset_id": n.dataset_id} for n in nodes.values()},
        start_round=start + 1,
        num_rounds=num_rounds,
    )
    publisher = RegistryPublisher(
        registry,
        run=run_name,
        config_hash=cfg_hash,
        catalog_version=catalog.version,
        model_config={**settings["model"], "max_len": int(settings["data"]["max_len"])},
        privacy=privacy_summary(settings),
        audit=audit,
    )
    central = None
    if fed.get("central_eval", True) and sim.get("central-data"):
        central = CentralEvaluator(catalog, Path(sim["central-data"]), settings)
    coordinator = Coordinator(
        strategy=strategy,
        grid=grid,
        nodes=nodes,
        num_rounds=num_rounds,
        round_timeout=float(fed.get("round_timeout", 600)),
        seed=int(settings["seed"]),
        eval_every=int(fed.get("eval_every", 1)),
        train_config={wire.RUN: run_name},
        central_eval=central,
        listeners=[
            publisher,
            AuditRecorder(audit, run_name),
            *([ClientDPAccountant(cdp, released_before=start)] if (cdp := client_dp_config(fed)) else []),
            MetricsWriter(run),
            *listeners_extra,
            Checkpointer(run, keep_models=False),
            ProgressLine(num_rounds, t_start),
        ],
    )
    if start >= num_rounds:
        log.info("all %d rounds already completed in %s", num_rounds, run.root)
    else:
        arrays = coordinator.run(arrays, start_round=start + 1)
    audit.append("run_end", run=run_name, rounds=num_rounds, last_version=publisher.last_version)
    finish_run(run, settings, nodes_count=len(nodes), seconds=time.time() - t_start)
    return arrays


def privacy_summary(settings: dict[str, Any]) -> dict[str, Any]:
    """What the published model's privacy rests on (filled in per round with ε by node)."""
    p = settings.get("privacy") or {}
    return {k: p.get(k) for k in ("mode", "noise_multiplier", "max_grad_norm", "delta", "accountant")} | {
        "unit": "one user's history at one node" if p.get("mode", "off") != "off" else "none (no DP)",
    }


def finish_run(run: RunDir, settings: dict[str, Any], *, nodes_count: int, seconds: float) -> None:
    plot_metrics(run)
    fed = settings["federation"]
    summary = {
        "data": settings["data"]["source"],
        "silos": f"{settings['partition']['scheme']} ({nodes_count} nodes)",
        "strategy": fed["strategy"],
        "rounds": fed["num_rounds"],
        "local epochs": fed["local_epochs"],
        "model": json.dumps(settings["model"]),
        "seed": settings["seed"],
        "wall time (this invocation)": f"{seconds:.0f}s",
    }
    from federation.outputs import read_metrics
    from federation.privacy_report import privacy_section

    write_report(run, "fedmart federated run", summary, privacy_section(settings, read_metrics(run.metrics)))


def _catalog(settings: dict[str, Any]) -> Catalog:
    sim = settings.get("sim") or {}
    if sim.get("catalog"):
        return Catalog.load(sim["catalog"])
    from clients.datasets import DataConfig, load_dataset

    return load_dataset(DataConfig(**settings["data"])).catalog
