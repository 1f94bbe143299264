"""The served state: a model version on a catalog. Select, check, load, map, swap.

A :class:`Snapshot` is a verified version mapped onto the served catalog (its item rows moved
by ``item_id``, ``serving/served_model.py``), ready on its device, with its cold-start ranking
and the catalog's lookups; it is never mutated. :class:`VersionKeeper` holds the current one
and swaps it for a new one by a single reference assignment, so a request that took the old
snapshot keeps it (model and catalog together) to the end. Two things make a new snapshot:

* a **promotion**: the version of the valid promotion with the highest counter
  (``federation/promotions.py``), never an older one. It is refused, with a log line while the
  previous version keeps serving, when its promotion counter is below one already served (a
  rolled-back ``promotions.jsonl``), when the version is tampered or unsigned, when the catalog
  it was trained on cannot be found (``serving/catalog_view.py``), or when its signed privacy
  metadata does not meet ``--require`` (``serving/policy.py``);
* a **catalog version**: the newest signed catalog (``federation/catalogs.py``). Its new titles
  are embedded, and the current model mapped onto it, on the poller's thread before the swap.
  It is refused, the current catalog serving on, when it is tampered, its counter goes back,
  or the current model cannot be mapped onto it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation.catalog import Catalog
from federation.model import SASRec, SASRecConfig
from federation.registry import ModelRegistry, RegistryError
from privacy.signing import key_fingerprint
from serving.catalog_view import CatalogSource, CatalogView
from serving.config import ServeError
from serving.items import ItemIndex
from serving.policy import HighWater, Requirements
from serving.scoring import fast_scorer
from serving.search import tower_space
from serving.served_model import build_served_model, map_fallback

__all__ = ["Snapshot", "VersionKeeper", "FALLBACK_WHAT", "fallback_scores"]

log = logging.getLogger(__name__)

# What each cold-start ranking is, as the response's note says it.
FALLBACK_WHAT = {
    "popularity": "item popularity published with this version",
    "model_prior": "the model's item prior (output bias; no popularity was published with this version)",
    "catalog_order": "catalog order (no popularity was published with this version)",
}


@dataclass
class Snapshot:
    """A verified model version on a served catalog, on its device, with its cold-start ranking. Never mutated."""

    version: str
    metadata: dict[str, Any]
    model: SASRec
    max_len: int
    fallback: str  # popularity | model_prior | catalog_order
    fallback_scores: np.ndarray  # (n + 1,) float64, index 0 unused
    fallback_order: np.ndarray  # (n,) 1-based item indices, best first
    promotion: dict[str, Any]
    infer: Callable[[torch.Tensor], torch.Tensor]  # (b, max_len) left-padded -> (b, n + 1) scores
    inference: str  # "traced, trimmed" or "eager": which path infer takes
    view: CatalogView  # the served catalog: lookups, department masks, its signed version
    mapping: dict[str, Any] = field(default_factory=dict)  # trained_on, items, added, removed, new_items_scored
    tower_space: tuple | None = None  # a text tower's (unit item rows, projection), for /search
    loaded_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def items(self) -> ItemIndex:
        return self.view.items

    @property
    def catalog(self) -> Catalog:
        return self.view.catalog


def _masked(infer: Callable[[torch.Tensor], torch.Tensor], unscored: torch.Tensor) -> Callable:
    """``infer`` with the items the model has no learned score for at ``-inf`` (never above a learned one)."""

    def run(seq: torch.Tensor) -> torch.Tensor:
        return infer(seq).masked_fill_(unscored, -math.inf)

    return run


def fallback_scores(
    registry: ModelRegistry,
    version: str,
    public_key: Ed25519PublicKey,
    weights: dict[str, np.ndarray],
    num_items: int,
) -> tuple[str, np.ndarray]:
    """The cold-start ranking of ``version`` on its training catalog -> (kind, ``(n + 1,)`` scores): its signed
    popularity, else the model's output bias, else catalog order."""
    n = num_items
    pop = registry.load_popularity(version, public_key)
    if pop is not None:
        pop = np.asarray(pop, dtype=np.float64)
        if len(pop) == n:
            pop = np.concatenate([[0.0], pop])
        if len(pop) == n + 1:
            return "popularity", pop
        log.warning("%s: popularity has %d entries, the catalog %d items; ignored", version, len(pop), n)
    bias = weights.get("head.bias")
    if bias is not None and len(bias) == n + 1:
        # The output bias of a softmax model tracks log item frequency: a popularity prior that is
        # pure post-processing of the (DP-trained) weights.
        return "model_prior", np.asarray(bias, dtype=np.float64)
    return "catalog_order", -np.arange(n + 1, dtype=np.float64)


