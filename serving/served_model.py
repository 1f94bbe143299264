"""A registry version as a model of the *served* catalog: its item rows mapped by item_id.

The version was trained on one catalog (its signed ``catalog_version``); the server may serve
another (a newer signed catalog version, ``serving/catalog_view.py``). :func:`build_served_model`
maps the version's item-indexed rows onto the served catalog with
:func:`federation.catalog_map.map_item_rows`:

* items in both catalogs keep their rows (reordering is harmless: the match is by ``item_id``);
* items the served catalog removed have no row, so they can never be recommended or found;
* items it added get zero rows. A model with a text tower (``model=sasrec_text``) scores them
  from their text (a zero ID residual and bias leave ``P t_i``). An ID-only model has nothing
  to score them with: they are ``unscored`` (``-inf`` in every personalised ranking, so never
  above an item the model learned) and come after every known item in the cold-start
  ranking, in catalog order. ``/search`` still finds them by their title.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import federation.model as model_module
from federation.catalog import Catalog
from federation.catalog_map import Alignment, align, item_keys, map_item_rows
from federation.globalmodel import set_weights
from federation.model import SASRec, SASRecConfig

__all__ = ["ServedModel", "build_served_model", "has_tower", "map_fallback", "sasrec_config"]

# (the served model's config, the served catalog) -> the frozen text rows it is built with
TextRows = Callable[[SASRecConfig, Catalog], torch.Tensor]


def sasrec_config(model_config: dict[str, Any], catalog: Catalog) -> SASRecConfig:
    """A version's model config. The metadata's ``model_config`` is ``SASRecConfig.to_dict()`` or
    a Hydra model group plus ``max_len``; ``catalog`` is the one it was trained on (it sizes the latter)."""
    known = set(SASRecConfig.__dataclass_fields__)
    if "num_items" in model_config:
        return SASRecConfig(**{k: v for k, v in model_config.items() if k in known})
    from federation.globalmodel import model_config as from_hydra

    return from_hydra(catalog, model_config, int(model_config.get("max_len", 50)))


def has_tower(cfg: SASRecConfig) -> bool:
    """Does the model score an item from its text (``model=sasrec_text``), so that a new item has a score?"""
    return bool(getattr(cfg, "tower", False))  # SASRecConfig.tower comes with the text tower


def _new_model(cfg: SASRecConfig, text: torch.Tensor | None) -> SASRec:
    # The text tower's branch adds `federation.model.create` (SASRec or TextTowerSASRec by cfg.tower).
    create = getattr(model_module, "create", None)
    return create(cfg, text_embeddings=text) if create is not None else SASRec(cfg, text_embeddings=text)


@dataclass(frozen=True)
class ServedModel:
    model: SASRec  # sized and indexed by the served catalog, on CPU, eval mode
    config: SASRecConfig
    alignment: Alignment  # training catalog -> served catalog
    unscored: np.ndarray | None  # (n + 1,) bool: items with no learned score (ID-only model, new items)

    def summary(self, trained_on: str) -> dict[str, Any]:
        return {"trained_on": trained_on, **self.alignment.summary(), "new_items_scored": self.unscored is None}


def build_served_model(
    weights: dict[str, np.ndarray],
    model_config: dict[str, Any],
    training: Catalog,
    served: Catalog,
    text_rows: TextRows,
) -> ServedModel:
    """The version's model with its item rows on ``served``; ``ValueError`` when the weights do not fit."""
    cfg = sasrec_config(model_config, training)
    if cfg.num_items != training.num_items:
        raise ValueError(f"model has {cfg.num_items} items, the catalog it was trained on {training.num_items}")
    alignment = align(training, served)
    mapped = map_item_rows(weights, training, served, item_keys(weights), alignment=alignment)
    cfg = dataclasses.replace(cfg, num_items=served.num_items)
    text = text_rows(cfg, served) if cfg.text_dim else None
    model = _new_model(cfg, text)
    set_weights(model, mapped)
    unscored = None
    if len(alignment.added) and not has_tower(cfg):
        unscored = np.zeros(served.num_items + 1, dtype=bool)
        unscored[alignment.added] = True
    return ServedModel(model.eval(), cfg, alignment, unscored)


def map_fallback(scores: np.ndarray, alignment: Alignment) -> np.ndarray:
    """A cold-start ranking ``(n_old + 1,)`` on the served catalog: new items after every known one, in catalog order.

    The ranking is the version's (popularity, or its own prior): it knows nothing of a new item.
    """
    if alignment.identity:
        return scores
    out = np.asarray(scores, dtype=np.float64)[alignment.source].copy()
    added = alignment.added
    if len(added):
        kept = np.flatnonzero(alignment.source[1:] > 0) + 1
        floor = float(out[kept].min()) if len(kept) else 0.0
        out[added] = floor - 1.0  # ties among new items: the stable sort keeps catalog order
    return out
