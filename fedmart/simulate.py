"""``fedmart simulate``: the whole federation on one machine, in Flower's simulation engine.

Steps: compose the config (Hydra), load and validate the data, cut it into silos
(one directory per simulated node, as a real node would hold it), flatten the
config into Flower's run config (the one crossing, :mod:`federation.runconfig`),
and run the ServerApp and ClientApp in Flower's simulation engine (Ray).
``resume=outputs/<run>`` continues a run after its last completed round.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from federation.runconfig import flatten
from fedmart.hydra_runs import hydra_entry, run_job

__all__ = ["check_settings", "main", "prepare", "simulate"]

log = logging.getLogger(__name__)


def prepare(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write the catalog, each node's partition and the pooled eval data; return ``sim`` settings."""
    from clients.datasets import DataConfig, load_dataset
    from clients.node import node_dir_for, write_node_dir
    from clients.partition import PartitionConfig, partition

    data = load_dataset(DataConfig(**cfg["data"]), report_dir=run_dir / "data")
    catalog_path = data.catalog.save(run_dir / "catalog.parquet")
    part = partition(data.interactions, data.catalog, PartitionConfig(**cfg["partition"]))
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
    return {
        "run-dir": str(run_dir),
        "nodes-dir": str(nodes_dir),
        "catalog": str(catalog_path),
        "central-data": str(central),
        "num-nodes": len(part),
        "max-nodes-per-user": int(spread.max()),
        "mean-nodes-per-user": float(spread.mean()),
    }


def check_settings(cfg: dict[str, Any]) -> None:
    """Fail in a second, not after data preparation and Ray's start, on a bad setting."""
    from clients.datasets import DataConfig
    from clients.partition import PartitionConfig
    from clients.trainer import OptimConfig
    from federation.device import select_device
    from federation.model import SASRecConfig
    from federation.server import make_strategy

    DataConfig(**cfg["data"])
    PartitionConfig(**cfg["partition"])
    OptimConfig(**cfg["train"])
    SASRecConfig(num_items=1, max_len=int(cfg["data"]["max_len"]), **{
        k: v for k, v in cfg["model"].items() if k in ("hidden", "layers", "heads", "dropout", "attn_dropout")
    })  # fmt: skip
    select_device(str(cfg.get("device", "auto")))
    make_strategy(cfg["federation"], num_nodes=2, secagg=cfg.get("secagg"))
    if int(cfg["federation"]["num_rounds"]) < 1 or int(cfg["federation"]["local_epochs"]) < 0:
        raise ValueError("federation.num_rounds must be >= 1 and federation.local_epochs >= 0")
    if int(cfg["federation"].get("local_steps") or 0) < 0:
        raise ValueError("federation.local_steps must be >= 0 (0 = whole local epochs)")


def simulate(cfg: dict[str, Any], run_dir: Path) -> Path:
    """Run (or resume) a simulated federation; returns the run directory."""
    from flwr.simulation import run_simulation

    from clients.app import build_client_app
    from federation.app import build_server_app

    check_settings(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    sim_file = run_dir / "sim.json"
    if sim_file.is_file():  # resume: the silos were written by the first invocation
        sim = json.loads(sim_file.read_text())
    else:
        sim = prepare(cfg, run_dir)
        sim_file.write_text(json.dumps(sim, indent=1) + "\n")
    run_config = flatten({**cfg, "sim": sim})
    simulation = cfg.get("simulation", {})
    backend_config = {
        "client_resources": {
            "num_cpus": float(simulation.get("cpus_per_node", 1)),
            "num_gpus": float(simulation.get("gpus_per_node", 0.0)),
        },
        "init_args": {"num_cpus": int(simulation.get("num_cpus", os.cpu_count() or 1)), "log_to_driver": True},
    }
    run_simulation(
        server_app=build_server_app(run_config),
        client_app=build_client_app(run_config),
        num_supernodes=int(sim["num-nodes"]),
        backend_config=backend_config,
    )
    if not (run_dir / "report.md").is_file():
        raise RuntimeError(f"the simulation ended without a report in {run_dir}; see the log above")
    return run_dir


def _simulate_job(cfg: DictConfig) -> None:
    run_job(cfg, simulate, command="simulate", groups_note=": config groups come from the saved run's config.yaml")


main = hydra_entry("config", "simulate", _simulate_job)
