"""The coordinator's work: build the strategy and the initial model, run the rounds, write the run.

``federation/app.py`` only wires this into a Flower ``ServerApp``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from conf.settings import ClientDPSettings, FederationSettings, RunSettings, Settings
from federation import wire
from federation.aggregation import HolderFedAdam, HolderFedAvg, with_holders
from federation.catalog import Catalog
from federation.coordinator import Coordinator, RoundRecord, RunRefused, discover_nodes
from federation.device import select_device
from federation.empirical_audit import (
    audit_section,
    client_level_audit,
    collect_audits,
    jsonable,
    log_violations,
    read_audits,
    write_audits,
)
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
from federation.trial import budget_warnings, write_dry_run
from privacy.audit import AuditLog
from privacy.client_dp import ClientDPConfig
from privacy.client_dp_strategy import ClientDPStrategy
from privacy.policy import TrainingRequest
from privacy.secagg.config import SecAggConfig

__all__ = ["make_strategy", "run_server", "begin_trail", "initial_arrays", "CentralEvaluator"]

log = logging.getLogger(__name__)


def make_strategy(fed: FederationSettings, num_nodes: int, secagg: SecAggConfig | None = None) -> Strategy:
    """FedAvg or FedAdam from the ``federation`` group, wrapped in client-level DP and secure aggregation when enabled.

    The stack is ``SecAggStrategy(ClientDPStrategy(inner))``, either wrapper only when enabled.
    """
    inner = _base_strategy(fed, num_nodes)
    if secagg is not None and secagg.enabled:
        from privacy.secagg import wrap_strategy

        return wrap_strategy(inner, secagg)
    return inner


def client_dp_config(c: ClientDPSettings) -> ClientDPConfig | None:
    """``federation.client_dp`` as the mechanism's config, or None when the layer is off."""
    if not c.enabled:
        return None
    # Flower's samplers pick a fixed number of nodes: no amplification (q = 1) is the valid bound.
    return ClientDPConfig(noise_multiplier=c.noise_multiplier, clipping_norm=c.clipping_norm, delta=c.delta)


class ClientDPAccountant:
    """Adds the client-level ε so far (RDP over the rounds that released an aggregate) to each round's record."""

    def __init__(self, config: ClientDPConfig, released_before: int = 0) -> None:
        self.config = config
        self.released = released_before  # a resumed run: every completed round counts

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord, strategy: Strategy) -> None:
        self.released += int(record.aggregated)
        record.train_metrics["client_dp_epsilon"] = self.config.epsilon(self.released)
        record.train_metrics["client_dp_delta"] = self.config.delta


def _base_strategy(fed: FederationSettings, num_nodes: int) -> Strategy:
    common = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": min(fed.min_train_nodes, num_nodes),
        "min_evaluate_nodes": min(fed.min_evaluate_nodes, num_nodes),
        "min_available_nodes": min(fed.min_available_nodes, num_nodes),
    }
    holders = fed.item_rows == "holders"
    cdp = client_dp_config(fed.client_dp)
    strategy: FedAvg
    if fed.strategy == "fedavg":
        strategy = (HolderFedAvg if holders else FedAvg)(**common)
    else:
        strategy = (HolderFedAdam if holders else FedAdam)(
            **common, eta=fed.eta, eta_l=fed.eta_l, beta_1=fed.beta_1, beta_2=fed.beta_2, tau=fed.tau
        )
    if cdp is None:
        return strategy
    # noise on the sum of the clipped updates, before the holder division and FedAdam's step
    return ClientDPStrategy(strategy, config=cdp, exclude=(wire.ITEM_HOLDERS,))


class CentralEvaluator:
    """Simulation only: evaluates the global model on the pooled leave-one-out split.

    This is the same split and the same metrics as the centralized baseline, so the
    two are directly comparable. A real coordinator never holds this data.
    """

    def __init__(self, catalog: Catalog, data_path: Path, settings: Settings) -> None:
        from clients.interactions import Interactions
        from clients.sequences import build_sequences, leave_one_out

        self.split = leave_one_out(build_sequences(Interactions.load(data_path)))
        self.max_len = settings.data.max_len
        self.model = build_model(catalog, settings.model, self.max_len)
        self.device = select_device(settings.device)
        self.max_users = settings.federation.central_eval_users
        if self.max_users and self.max_users < len(self.split.eval_users):
            # A fixed random subset keeps evaluation cheap on big synthetic data.
            keep = np.random.default_rng(0).choice(self.split.eval_users, self.max_users, replace=False)
            mask = np.zeros_like(self.split.test_target, dtype=bool)
            mask[keep] = True
            self.split.valid_target = np.where(mask, self.split.valid_target, 0)
            self.split.test_target = np.where(mask, self.split.test_target, 0)
        from clients.trainer import evaluate_popularity

        # The yardstick beside the model in the report: the same users, split and metrics.
        self.popularity = evaluate_popularity(self.split, catalog.num_items, "test")

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
        if record.joined:
            parts.append(f"joined: {', '.join(record.joined)}")
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


