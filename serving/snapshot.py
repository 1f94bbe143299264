"""The served model version: select the newest promoted version that verifies, load it, swap it in.

A :class:`Snapshot` is a verified version, ready on its device, with its cold-start
ranking; it is never mutated. :class:`VersionKeeper` holds the current one and swaps it
for a new one by a single reference assignment, so a request that took the old snapshot
keeps it to the end. A tampered, unsigned or mismatching version is refused with a log
line and the previous version keeps serving.
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
from serving.config import ServeError
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
    """

    def __init__(
        self,
        registry: ModelRegistry,
        public_key: Ed25519PublicKey,
        catalog: Catalog,
        device: torch.device,
        *,
        text_embeddings: Callable[[], torch.Tensor],
    ) -> None:
        self.registry = registry
        self.public_key = public_key
        self.catalog = catalog
        self.device = device
        self._text_embeddings = text_embeddings
        self.current: Snapshot | None = None
        self.refused: dict[str, str] = {}  # version -> reason, for /model
        self._promotions_stamp: tuple | None = None
        self._swap_lock = threading.Lock()

    def _stamp(self) -> tuple | None:
        try:
            st = (self.registry.root / "promotions.jsonl").stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def select(self) -> str | None:
        """Newest promoted version that verifies; logs each refusal."""
        self._promotions_stamp = self._stamp()
        records = self.registry.promoted()
        seen: set[str] = set()
        for rec in reversed(records):
            v = rec["version"]
            if v in seen:
                continue
            seen.add(v)
            ok, reason = self.registry.verify(v, self.public_key)
            if ok:
                return v
            if self.refused.get(v) != reason:
                log.error(
                    "refusing promoted version %s: %s; %s",
                    v,
                    reason,
                    f"still serving {self.current.version}" if self.current else "trying an older promotion",
                )
            self.refused[v] = reason
        return None

    def load(self, version: str) -> Snapshot:
        """Verify, load, warm up; raises RegistryError/ServeError on anything wrong."""
        weights, meta = self.registry.load(version, self.public_key)
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
        promotion = next((r for r in reversed(self.registry.promoted()) if r["version"] == version), {})
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
            if version is None or version == self.current.version:
                return None
            try:
                snap = self.load(version)
            except (RegistryError, ServeError, ValueError) as exc:
                self.refused[version] = str(exc)
                log.error("refusing promoted version %s: %s; still serving %s", version, exc, self.current.version)
                return None
            self.refused.pop(version, None)
            old, self.current = self.current, snap  # the swap: one reference assignment
            log.info("now serving %s (was %s)", version, old.version)
            return version
