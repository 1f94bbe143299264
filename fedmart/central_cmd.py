"""``fedmart train-central``: the centralized baseline (:mod:`clients.central`), a Hydra app over conf/central.yaml.

With ``registry.root=DIR`` each seed's best model is also published there as a signed registry
version (with the catalog it was trained on, as a signed catalog version), signed with
``registry.signing_key`` (default ``keys/central.key``, its own key): a starting point for
``fedmart simulate federation.init=DIR/<version> federation.init_public_key=keys/central.key.pub``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedmart.hydra_runs import hydra_entry

__all__ = ["main", "publish_central"]

log = logging.getLogger(__name__)

# What a centrally trained version's signed privacy metadata says: no DP, no secure aggregation.
CENTRAL_PRIVACY = {"mode": "off", "unit": "none (centralized training on pooled data)", "epsilon_max": None}


def check_publish_key(cfg: Any) -> None:
    """With ``registry.root``, the signing key must load (or may be created) before any training starts."""
    from fedmart.errors import UserError
    from privacy.signing import KeyFileError, load_keypair

    reg = cfg.registry
    if not reg.root or reg.create_key:
        return
    try:
        load_keypair(Path(reg.signing_key))
    except KeyFileError as exc:
        raise UserError(
            f"registry.signing_key: {exc}; or let train-central make its own: registry.create_key=true"
        ) from exc


def publish_central(cfg: Any, out_dir: Path, summary: dict[str, Any]) -> list[str]:
    """Sign each seed's best weights (``best-seed<N>.safetensors``) into ``cfg.registry.root``; returns the versions."""
    from federation.catalog import Catalog
    from federation.globalmodel import load_weights
    from federation.registry import ModelRegistry
    from federation.runconfig import config_hash
    from federation.trail import head_bias_popularity

    reg = cfg.registry
    registry = ModelRegistry(Path(reg.root), private_key_path=Path(reg.signing_key), create_key=reg.create_key)
    catalog = Catalog.load(out_dir / "catalog.parquet")
    registry.catalogs.publish(catalog, by=f"train-central {out_dir.name}", if_new=True)
    versions = []
    for r in summary["runs"]:
        weights = load_weights(out_dir / f"best-seed{r['seed']}.safetensors")
        versions.append(
            registry.publish(
                weights,
                run=out_dir.name,
                round=0,  # not a federated round: a starting point
                config_hash=config_hash(asdict(cfg)),
                catalog_version=catalog.version,
                model_config={**asdict(cfg.model), "max_len": cfg.data.max_len},
                metrics={
                    "central": {
                        "seed": r["seed"],
                        "best_epoch": r["best_epoch"],
                        "valid_ndcg@10": r["valid_ndcg@10"],
                        **{f"test_{k}": v for k, v in r["test"].items()},
                    }
                },  # fmt: skip
                privacy=CENTRAL_PRIVACY,
                parent=None,
                popularity=head_bias_popularity(weights),
            )
        )
    log.info("published %s in %s (signed with %s)", ", ".join(versions), registry.root, reg.signing_key)
    return versions


def _train_central(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from clients.central import format_summary, run_central
    from conf.settings import CentralSettings
    from fedmart.console import console
    from fedmart.errors import exit_on_user_error

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    settings = CentralSettings.from_dict(OmegaConf.to_container(cfg, resolve=True))
    exit_on_user_error(check_publish_key)(settings)  # one line and exit 2, before training
    summary = run_central(settings, out_dir)
    console.print(format_summary(summary))
    console.print(f"outputs: {out_dir}")
    if settings.registry.root:
        versions = publish_central(settings, out_dir, summary)
        console.print(f"signed versions {', '.join(versions)} in {settings.registry.root}", soft_wrap=True)


# The job keeps the name it had when clients/central.py was the entry (its log is central.log).
main = hydra_entry("central", "central", _train_central, user_errors=False)
