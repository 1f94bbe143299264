"""A node's private side: where its data lives, its split, its cached model skeleton.

Where a node's data comes from, in order:

1. ``node_config["data-dir"]`` — a real deployment (``fedmart node --data DIR``);
   the node's own interactions file is validated against the catalog there and
   only clean rows are ever used (the report sits in ``DIR/.fedmart/``);
2. ``run_config["sim.nodes-dir"]`` + ``node_config["partition-id"]`` — ``fedmart simulate``
   wrote each simulated node's partition to its own directory before the run;
3. neither (``flwr run .`` with no data prepared): the built-in synthetic data,
   generated from the run's seed on the node itself and partitioned the same
   way, so the app runs out of the box on any Flower runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from clients.interactions import DataError, Interactions, read_table
from clients.sequences import Split, TrainDataset, build_sequences, leave_one_out
from clients.validation import quarantine_refusal, validate, write_report
from conf.settings import DataSettings, ModelSettings, NodeSettings, PartitionSettings, RunSettings
from federation.catalog import Catalog
from federation.globalmodel import build_model
from federation.model import SASRec

__all__ = [
    "NodeData",
    "NODE_DIR_NAME",
    "check_catalog",
    "load_node",
    "node_dir_for",
    "write_node_dir",
    "NodeRefused",
]

log = logging.getLogger(__name__)

NODE_DIR_NAME = "node-{pid:04d}"
_INTERACTIONS_FILES = ("interactions.parquet", "interactions.csv")


class NodeRefused(DataError):
    """The node's data failed validation; it does not take part (the report says why)."""


@dataclass
class NodeData:
    name: str
    directory: Path | None
    catalog: Catalog
    interactions: Interactions
    split: Split
    dataset_id: str  # content hash, for the node's own logs only: it never leaves the node
    report: dict | None = None
    canary_users: int = 0  # included canaries among the users (clients/canaries.py): the node's secret
    withheld_users: int = 0  # real users withheld for the membership test (clients/canaries.py)

    @property
    def real_users(self) -> int:
        """The node's real users (withheld ones too, not canaries): what δ is computed from and what it reports."""
        return self.interactions.num_users - self.canary_users + self.withheld_users

    def train_dataset(self, max_len: int) -> TrainDataset:
        return TrainDataset(self.split.train, max_len)

    @property
    def state_dir(self) -> Path:
        """Node-private state (privacy ledger, ...): never on the coordinator."""
        base = self.directory if self.directory is not None else Path(".fedmart-node") / self.name
        path = base / ".fedmart"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def released(self, key: str) -> bool:
        """Whether this node already released the non-private update ``key`` names (its own record)."""
        path = self.state_dir / "released.json"
        return path.is_file() and key in json.loads(path.read_text())

    def record_release(self, key: str) -> None:
        """Note a non-private release (private ones are in the privacy ledger), atomically."""
        path = self.state_dir / "released.json"
        done = json.loads(path.read_text()) if path.is_file() else []
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([*done, key][-1000:]))
        os.replace(tmp, path)

    @property
    def population_id(self) -> str:
        """The node's stable, random population id (its ledger's identity), created on first use.

        It is not derived from the data: appending interactions keeps the same population and
        its spend, and the id tells the coordinator nothing about the data (no confirmation
        attack on a content hash).
        """
        path = self.state_dir / "population-id"
        if path.is_file() and (value := path.read_text().strip()):
            return value
        value = uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        tmp.write_text(value + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        log.info("node %s: new population id %s", self.name, value)
        return value


def _dataset_id(inter: Interactions) -> str:
    h = hashlib.sha256()
    for arr in (inter.user, inter.item, inter.timestamp):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(inter.user_ids.astype(str).tolist()).encode())
    return h.hexdigest()[:16]


def _make(name: str, directory: Path | None, catalog: Catalog, inter: Interactions, report=None) -> NodeData:
    split = leave_one_out(build_sequences(inter))
    return NodeData(name, directory, catalog, inter, split, _dataset_id(inter), report)


def write_node_dir(directory: Path, name: str, catalog_path: Path, inter: Interactions) -> Path:
    """Simulation: write one node's (already validated) partition."""
    directory.mkdir(parents=True, exist_ok=True)
    inter.save(directory / "interactions.npz")
    # Absolute: a relative catalog path in node.json is read relative to the directory.
    meta = {"name": name, "catalog": str(Path(catalog_path).resolve())}
    (directory / "node.json").write_text(json.dumps(meta) + "\n")
    return directory


def node_dir_for(nodes_dir: str | Path, partition_id: int) -> Path:
    return Path(nodes_dir) / NODE_DIR_NAME.format(pid=int(partition_id))


