"""The serving core, usable without HTTP: one :class:`Server` over a registry, a public key and a catalog.

It composes the served catalog (:mod:`serving.catalog_view`), the served version mapped
onto it (:mod:`serving.snapshot`), ranking (:mod:`serving.scoring`) and title search
(:mod:`serving.search`). Model and catalog are swapped together, as one snapshot: a request
takes the snapshot once and resolves, ranks and answers with it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from federation.catalog import Catalog
from federation.device import select_device
from federation.model import SASRecConfig
from federation.registry import ModelRegistry
from privacy.signing import key_fingerprint, load_public_key
from serving.catalog_view import CatalogSource
from serving.config import ServeConfig, ServeError, default_threads
from serving.items import ItemIndex
from serving.policy import HighWater, Requirements
from serving.scoring import Job, fallback_top, make_job, rank_batch
from serving.search import TitleSearch
from serving.served_model import has_tower
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
        try:
            key_id = key_fingerprint(self.public_key)
            high_water = HighWater(config.state, key_id)
            catalog_state = config.state.with_name(f"{config.state.stem}-catalog.json") if config.state else None
            catalog_water = HighWater(catalog_state, key_id, kind="catalog version", source="the registry's catalogs/")
        except ValueError as exc:
            raise ServeError(str(exc)) from exc
        self.catalogs = CatalogSource(
            Path(config.registry), self.public_key, self.device, start_file=config.catalog, high_water=catalog_water
        )
        # The title index; which catalog it indexes first is known once the start catalog is (below).
        self.text = TitleSearch(None, self.device, cache=config.text_cache, blend=config.search_blend)
        self.versions = VersionKeeper(
            self.registry,
            self.public_key,
            self.catalogs,
            self.device,
            text_rows=self._text_rows,
            prepare_catalog=self._prepare_catalog,
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
        self.text.catalog = snap.catalog
        log.info(
            "serving %s (promotion #%s; run %s, round %s) on %s; catalog %s (%s), %d items; required: %s",
            snap.version,
            snap.promotion.get("counter"),
            self.snapshot.metadata.get("run"),
            self.snapshot.metadata.get("round"),
            self.device,
            snap.view.version,
            snap.view.name or "--catalog",
            snap.catalog.num_items,
            self.versions.requirements,
        )

    # -- text: the title index, and the text rows of text models ----------------------------------
    def _text_rows(self, cfg: SASRecConfig, catalog: Catalog) -> torch.Tensor:
        """The frozen text rows a text model is built with for ``catalog``."""
        if has_tower(cfg):  # model=sasrec_text: the tower's own item texts, cached per catalog version
            from federation.text import item_text_embeddings

            cache = self.config.text_cache.parent if self.config.text_cache is not None else None
            return item_text_embeddings(catalog, cache)
        return self.text.embeddings(catalog)

    def _prepare_catalog(self, catalog: Catalog, previous: Catalog | None) -> None:
        self.text.prepare(catalog, previous)

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

    @property
    def items(self) -> ItemIndex:
        """The served catalog's lookups (of the current snapshot: a request holds its own)."""
        return self.snapshot.items

    @property
    def catalog(self) -> Catalog:
        return self.snapshot.catalog

    # -- ranking -------------------------------------------------------------------------------
    def resolve(self, history: list[str], snap: Snapshot | None = None) -> tuple[np.ndarray, list[str]]:
        """Known 1-based indices (in order) and the unknown ids (first occurrence, in order), in ``snap``'s catalog."""
        return (snap or self.snapshot).items.resolve(history)

    def job(
        self, known: np.ndarray, *, k: int, exclude_seen: bool, department: str | None, snap: Snapshot | None = None
    ) -> Job:
        """A ranking job for indices resolved against ``snap`` (the current snapshot if None); it is ranked with it."""
        snap = snap or self.snapshot
        job = make_job(known, snap.max_len, k=k, exclude_seen=exclude_seen, department=department)
        job.snap = snap
        return job

    def run_batch(self, jobs: list[Job]) -> list[tuple[Snapshot, np.ndarray, np.ndarray]]:
        """One forward per snapshot among ``jobs`` -> [(snapshot, indices, scores)] best first, in job order.

        A job is ranked with the snapshot its history was resolved against (its indices mean
        nothing in another catalog); jobs without one take the current snapshot. Around a swap a
        batch may hold two snapshots: each group runs on its own.
        """
        current = self.snapshot
        groups: dict[int, tuple[Snapshot, list[int]]] = {}
        for i, j in enumerate(jobs):
            snap = j.snap or current
            groups.setdefault(id(snap), (snap, []))[1].append(i)
        out: list[tuple[Snapshot, np.ndarray, np.ndarray] | None] = [None] * len(jobs)
        for snap, members in groups.values():
            ranked = rank_batch(snap, [jobs[i] for i in members], snap.items.outside, self.device)
            for i, (idx, scores) in zip(members, ranked, strict=True):
                out[i] = (snap, idx, scores)
        return out  # type: ignore[return-value]

    def fallback_rank(
        self, *, k: int, department: str | None, exclude: np.ndarray | None, snap: Snapshot | None = None
    ) -> tuple[Snapshot, np.ndarray, np.ndarray]:
        """The cold-start top ``k`` -> (snapshot ranked with, 1-based indices, scores)."""
        snap = snap or self.snapshot
        mask = snap.items.departments[department] if department is not None else None
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
        """Load the title encoder and the served catalog's title embeddings (slow: run off the request path)."""
        self.text.build(lambda: self.snapshot.catalog)

    def search(
        self, query: str, known: np.ndarray, *, k: int, department: str | None, snap: Snapshot | None = None
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """Rank ``snap``'s items by text match with ``query``, blended with the recommender given a history."""
        snap = snap or self.snapshot
        seq = self.job(known, k=k, exclude_seen=False, department=None, snap=snap).seq if len(known) else None
        outside = snap.items.outside[department] if department is not None else None
        return self.text.rank(query, snap, seq, k=k, outside=outside)