def run_server(grid: Grid, settings: RunSettings, *, listeners_extra=()) -> ArrayRecord:
    """Run (or resume) a federation described by the run config."""
    t_start = time.time()
    fed, sim = settings.federation, settings.sim
    run = RunDir(sim.run_dir or "outputs/flwr-run")
    catalog = _catalog(settings)
    expected = sim.num_nodes or fed.min_available_nodes
    nodes = discover_nodes(grid, expected=expected, timeout=fed.round_timeout)
    if not nodes:
        raise RuntimeError("no node joined the federation; check the nodes' logs")
    # Names as the nodes give them, with the node ids `fedmart nodes list` shows beside the registered names.
    joined = ", ".join(f"{n.name} (node id {n.node_id})" for n in sorted(nodes.values(), key=lambda n: n.name))
    log.info("%d nodes joined: %s", len(nodes), joined[:2000])
    strategy = make_strategy(fed, len(nodes), settings.secagg)
    start, arrays = load_checkpoint(run, strategy)
    for line in budget_warnings(nodes, resumed=arrays is not None):
        log.warning(line)
    if sim.dry_run:
        _, line = write_dry_run(run.root, nodes, expected=expected)
        log.info(line)
        return arrays if arrays is not None else initial_arrays(settings, catalog)[0]
    origin = None
    if arrays is None:
        arrays, origin = initial_arrays(settings, catalog)
    else:
        log.info("resuming after round %d from %s", start, run.state)
    if fed.item_rows == "holders":
        arrays = with_holders(arrays)
    num_rounds = fed.num_rounds
    run_name = run.root.name
    nodes_seen = {n.name: {"users": n.users, "events": n.events, "dataset_id": n.dataset_id} for n in nodes.values()}
    audit, publisher = begin_trail(run, settings, catalog, nodes_seen, start=start, origin=origin)
    cdp = client_dp_config(fed.client_dp)
    client_dp = ClientDPAccountant(cdp, released_before=start) if cdp is not None else None
    central = None
    if fed.central_eval and sim.central_data:
        central = CentralEvaluator(catalog, Path(sim.central_data), settings)
    coordinator = Coordinator(
        strategy=strategy,
        grid=grid,
        nodes=nodes,
        num_rounds=num_rounds,
        round_timeout=fed.round_timeout,
        seed=settings.seed,
        eval_every=fed.eval_every,
        train_config={wire.RUN: run_name, **training_request(settings).to_config()},
        central_eval=central,
        listeners=[
            publisher,
            AuditRecorder(audit, run_name),
            *([client_dp] if client_dp is not None else []),
            MetricsWriter(run),
            *listeners_extra,
            Checkpointer(run, keep_models=False),
            ProgressLine(num_rounds, t_start),
        ],
    )
    if start >= num_rounds:
        log.info("all %d rounds already completed in %s", num_rounds, run.root)
    else:
        try:
            arrays = coordinator.run(arrays, start_round=start + 1)
        except RunRefused as exc:
            # The nodes' own policies or budgets refuse this run: end it, publish nothing more,
            # and leave the reason where the launching command finds it.
            audit.append("run_refused", run=run_name, reason=str(exc))
            run.refused.write_text(str(exc) + "\n")
            log.error("run refused by the nodes: %s", exc)
            return arrays
    # The nodes' own privacy audits of the final model (those whose policy has canaries).
    t_audit = time.perf_counter()
    audits = collect_audits(grid, nodes, arrays, timeout=fed.round_timeout)
    if client_dp is not None:  # the simulation's canary nodes, pooled into the client-level audit
        eps = client_dp.config.epsilon(client_dp.released)
        audits = client_level_audit(audits, epsilon=eps, delta=client_dp.config.delta)
    log_violations(audits)
    if audits:
        write_audits(run.metrics, audits, run=run_name, seconds=time.perf_counter() - t_audit)
        audit.append("privacy_audit", run=run_name, nodes=jsonable(audits))
    audit.append("run_end", run=run_name, rounds=num_rounds, last_version=publisher.last_version)
    popularity = central.popularity if central is not None else None
    finish_run(run, settings, nodes_count=len(nodes), seconds=time.time() - t_start, popularity=popularity)
    return arrays