def _catalog_file(d: Path, meta: dict, override: str | None) -> Path:
    """The node's catalog: ``--catalog``, else node.json's (relative to the directory), else DIR/catalog.parquet."""
    if override:
        return Path(override)
    if meta.get("catalog"):
        return d / meta["catalog"]  # an absolute path stays absolute
    return d / "catalog.parquet"


@lru_cache(maxsize=8)
def _load_dir(directory: str, catalog_path: str | None, name: str | None, max_quarantine: float) -> NodeData:
    d = Path(directory)
    meta = json.loads((d / "node.json").read_text()) if (d / "node.json").is_file() else {}
    catalog_file = _catalog_file(d, meta, catalog_path)
    catalog = Catalog.load(
        catalog_file, hint="pass --catalog PATH, or prepare the data directory with fedmart data prepare --catalog"
    )
    prepared_with = meta.get("catalog_version")
    if prepared_with and prepared_with != catalog.version:
        raise NodeRefused(
            f"{d}: the data was prepared against catalog {prepared_with}, but {catalog_file} is catalog "
            f"{catalog.version}; re-run `fedmart data prepare --catalog {catalog_file} ...` or pass the catalog "
            "it was prepared with"
        )
    node_name = name or meta.get("name") or d.name
    if (d / "interactions.npz").is_file():  # written by `fedmart simulate`, validated there
        return _make(node_name, d, catalog, Interactions.load(d / "interactions.npz"))
    raw = next((d / f for f in _INTERACTIONS_FILES if (d / f).is_file()), None)
    if raw is None:
        raise DataError(
            f"{d}: no interactions file; write the node's data there with `fedmart data prepare --out {d} ...` "
            "(or put interactions.parquet or interactions.csv there)"
        )
    result = validate(read_table(raw), catalog, source=str(raw))
    report_path, _ = write_report(result, d / ".fedmart" / "validation")
    refusal = quarantine_refusal(result.report, max_quarantine, where=report_path)
    if refusal:
        raise NodeRefused(refusal)
    return _make(node_name, d, catalog, result.interactions, result.report)


def check_catalog(node: NodeData, announced: str | None) -> None:
    """Refuse to take part when the coordinator trains on another catalog than the node's data was prepared on.

    ``announced`` is the coordinator's catalog version (``sim.catalog_version`` of the run
    config); None (a simulation, an older coordinator) skips the check. Item indices are
    positions in the catalog, so a node on another catalog would train the wrong item rows.
    """
    if announced and announced != node.catalog.version:
        where = f" {node.directory}" if node.directory else ""
        raise NodeRefused(
            f"catalog mismatch: this node's data{where} uses catalog {node.catalog.version}, the coordinator "
            f"trains on catalog {announced}; get the coordinator's catalog.parquet and re-run "
            "`fedmart data prepare --catalog CATALOG ...`, then restart `fedmart node`"
        )


@lru_cache(maxsize=4)
def _builtin(data_settings: DataSettings, partition_settings: PartitionSettings, partition_id: int) -> NodeData:
    from clients.datasets import load_dataset
    from clients.partition import partition

    data = load_dataset(data_settings)
    part = partition(data.interactions, data.catalog, partition_settings)
    if not 0 <= partition_id < len(part):
        raise DataError(
            f"partition-id {partition_id} is out of range: the built-in data has {len(part)} "
            f"{partition_settings.scheme} silos; run with num-supernodes={len(part)}"
        )
    inter = data.interactions.take(part.rows[partition_id])
    return _make(part.names[partition_id], None, data.catalog, inter)


def load_node(node: NodeSettings, settings: RunSettings) -> NodeData:
    """Resolve and load this node's data (cached per process)."""
    if node.data_dir:
        return _load_dir(node.data_dir, node.catalog, node.name, node.max_quarantine_fraction)
    if settings.sim.nodes_dir:
        return _load_dir(str(node_dir_for(settings.sim.nodes_dir, node.partition_id)), None, None, 0.0)
    return _builtin(settings.data, settings.partition, node.partition_id)


_MODELS: dict[tuple, SASRec] = {}


def model_skeleton(node: NodeData, model_cfg: ModelSettings, max_len: int) -> SASRec:
    """A model of the right shape, reused across rounds in this process (weights are overwritten)."""
    key = (node.catalog.version, model_cfg, int(max_len))
    if key not in _MODELS:
        cache = node.state_dir / f"title_emb-{node.catalog.version}.npy"
        _MODELS[key] = build_model(node.catalog, model_cfg, max_len, text_cache=cache)
    return _MODELS[key]
