"""``fedmart simulate``: the whole federation on one machine, in Flower's simulation engine.

Steps: compose the config (Hydra), load and validate the data, cut it into silos
(one directory per simulated node, as a real node would hold it), flatten the
config into Flower's run config (the one crossing, :mod:`federation.runconfig`),
and run the ServerApp and ClientApp in Flower's simulation engine (Ray).
``resume=outputs/<run>`` continues a run after its last completed round.

Secure aggregation's trust anchor is made here, per run, before the coordinator starts: each
simulated node's own Ed25519 roster key (``nodes/node-XXXX/.fedmart/roster.key``, from the
operating system's randomness) and the roster of their public keys (``roster.json``). The
nodes get both through their own side (``build_client_app(node_identity=...)``), as a deployed
node reads ``--roster`` and ``--roster-key``; neither is in the run config.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from omegaconf import DictConfig

from conf.settings import Settings, SimSettings, SimulateSettings
from conf.typed import build
from federation.runconfig import flatten
from fedmart.errors import UserError
from fedmart.hydra_runs import hydra_entry, run_job

__all__ = [
    "check_init",
    "check_mechanisms",
    "check_settings",
    "check_signing_key",
    "main",
    "make_roster_for_run",
    "prepare",
    "simulate",
]

log = logging.getLogger(__name__)

S = TypeVar("S", bound=Settings)


def prepare(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write the catalog, each node's partition and the pooled eval data; return ``sim`` settings."""
    from clients.datasets import load_dataset
    from clients.node import node_dir_for, write_node_dir
    from clients.partition import partition

    settings = SimulateSettings.from_dict(cfg)
    data = load_dataset(settings.data, report_dir=run_dir / "data")
    catalog_path = data.catalog.save(run_dir / "catalog.parquet")
    part = partition(data.interactions, data.catalog, settings.partition)
    nodes_dir = run_dir / "nodes"
    sizes = []
    for pid, (name, rows) in enumerate(zip(part.names, part.rows, strict=True)):
        write_node_dir(node_dir_for(nodes_dir, pid), name, catalog_path, data.interactions.take(rows))
        sizes.append({"node": name, "events": int(len(rows))})
    central = data.interactions.save(run_dir / "central" / "interactions.npz")
    # How many nodes hold part of one user's history: what user-level DP composes over.
    node_of_row = np.empty(len(data.interactions), dtype=np.int64)
    for pid, rows in enumerate(part.rows):
        node_of_row[rows] = pid
    pairs = np.unique(np.stack([data.interactions.user, node_of_row]), axis=1)
    spread = np.bincount(pairs[0], minlength=data.interactions.num_users)
    (run_dir / "nodes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    log.info("%d %s silos written to %s", len(part), cfg["partition"]["scheme"], nodes_dir)
    canaries = settings.simulation.canary_nodes if settings.federation.client_dp.enabled else 0
    if canaries and not settings.secagg.enabled:
        # A canary node's reply must look like any node's to the coordinator: only the secure sum does that.
        log.warning("no canary nodes: the client-level audit needs secure aggregation (secagg=on)")
        canaries = 0
    if canaries:  # the client-level audit's canary nodes (clients/canary_node.py): no data
        from clients.canary_node import write_canary_node_dir

        for i in range(canaries):
            write_canary_node_dir(node_dir_for(nodes_dir, len(part) + i), i)
        log.info("%d canary nodes for the client-level audit", canaries)
    return {
        "run-dir": str(run_dir),
        "nodes-dir": str(nodes_dir),
        "catalog": str(catalog_path),
        "central-data": str(central),
        "num-nodes": len(part) + canaries,
        "canary-nodes": canaries,
        "max-nodes-per-user": int(spread.max()),
        "mean-nodes-per-user": float(spread.mean()),
    }


def make_roster_for_run(run_dir: Path, nodes_dir: str | Path, num_nodes: int) -> Path:
    """Each simulated node's roster key in its own state directory, and the run's roster (kept on resume)."""
    from clients.node import node_dir_for
    from clients.node_policy import ROSTER_KEY_FILE
    from privacy.secagg.roster import make_roster
    from privacy.signing import load_or_create_keypair

    path = run_dir / "roster.json"
    if path.is_file():
        return path
    members = []
    for pid in range(num_nodes):
        node_dir = node_dir_for(nodes_dir, pid)
        meta = json.loads((node_dir / "node.json").read_text()) if (node_dir / "node.json").is_file() else {}
        _, public = load_or_create_keypair(node_dir / ".fedmart" / ROSTER_KEY_FILE)
        members.append((str(meta.get("name", node_dir.name)), public))
    roster = make_roster(members)
    roster.save(path)
    log.info("secure-aggregation roster of %d members written to %s (digest %s)", num_nodes, path, roster.digest[:16])
    return path


def check_mechanisms(settings: Settings) -> None:
    """Fail in a second, not after data preparation and Ray's start, on a setting only a mechanism checks."""
    from federation.device import select_device
    from privacy.dp import DPConfig

    DPConfig.from_mapping(asdict(settings.privacy))  # the request, as a node would build it
    select_device(settings.device)


def check_signing_key(settings: S) -> S:
    """``settings`` with ``registry.signing_key`` made absolute after loading the key, unless it may be created.

    With ``registry.create_key=false`` (always in ``fedmart coordinate``) a missing or unreadable
    key is a UserError before anything starts: a wrong path must stop the command, not start
    a second signer whose versions nobody can verify.
    """
    from privacy.signing import KeyFileError, load_keypair

    reg = settings.registry
    if reg.create_key:
        return settings
    path = Path(reg.signing_key).resolve()
    try:
        load_keypair(path)
    except KeyFileError as exc:
        raise UserError(
            f"registry.signing_key: {exc}; it is never created here: point registry.signing_key at the "
            "coordinator's key, or make one once with `fedmart registry keygen PATH`"
        ) from exc
    return replace(settings, registry=replace(reg, signing_key=str(path)))


def check_init(settings: S, catalog: Path | None = None, *, verify: bool = True) -> S:
    """``settings`` with ``federation.init`` (and its key) made absolute, after checking it, unless unset.

    Before anything starts: its signature and its model shape; with the run's ``catalog``, also the
    mapping of its items onto it (``federation/init_model.py``). Each failure is a one-line UserError.
    ``verify=False`` (a resumed run, which starts from its checkpoint) only makes the paths absolute.
    """
    from federation.catalog import Catalog
    from federation.init_model import InitError, load_init, verified_init

    fed = settings.federation
    if not fed.init:
        return settings
    key = str(Path(fed.init_public_key).resolve()) if fed.init_public_key else None
    settings = replace(settings, federation=replace(fed, init=str(Path(fed.init).resolve()), init_public_key=key))
    if not verify:
        return settings
    try:
        if catalog is None:
            verified_init(settings)
        else:
            load_init(settings, Catalog.load(catalog))
    except InitError as exc:
        raise UserError(str(exc)) from exc
    return settings


def check_settings(cfg: dict[str, Any]) -> SimulateSettings:
    """The composed config as the typed tree, validated once (here, where it enters)."""
    settings = check_signing_key(SimulateSettings.from_dict(cfg))
    check_mechanisms(settings)
    return settings


def simulate(cfg: dict[str, Any], run_dir: Path) -> Path:
    """Run (or resume) a simulated federation; returns the run directory."""
    from flwr.simulation import run_simulation

    from clients.app import build_client_app
    from federation.app import build_server_app

    settings = check_settings(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    sim_file = run_dir / "sim.json"
    if sim_file.is_file():  # resume: the silos were written by the first invocation (and init was used then)
        sim = json.loads(sim_file.read_text())
        settings = check_init(settings, verify=False)
    else:
        settings = check_init(settings)  # federation.init's signature and shape, before the data
        sim = prepare(cfg, run_dir)
        settings = check_init(settings, Path(sim["catalog"]))  # and its items mapped onto the run's catalog
        sim_file.write_text(json.dumps(sim, indent=1) + "\n")
    # The run config is the request only: the simulated nodes' policy (`node`) goes to them directly.
    run_config = flatten(settings.request().with_sim(build(SimSettings, sim)).to_dict())
    simulation = settings.simulation
    backend_config = {
        "client_resources": {"num_cpus": simulation.cpus_per_node, "num_gpus": simulation.gpus_per_node},
        "init_args": {"num_cpus": simulation.num_cpus or os.cpu_count() or 1, "log_to_driver": True},
    }
    (run_dir / "refused.txt").unlink(missing_ok=True)
    roster = make_roster_for_run(run_dir, sim["nodes-dir"], int(sim["num-nodes"])) if sim["num-nodes"] > 1 else None
    run_simulation(
        server_app=build_server_app(run_config),
        # The simulated nodes' own policy and roster identity go to the nodes, never into the run config.
        client_app=build_client_app(
            run_config,
            node_policy=asdict(settings.node),
            node_identity={"roster": str(roster), "nodes-dir": sim["nodes-dir"]} if roster else None,
        ),
        num_supernodes=int(sim["num-nodes"]),
        backend_config=backend_config,
    )
    refused = run_dir / "refused.txt"
    if refused.is_file():
        raise UserError(refused.read_text().strip())
    if not (run_dir / "report.md").is_file():
        raise RuntimeError(f"the simulation ended without a report in {run_dir}; see the log above")
    return run_dir


def _simulate_job(cfg: DictConfig) -> None:
    run_job(cfg, simulate, command="simulate", groups_note=": config groups come from the saved run's config.yaml")


main = hydra_entry("config", "simulate", _simulate_job)
