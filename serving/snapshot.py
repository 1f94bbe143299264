"""The served model version: select the newest signed promotion, check it, load it, swap it in.

A :class:`Snapshot` is a verified version, ready on its device, with its cold-start
ranking; it is never mutated. :class:`VersionKeeper` holds the current one and swaps it
for a new one by a single reference assignment, so a request that took the old snapshot
keeps it to the end. The candidate is the version of the valid promotion with the highest
counter (``federation/promotions.py``), never an older one: it is refused, with a log line
while the previous version keeps serving, when its promotion counter is below one already
served (a rolled-back ``promotions.jsonl``), when the version is tampered, unsigned or for
another catalog, or when its signed privacy metadata does not meet ``--require``
(``serving/policy.py``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation.catalog import Catalog
from federation.globalmodel import set_weights
from federation.model import SASRec, SASRecConfig
from federation.registry import ModelRegistry, RegistryError
from privacy.signing import key_fingerprint
from serving.config import ServeError
from serving.policy import HighWater, Requirements
from serving.scoring import fast_scorer

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
    """A verified model version, on its device, with its cold-start ranking. Never mutated."""

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
    loaded_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def _sasrec_config(model_config: dict[str, Any], catalog: Catalog) -> SASRecConfig:
    """The metadata's ``model_config`` is ``SASRecConfig.to_dict()``; a Hydra model group plus
    ``max_len`` is accepted too."""
    known = set(SASRecConfig.__dataclass_fields__)
    if "num_items" in model_config:
        return SASRecConfig(**{k: v for k, v in model_config.items() if k in known})
    from federation.globalmodel import model_config as from_hydra

    return from_hydra(catalog, model_config, int(model_config.get("max_len", 50)))


def fallback_scores(
    registry: ModelRegistry,
    version: str,
    public_key: Ed25519PublicKey,
    weights: dict[str, np.ndarray],
    num_items: int,
) -> tuple[str, np.ndarray]:
    """The cold-start ranking of ``version`` -> (kind, ``(n + 1,)`` scores): its signed popularity,
    else the model's output bias, else catalog order."""
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
    """Holds the served :class:`Snapshot` (``current``) and swaps in newly promoted, verified versions.

    ``text_embeddings`` gives the catalog's title embeddings, for models trained with them.
    ``requirements``: ``--require``; ``high_water``: the promotion counter served so far.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        public_key: Ed25519PublicKey,
        catalog: Catalog,
        device: torch.device,
        *,
        text_embeddings: Callable[[], torch.Tensor],
        requirements: Requirements | None = None,
        high_water: HighWater | None = None,
    ) -> None:
        self.registry = registry
        self.public_key = public_key
        self.catalog = catalog
        self.device = device
        self._text_embeddings = text_embeddings
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

    def load(self, version: str) -> Snapshot:
        """Verify, load, warm up; raises RegistryError/ServeError on anything wrong."""
        weights, meta = self.registry.load(version, self.public_key)
        unmet = self.requirements.unmet(meta)  # again, on the bytes just verified and loaded
        if unmet:
            raise ServeError(f"{version}: {unmet}")
        if meta.get("catalog_version") != self.catalog.version:
            raise ServeError(
                f"{version} was trained on catalog {meta.get('catalog_version')}, "
                f"but --catalog is {self.catalog.version}: serve it with its own catalog"
            )
        cfg = _sasrec_config(dict(meta.get("model_config") or {}), self.catalog)
        if cfg.num_items != self.catalog.num_items:
            raise ServeError(f"{version}: model has {cfg.num_items} items, the catalog {self.catalog.num_items}")
        text = self._text_embeddings() if cfg.text_dim else None
        model = SASRec(cfg, text_embeddings=text)
        try:
            set_weights(model, weights)
        except ValueError as exc:
            raise ServeError(f"{version}: {exc}") from exc
        model = model.to(self.device).eval()
        infer, inference = fast_scorer(model, self.device)
        kind, scores = fallback_scores(self.registry, version, self.public_key, weights, self.catalog.num_items)
        order = np.argsort(-scores[1:], kind="stable") + 1
        promotion = self._selected if self._selected.get("version") == version else {}
        log.info("%s: inference path %s on %s", version, inference, self.device)
        return Snapshot(version, meta, model, cfg.max_len, kind, scores, order, promotion, infer, inference)

    def maybe_reload(self, force: bool = False) -> str | None:
        """Swap in a newly promoted verified version; returns it, or None if nothing changed."""
        assert self.current is not None, "load a first version before reloading"
        with self._swap_lock:
            stamp = self._stamp()
            if not force and stamp == self._promotions_stamp:
                return None
            version = self.select()
            if version is None:
                return None
            counter = int(self._selected["counter"])
            if version == self.current.version:  # promoted again: nothing to load, the counter moves on
                self.high_water.advance(counter, version)
                return None
            try:
                snap = self.load(version)
            except (RegistryError, ServeError, ValueError) as exc:
                self._refuse(version, str(exc).removeprefix(f"{version}: "))
                return None
            self.refused.pop(version, None)
            old, self.current = self.current, snap  # the swap: one reference assignment
            self.high_water.advance(counter, version)
            log.info("now serving %s (promotion #%d; was %s)", version, counter, old.version)
            return version

    def start(self) -> Snapshot:
        """Select and load the first version (raises :class:`ServeError` with the reason when there is none)."""
        version = self.select()
        if version is None:
            raise ServeError(self.last_refusal or "no signed promotion")
        self.current = self.load(version)
        self.high_water.advance(int(self._selected["counter"]), version)
        return self.current
