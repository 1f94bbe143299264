"""One entry point from a data config to a catalog plus validated interactions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients import movielens
from clients.interactions import DataError, Interactions, read_table
from clients.synthetic import generate
from clients.validation import summary, validate, write_report
from conf.settings import DataSettings
from federation.catalog import Catalog

__all__ = ["LoadedData", "load_dataset"]

log = logging.getLogger(__name__)


@dataclass
class LoadedData:
    catalog: Catalog
    interactions: Interactions
    report: dict | None  # validation report, None for generated data


def load_dataset(cfg: DataSettings, report_dir: str | Path | None = None) -> LoadedData:
    """Load and validate the configured data; the report (and quarantine) go to ``report_dir``."""
    if cfg.source == "synthetic":
        catalog, inter = generate(cfg.synthetic)
        log.info(
            "synthetic data: %d users, %d items, %d events",
            inter.num_users,
            catalog.num_items,
            len(inter),
        )
        return LoadedData(catalog, inter, None)
    if cfg.source == "movielens":
        path = Path(cfg.path or "data/ml-100k")
        if not any((path / f).is_file() for f in ("ml-100k.inter", "u.data")):
            if not cfg.fetch:
                raise DataError(
                    f"{path}: MovieLens-100K not found; run `fedmart data fetch movielens-100k --dest {path}`"
                )
            movielens.fetch(path)
        catalog, table, users = movielens.load(path)
        result = validate(table, catalog, min_history=cfg.min_history, source=str(path))
        occ = dict(zip(users["user_id"], users["occupation"], strict=True))
        result.interactions.user_attrs["occupation"] = np.array(
            [occ.get(u, "unknown") for u in result.interactions.user_ids]
        )
    else:
        if not cfg.path or not cfg.catalog:
            raise DataError("data.source=files needs data.path=INTERACTIONS_FILE and data.catalog=CATALOG_PARQUET")
        catalog = Catalog.load(cfg.catalog, hint="create it with `fedmart data fetch` or pass data.catalog=PATH")
        result = validate(read_table(cfg.path), catalog, min_history=cfg.min_history, source=str(cfg.path))
    if report_dir is not None:
        write_report(result, report_dir)
    # Every count, every time: corruption as a warning, short histories (the data's nature) as information.
    level = logging.WARNING if result.report["rows_quarantined"] else logging.INFO
    log.log(level, "%s: %s", result.report["source"], summary(result.report))
    return LoadedData(catalog, result.interactions, result.report)
