"""The served catalog: the newest signed catalog version of the registry, swapped in like a model version.

A :class:`CatalogView` is one catalog ready to serve (its lookups, and which signed version it
is); it is never mutated. :class:`CatalogSource` picks the catalog to serve: the valid signed
catalog version with the highest counter (``federation/catalogs.py``), refused (with the
previous one serving on) when it is tampered with or its counter is below one already served
(:class:`~serving.policy.HighWater`, kept in ``<state>-catalog.json``). ``--catalog FILE`` is
the catalog only while the registry has no signed catalog version (registries written before
catalogs were signed). It also finds the catalog a model version was trained on, by its
content digest, so that ``serving/snapshot.py`` can map the version's item rows onto the
served catalog (``federation/catalog_map.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation.catalog import Catalog
from federation.catalogs import CatalogStore, CatalogVersion
from serving.config import ServeError
from serving.items import ItemIndex
from serving.policy import HighWater

__all__ = ["CatalogView", "CatalogSource"]

START_HINT = "pass --catalog outputs/<run>/catalog.parquet (fedmart simulate and fedmart coordinate write it)"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogView:
    """A catalog as the server serves it. ``name``/``counter``: its signed version (None for ``--catalog``)."""

    catalog: Catalog
    items: ItemIndex
    name: str | None = None
    counter: int | None = None

    @property
    def version(self) -> str:
        return self.catalog.version

    def describe(self) -> dict[str, object]:
        return {"version": self.version, "name": self.name, "counter": self.counter, "items": self.catalog.num_items}


class CatalogSource:
    """Selects the catalog to serve and finds the catalogs model versions were trained on."""

    def __init__(
        self,
        root: Path,
        public_key: Ed25519PublicKey,
        device: torch.device,
        *,
        start_file: Path | None,
        high_water: HighWater,
    ) -> None:
        self.store = CatalogStore(root, public_key=public_key)
        self.public_key = public_key
        self.device = device
        self.start_file = Path(start_file) if start_file is not None else None
        self.high_water = high_water
        self.refused: dict[str, str] = {}  # catalog version name -> why, for /model
        self._stamp: tuple | None = None
        self._known: dict[str, Catalog] = {}  # content digest -> catalog (training catalogs, looked up once)

    # -- which catalog to serve ---------------------------------------------------------------
    def stamp(self) -> tuple | None:
        d = self.store.dir
        try:
            st = d.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, tuple(sorted(p.name for p in d.iterdir())))

    def changed(self) -> bool:
        """Has anything appeared in (or left) ``catalogs/`` since the last :meth:`select`?"""
        return self.stamp() != self._stamp

    def select(self) -> tuple[CatalogVersion | None, str | None]:
        """(the newest valid signed catalog version that passes the counter check, None) or (None, why not).

        ``(None, None)`` means the registry has no signed catalog version at all.
        """
        self._stamp = self.stamp()
        if not self.store.names():
            return None, None
        newest, refused = self.store.newest(self.public_key)
        for name, reason in refused.items():
            self.refuse(name, reason)
        if newest is None:
            return None, "no signed catalog version verifies" + (
                f" ({next(iter(refused))}: {next(iter(refused.values()))})" if refused else ""
            )
        reason = self.high_water.refusal(newest.counter, newest.name)
        if reason is not None:
            self.refuse(newest.name, reason)
            return None, f"{newest.name}: {reason}"
        return newest, None

    def first_view(self) -> CatalogView:
        """The catalog to start with: the newest signed one, else ``--catalog``; :class:`ServeError` if neither."""
        chosen, why = self.select()
        if chosen is not None:
            if self.start_file is not None:
                log.info(
                    "serving signed catalog %s; --catalog %s is used only without one", chosen.name, self.start_file
                )
            return self.view(chosen)
        if why is not None:
            raise ServeError(f"{self.store.dir}: {why}")
        if self.start_file is None:
            raise ServeError(
                f"{self.store.root} has no signed catalog version: pass --catalog PATH (the catalog the model was "
                "trained on) or publish one with `fedmart registry publish-catalog`"
            )
        catalog = Catalog.load(self.start_file, hint=START_HINT)
        self._known[catalog.version] = catalog
        return CatalogView(catalog, ItemIndex(catalog, self.device))

    def view(self, chosen: CatalogVersion) -> CatalogView:
        self._known[chosen.version] = chosen.catalog
        return CatalogView(chosen.catalog, ItemIndex(chosen.catalog, self.device), chosen.name, chosen.counter)

    def served(self, view: CatalogView) -> None:
        """Record ``view`` as served: its counter becomes the floor (persisted with a state file)."""
        if view.counter is not None and view.name is not None:
            self.high_water.advance(view.counter, view.name)
            self.refused.pop(view.name, None)

    def refuse(self, name: str, reason: str) -> None:
        if self.refused.get(name) != reason:
            log.error("refusing catalog version %s: %s", name, reason)
        self.refused[name] = reason

    # -- which catalog a model was trained on ------------------------------------------------------
    def training_catalog(self, digest: str, served: Catalog) -> Catalog:
        """The catalog with content digest ``digest``: the served one, a signed version, or ``--catalog``."""
        if digest == served.version:
            return served
        if digest in self._known:
            return self._known[digest]
        found = self.store.find(digest, self.public_key) if digest else None
        if found is not None:
            self._known[digest] = found.catalog
            return found.catalog
        if self.start_file is not None and self.start_file.is_file():
            start = Catalog.load(self.start_file)
            if start.version == digest:
                self._known[digest] = start
                return start
        raise ServeError(
            f"trained on catalog {digest or '(none recorded)'}, which is neither the served catalog "
            f"{served.version} nor a signed catalog version in {self.store.root}: publish the catalog it was "
            "trained on with `fedmart registry publish-catalog`, or serve it with its own catalog"
        )