class VersionKeeper:
    """Holds the served :class:`Snapshot` (``current``) and swaps in newly promoted versions and catalogs.

    ``catalogs`` selects the served catalog and finds training catalogs. ``text_rows(cfg, catalog)``
    gives the frozen text rows a text model is built with for ``catalog``; ``prepare_catalog(new,
    old)`` runs before a catalog swap (the title index embeds the new titles). ``requirements``:
    ``--require``; ``high_water``: the promotion counter served so far.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        public_key: Ed25519PublicKey,
        catalogs: CatalogSource,
        device: torch.device,
        *,
        text_rows: Callable[[SASRecConfig, Catalog], torch.Tensor],
        prepare_catalog: Callable[[Catalog, Catalog | None], None] | None = None,
        requirements: Requirements | None = None,
        high_water: HighWater | None = None,
    ) -> None:
        self.registry = registry
        self.public_key = public_key
        self.catalogs = catalogs
        self.device = device
        self._text_rows = text_rows
        self._prepare_catalog = prepare_catalog
        self.requirements = requirements or Requirements()
        self.high_water = high_water or HighWater(None, key_fingerprint(public_key))
        self.current: Snapshot | None = None
        self.refused: dict[str, str] = {}  # version (or promotions.jsonl line) -> reason, for /model
        self.last_refusal: str | None = None  # why the last select() found nothing to serve
        self._selected: dict[str, Any] = {}  # the promotion record the last select() chose
        self._promotions_stamp: tuple | None = None
        self._swap_lock = threading.Lock()

    def _stamp(self) -> tuple | None:
        try:
            st = (self.registry.root / "promotions.jsonl").stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refuse(self, what: str, reason: str, *, candidate: bool = True) -> None:
        """Record and log a refusal. Before the first version is served, the candidate's refusal is
        logged at INFO only: the start fails with it as its one-line error (:meth:`start`)."""
        if self.refused.get(what) != reason:
            if self.current is not None:
                level, then = logging.ERROR, f"still serving {self.current.version}"
            else:
                level, then = (logging.INFO if candidate else logging.WARNING), "nothing served yet"
            log.log(level, "refusing promoted version %s: %s; %s", what, reason, then)
        self.refused[what] = reason
        if candidate:
            self.last_refusal = f"{what}: {reason}"

    def select(self) -> str | None:
        """The version of the newest signed promotion if it passes every check; else None (each refusal logged)."""
        self._promotions_stamp = self._stamp()
        self.last_refusal = None
        promotions = self.registry.promotions(self.public_key)
        for line, reason in promotions.refused.items():
            self._refuse(f"promotions.jsonl line {line}", reason, candidate=False)
        record, why = promotions.newest()
        if record is None:
            self.last_refusal = why
            return None
        version, counter = str(record["version"]), int(record["counter"])
        reason = self.high_water.refusal(counter, version)
        if reason is None:
            ok, why_not = self.registry.verify(version, self.public_key)
            reason = None if ok else why_not.removeprefix(f"{version}: ")
        if reason is None:
            reason = self.requirements.unmet(self.registry.show(version))
        if reason is not None:
            self._refuse(version, reason)
            return None
        self._selected = record
        return version

    def load(self, version: str, view: CatalogView) -> Snapshot:
        """Verify, load, map onto ``view``'s catalog, warm up; raises RegistryError/ServeError on anything wrong."""
        weights, meta = self.registry.load(version, self.public_key)
        unmet = self.requirements.unmet(meta)  # again, on the bytes just verified and loaded
        if unmet:
            raise ServeError(f"{version}: {unmet}")
        trained_on = str(meta.get("catalog_version") or "")
        try:
            training = self.catalogs.training_catalog(trained_on, view.catalog)
            served = build_served_model(
                weights, dict(meta.get("model_config") or {}), training, view.catalog, self._text_rows
            )
        except (ServeError, ValueError) as exc:
            raise ServeError(f"{version} {exc}" if str(exc).startswith("trained on") else f"{version}: {exc}") from exc
        model = served.model.to(self.device)
        # Every snapshot (a new version, or the current one on a new catalog) comes through here with
        # a model built afresh, and gets its own scorer: the scorer precomputes the text tower's item
        # table from these weights and this catalog (serving/scoring._LastScores), so it must never
        # outlive them; nothing mutates a snapshot's model after this.
        infer, inference = fast_scorer(model, self.device)
        if served.unscored is not None:
            infer = _masked(infer, torch.from_numpy(served.unscored).to(self.device))
        kind, scores = fallback_scores(self.registry, version, self.public_key, weights, training.num_items)
        scores = map_fallback(scores, served.alignment)
        order = np.argsort(-scores[1:], kind="stable") + 1
        promotion = self._selected if self._selected.get("version") == version else {}
        log.info("%s on catalog %s: inference path %s on %s", version, view.version, inference, self.device)
        return Snapshot(
            version,
            meta,
            model,
            served.config.max_len,
            kind,
            scores,
            order,
            promotion,
            infer,
            inference,
            view,
            served.summary(trained_on),
            tower_space(model),
        )

    def maybe_reload(self, force: bool = False) -> str | None:
        """Swap in a newly promoted verified version and/or a newer signed catalog.

        Returns what was swapped in (the version id, or ``catalog <name>`` when only the catalog
        changed), or None if nothing changed. A new catalog is tried with the current model
        first, then a new version on the resulting catalog, so each refusal names its cause.
        """
        assert self.current is not None, "load a first version before reloading"
        with self._swap_lock:
            swapped = None
            if force or self.catalogs.changed():
                swapped = self._reload_catalog()
            if force or self._stamp() != self._promotions_stamp:
                swapped = self._reload_version() or swapped
            return swapped

    def _reload_catalog(self) -> str | None:
        current = self.current
        assert current is not None
        chosen, why = self.catalogs.select()
        if chosen is None or chosen.name == current.view.name:
            if why:
                log.debug("no catalog to swap in: %s", why)
            return None
        view = self.catalogs.view(chosen)
        try:
            if self._prepare_catalog is not None:
                self._prepare_catalog(view.catalog, current.view.catalog)  # new titles embedded, off the request path
            snap = self.load(current.version, view)
        except (RegistryError, ServeError, ValueError) as exc:
            self.catalogs.refuse(chosen.name, f"cannot serve {current.version} on it: {exc}")
            return None
        self.current = snap  # the swap: one reference assignment
        self.catalogs.served(view)
        log.info(
            "now serving catalog %s (#%d: %d items, %d new, %d removed against the model's) with %s",
            chosen.name,
            chosen.counter,
            view.catalog.num_items,
            snap.mapping.get("added", 0),
            snap.mapping.get("removed", 0),
            snap.version,
        )
        return f"catalog {chosen.name}"

    def _reload_version(self) -> str | None:
        current = self.current
        assert current is not None
        version = self.select()
        if version is None:
            return None
        counter = int(self._selected["counter"])
        if version == current.version:  # promoted again: nothing to load, the counter moves on
            self.high_water.advance(counter, version)
            return None
        try:
            snap = self.load(version, current.view)
        except (RegistryError, ServeError, ValueError) as exc:
            self._refuse(version, str(exc).removeprefix(f"{version}: "))
            return None
        self.refused.pop(version, None)
        self.current = snap  # the swap: one reference assignment
        self.high_water.advance(counter, version)
        log.info("now serving %s (promotion #%d; was %s)", version, counter, current.version)
        return version

    def start(self) -> Snapshot:
        """Select the catalog and the first version and load them (:class:`ServeError` with the reason when none)."""
        view = self.catalogs.first_view()
        version = self.select()
        if version is None:
            raise ServeError(self.last_refusal or "no signed promotion")
        self.current = self.load(version, view)
        self.catalogs.served(view)
        self.high_water.advance(int(self._selected["counter"]), version)
        return self.current
