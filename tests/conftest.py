"""Shared fixtures: a tiny catalog anyone can reason about by hand, a tiny signed world, and the
smallest simulated federation.

The signed world (a catalog, a registry with one signed version, its keys) serves the
registry, command and serving tests. Tests run with ``--import-mode=importlib``, so
helpers cannot be imported from a sibling module; the ``support`` fixture hands them over,
and the ``runbook`` fixture ``tests/runbook.py`` (the docs' marked commands, run as processes).
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clients.synthetic import generate
from conf.settings import SyntheticSettings
from federation.catalog import Catalog
from federation.globalmodel import get_weights
from federation.model import SASRec, SASRecConfig
from federation.registry import ModelRegistry
from serving.config import ServeConfig


@pytest.fixture
def tiny_catalog() -> Catalog:
    n = 6
    return Catalog(
        item_id=np.array([f"i{i}" for i in range(1, n + 1)]),
        title=np.array(["Red Kettle", "Blue Kettle", "Green Tea", "Black Tea", "Steel Pan", "Iron Pan"]),
        department=np.array(["Kitchen", "Kitchen", "Grocery", "Grocery", "Kitchen", "Kitchen"]),
        merchant=np.array(["m1", "m2", "m1", "m2", "m1", "m2"]),
        price=np.array([10.0, 12.0, 3.0, 4.0, 20.0, 25.0]),
    )


# Hydra overrides (also valid `flwr run --run-config` pairs) for the smallest federation the
# end-to-end tests run: 3 department nodes, 600 users, a 16-wide one-head model, no central eval,
# small batches and whole local epochs (the main job's batch of 2048 needs 23,000 users a node).
# Private by default, as the main job: DP-SGD at target epsilon 8 under secure aggregation.
SMALL_FEDERATION = (
    "data.synthetic.num_users=600",
    "data.synthetic.num_items=150",
    "data.synthetic.num_departments=3",
    "data.synthetic.num_merchants=6",
    "data.max_len=20",
    "model.hidden=16",
    "model.heads=1",
    "federation.central_eval_users=0",
    "train.batch_size=128",
    "train.lr=0.001",
    "federation.local_steps=0",
)


@pytest.fixture(scope="session")
def small_federation() -> tuple[str, ...]:
    """:data:`SMALL_FEDERATION`, for tests that cannot import this module (``--import-mode=importlib``)."""
    return SMALL_FEDERATION


# --- a tiny signed world: registry, keys, catalog ------------------------------------------------

TINY = {"hidden": 16, "layers": 1, "heads": 1, "max_len": 12, "dropout": 0.0, "attn_dropout": 0.0}


@dataclass
class World:
    root: Path
    catalog: Catalog
    catalog_path: Path
    registry: ModelRegistry
    key: Path
    pub: Path
    versions: list[str]
    popularity: np.ndarray

    @property
    def registry_path(self) -> Path:
        return self.registry.root

    def ids(self, idx) -> list[str]:
        """The catalog's item ids at 0-based positions ``idx``."""
        return [self.catalog.item_id[i] for i in idx]

    def serve_config(self, **overrides) -> ServeConfig:
        kw = dict(
            registry=self.registry_path,
            public_key=self.pub,
            catalog=self.catalog_path,
            search=False,
            reload_interval=0.2,
            text_cache=self.root / "title_emb.npy",
        )
        kw.update(overrides)
        return ServeConfig(**kw)


def random_weights(catalog: Catalog, seed: int, **config) -> tuple[dict[str, np.ndarray], dict]:
    cfg = SASRecConfig(num_items=catalog.num_items, **{**TINY, **config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SASRec(cfg)
    return get_weights(model), cfg.to_dict()


def publish(
    world: World, seed: int, *, promote: bool = True, round: int | None = None, privacy: dict | None = None
) -> str:
    weights, model_config = random_weights(world.catalog, seed)
    version = world.registry.publish(
        weights,
        run="test",
        round=round if round is not None else len(world.versions) + 1,
        config_hash="cfg",
        catalog_version=world.catalog.version,
        model_config=model_config,
        metrics={"ndcg@10": 0.1 * seed},
        privacy=privacy if privacy is not None else {"epsilon": 2.0, "delta": 1e-5},
        parent=world.versions[-1] if world.versions else None,
        popularity=world.popularity,
    )
    world.versions.append(version)
    if promote:
        world.registry.promote(version, by="pytest")
    return version


def make_world(root: Path, *, num_items: int = 300, promote: bool = True) -> World:
    catalog, inter = generate(
        SyntheticSettings(num_users=300, num_items=num_items, num_departments=5, num_merchants=10, seed=0)
    )
    catalog_path = catalog.save(root / "catalog.parquet")
    key = root / "keys" / "signing.pem"
    registry = ModelRegistry(root / "registry", private_key_path=key, create_key=True)  # a test world: like simulate
    world = World(
        root=root,
        catalog=catalog,
        catalog_path=catalog_path,
        registry=registry,
        key=key,
        pub=key.with_name("signing.pem.pub"),
        versions=[],
        popularity=np.bincount(inter.item, minlength=num_items + 1),
    )
    publish(world, seed=1, promote=promote)
    return world


def edit_catalog(catalog: Catalog, *, add: tuple[tuple[str, str], ...] = (), remove: tuple[str, ...] = ()) -> Catalog:
    """``catalog`` without the items ``remove`` and with new items ``add`` ((item_id, title) pairs) at the end.

    New items take the first item's department and merchant, and price 1.0.
    """
    keep = ~np.isin(catalog.item_id, list(remove))
    ids, titles = [i for i, _ in add], [t for _, t in add]
    return Catalog(
        item_id=np.concatenate([catalog.item_id[keep], np.asarray(ids, dtype=str)]),
        title=np.concatenate([catalog.title[keep], np.asarray(titles, dtype=str)]),
        department=np.concatenate([catalog.department[keep], np.repeat(catalog.department[0], len(add))]),
        merchant=np.concatenate([catalog.merchant[keep], np.repeat(catalog.merchant[0], len(add))]),
        price=np.concatenate([catalog.price[keep], np.ones(len(add))]),
    )


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _serve_in_thread(*args, **kwargs):
    from serving.http import serve_in_thread  # imported on use: most tests need no HTTP stack

    return serve_in_thread(*args, **kwargs)


@pytest.fixture(scope="session")
def support() -> SimpleNamespace:
    return SimpleNamespace(
        make_world=make_world,
        publish=publish,
        random_weights=random_weights,
        flip_byte=flip_byte,
        edit_catalog=edit_catalog,
        running_server=_serve_in_thread,
        wait_until=wait_until,
    )


@pytest.fixture(scope="session")
def runbook():
    """``tests/runbook.py``: the runbooks' marked commands, read from the docs and run as real processes."""
    spec = importlib.util.spec_from_file_location("fedmart_tests_runbook", Path(__file__).with_name("runbook.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Put the root logger's handlers back after each test.

    A command run in-process (Hydra's entry points configure logging) binds a handler to the
    stderr pytest captured for that test, which is closed afterwards: a later test's log
    record would then print "--- Logging error ---" into its own captured stderr.
    """
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers = handlers
    root.setLevel(level)