def begin_trail(
    run: RunDir,
    settings: RunSettings,
    catalog: Catalog,
    nodes: dict[str, dict[str, Any]],
    *,
    start: int,
    origin: dict[str, Any] | None,
) -> tuple[AuditLog, RegistryPublisher]:
    """Open the run's signed trail: the catalog signed into the registry, the publisher, ``run_start``/``run_resume``.

    ``origin`` is ``federation.init``'s (None: random weights, or a resumed run, which takes it
    from its previous version); it is signed into every version and into the audit entry.
    """
    registry, audit = open_trail(run.root, settings)
    run_name = run.root.name
    cfg_hash = config_hash(settings.hydra_part())
    # The catalog the run trains on, signed beside its versions: what `fedmart serve` maps them from.
    signed_catalog = registry.catalogs.publish(catalog, by=f"run {run_name}", if_new=True)
    publisher = RegistryPublisher(
        registry,
        run=run_name,
        config_hash=cfg_hash,
        catalog_version=catalog.version,
        model_config={**asdict(settings.model), "max_len": settings.data.max_len},
        privacy=privacy_summary(settings),
        audit=audit,
        origin=origin,
    )
    audit.append(
        "run_resume" if start else "run_start",
        run=run_name,
        config_hash=cfg_hash,
        catalog_version=catalog.version,
        catalog=signed_catalog.name,
        init=publisher.origin,  # federation.init: the signed version the run started from (None: random weights)
        nodes=nodes,
        start_round=start + 1,
        num_rounds=settings.federation.num_rounds,
    )
    return audit, publisher


def initial_arrays(settings: Settings, catalog: Catalog) -> tuple[ArrayRecord, dict[str, Any] | None]:
    """The first global model: random weights (seeded), or ``federation.init``'s verified, mapped version.

    Returns the arrays and the init's ``origin`` (None without ``federation.init``). An unusable
    init is an :class:`~federation.init_model.InitError` (the launching command checks it first).
    """
    if settings.federation.init:
        from federation.init_model import load_init

        init = load_init(settings, catalog)
        return to_arrays(init.weights), init.origin
    model = build_model(catalog, settings.model, settings.data.max_len, seed=settings.seed)
    return to_arrays(get_weights(model)), None


def training_request(settings: Settings) -> TrainingRequest:
    """What this coordinator asks of every node each round (each node checks it against its policy)."""
    p, fed = settings.privacy, settings.federation
    return TrainingRequest(
        mode=p.mode,
        noise_multiplier=p.noise_multiplier,
        target_epsilon=p.target_epsilon,
        max_grad_norm=p.max_grad_norm,
        accountant=p.accountant,
        poisson_sampling=p.poisson_sampling,
        grad_sample_mode=p.grad_sample_mode,
        local_epochs=fed.local_epochs,
        local_steps=fed.local_steps,
        planned_rounds=fed.num_rounds,
    )


def privacy_summary(settings: Settings) -> dict[str, Any]:
    """What the published model's privacy rests on, signed into every version's metadata.

    DP mode and parameters, and the secure-aggregation config (``secagg.enabled``, ...);
    :class:`federation.trail.RegistryPublisher` adds ε by node and ``epsilon_max`` per round.
    ``fedmart serve --require`` reads these (``serving/policy.py``).
    """
    p = settings.privacy
    return {k: getattr(p, k) for k in ("mode", "noise_multiplier", "target_epsilon", "max_grad_norm", "accountant")} | {
        "unit": "one user's history at one node" if p.mode != "off" else "none (no DP)",
        "secagg": asdict(settings.secagg),
    }


def finish_run(
    run: RunDir,
    settings: RunSettings,
    *,
    nodes_count: int,
    seconds: float,
    popularity: dict[str, float] | None = None,
) -> None:
    plot_metrics(run)
    fed = settings.federation
    summary = {
        "data": settings.data.source,
        "silos": f"{settings.partition.scheme} ({nodes_count} nodes)",
        "strategy": fed.strategy,
        "rounds": fed.num_rounds,
        "local epochs": fed.local_epochs,
        "local steps (cap)": fed.local_steps or "whole epochs",
        "expected batch": settings.train.batch_size,
        "privacy requested": (
            f"{settings.privacy.mode} (target ε {settings.privacy.target_epsilon})"
            if settings.privacy.mode == "target"
            else settings.privacy.mode
        ),
        "secure aggregation": "on" if settings.secagg.enabled else "off",
        "model": json.dumps(asdict(settings.model)),
        "seed": settings.seed,
        "wall time (this invocation)": f"{seconds:.0f}s",
    }
    if popularity is not None:  # simulation: the same pooled users and metrics as the central evaluation
        summary["popularity baseline (central test)"] = (
            f"NDCG@10 {popularity['ndcg@10']:.4f}, HR@10 {popularity['hr@10']:.4f}"
        )
    from federation.outputs import read_metrics, read_rows
    from federation.privacy_report import privacy_section

    section = privacy_section(settings, read_metrics(run.metrics)) + audit_section(read_audits(read_rows(run.metrics)))
    write_report(run, "fedmart federated run", summary, section)


def _catalog(settings: RunSettings) -> Catalog:
    if settings.sim.catalog:
        return Catalog.load(settings.sim.catalog)
    from clients.datasets import load_dataset  # simulation / `flwr run .` without prepared data

    return load_dataset(settings.data).catalog
