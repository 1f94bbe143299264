"""The serving core, usable without HTTP: one :class:`Server` over a registry, a public key and a catalog.

It composes the catalog lookups (:mod:`serving.items`), the served version
(:mod:`serving.snapshot`), ranking (:mod:`serving.scoring`) and title search
(:mod:`serving.search`). The catalog is fixed for the life of the process: a version
trained on another catalog is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from federation.catalog import Catalog
from federation.device import select_device
from federation.registry import ModelRegistry
from privacy.signing import key_fingerprint, load_public_key
from serving.config import ServeConfig, ServeError, default_threads
from serving.items import ItemIndex
from serving.policy import HighWater, Requirements
from serving.scoring import Job, fallback_top, make_job, rank_batch
from serving.search import TitleSearch
from serving.snapshot import Snapshot, VersionKeeper

__all__ = ["Server"]

log = logging.getLogger(__name__)


class Server:
    """The serving core: loading, swapping, ranking.

    Raises :class:`ServeError` when it cannot start: a bad key file, no registry, or no
    promoted version that verifies.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        torch.set_num_threads(int(config.threads or default_threads()))
        self.device = select_device(config.device)
        try:
            self.public_key = load_public_key(config.public_key)
        except ValueError as exc:
            raise ServeError(str(exc)) from exc
        if not Path(config.registry).is_dir():
            raise ServeError(f"{config.registry}: no model registry there")
        self.registry = ModelRegistry(Path(config.registry), public_key_path=Path(config.public_key))
        self.catalog = Catalog.load(
            config.catalog,
            hint="pass --catalog outputs/<run>/catalog.parquet (fedmart simulate and fedmart coordinate write it)",
        )
        self.items = ItemIndex(self.catalog, self.device)
        self.text = TitleSearch(self.catalog, self.device, cache=config.text_cache, blend=config.search_blend)
        try:
            high_water = HighWater(config.state, key_fingerprint(self.public_key))
        except ValueError as exc:
            raise ServeError(str(exc)) from exc
        self.versions = VersionKeeper(
            self.registry,
            self.public_key,
            self.catalog,
            self.device,
            text_embeddings=self.text.model_embeddings,
            requirements=Requirements.parse(config.require),
            high_water=high_water,
        )
        try:
            snap = self.versions.start()
        except ServeError as exc:
            raise ServeError(
                f"{config.registry}: no promoted version verifies with {config.public_key} and passes the checks "
                f"({exc}); promote one with `fedmart registry promote VERSION`"
            ) from exc
        log.info(
            "serving %s (promotion #%s; run %s, round %s) on %s; %d items; required: %s",
            snap.version,
            snap.promotion.get("counter"),
            self.snapshot.metadata.get("run"),
            self.snapshot.metadata.get("round"),
            self.device,
            self.catalog.num_items,
            self.versions.requirements,
        )

    # -- versions ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        """The version being served; take it once per request and keep it (a swap replaces it)."""
        snap = self.versions.current
        assert snap is not None
        return snap

    @property
    def refused(self) -> dict[str, str]:
        """Promoted versions refused so far -> why."""
        return self.versions.refused

    def maybe_reload(self, force: bool = False) -> str | None:
        """Swap in a newly promoted verified version; returns it, or None if nothing changed."""
        return self.versions.maybe_reload(force)

    # -- ranking -------------------------------------------------------------------------------
    def resolve(self, history: list[str]) -> tuple[np.ndarray, list[str]]:
        """Known 1-based indices (in order) and the unknown ids (first occurrence, in order)."""
        return self.items.resolve(history)

    def job(self, known: np.ndarray, *, k: int, exclude_seen: bool, department: str | None) -> Job:
        return make_job(known, self.snapshot.max_len, k=k, exclude_seen=exclude_seen, department=department)

    def run_batch(self, jobs: list[Job]) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
        """One forward for all ``jobs`` -> (version, [(indices, scores)] best first)."""
        snap = self.snapshot  # held for the whole batch: a swap now does not touch this batch
        return snap.version, rank_batch(snap, jobs, self.items.outside, self.device)

    def fallback_rank(
        self, *, k: int, department: str | None, exclude: np.ndarray | None
    ) -> tuple[Snapshot, np.ndarray, np.ndarray]:
        """The cold-start top ``k`` -> (snapshot ranked with, 1-based indices, scores)."""
        snap = self.snapshot
        mask = self.items.departments[department] if department is not None else None
        top, scores = fallback_top(snap, k=k, department=mask, exclude=exclude)
        return snap, top, scores

    # -- search --------------------------------------------------------------------------------
    @property
    def text_state(self) -> str:
        """The title index: disabled | building | ready | unavailable: ... | failed: ..."""
        return self.text.state

    @text_state.setter
    def text_state(self, value: str) -> None:
        self.text.state = value

    def text_available(self) -> bool:
        """Is the text extra installed? Cheap (no model load); sets ``text_state`` when it is not."""
        return self.text.available()

    def build_text_index(self) -> None:
        """Load the title encoder and the catalog's title embeddings (slow: run off the request path)."""
        self.text.build()

    def search(
        self, query: str, known: np.ndarray, *, k: int, department: str | None
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """Rank items by title similarity to ``query``, blended with the recommender given a history."""
        snap = self.snapshot
        seq = self.job(known, k=k, exclude_seen=False, department=None).seq if len(known) else None
        outside = self.items.outside[department] if department is not None else None
        return self.text.rank(query, snap, seq, k=k, outside=outside)
