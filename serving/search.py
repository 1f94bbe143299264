"""Text search: the frozen all-MiniLM-L6-v2 title encoder and each served catalog's title embeddings.

The index is built off the request path (slow: the encoder loads and every title is
embedded, or read from the ``.npy`` cache); until then ``state`` says why ``/search``
cannot answer. The text extra is optional: without it the rest of the API keeps working.

Title embeddings are kept per catalog version (cached on disk, one file per version). A newer
catalog is embedded before it is swapped in (``serving/snapshot.py`` calls :meth:`prepare` on
the poller's thread): only titles the previous catalog lacked are encoded. The same
embeddings are what a model trained with ``model.text`` is built with.

**The text tower.** When the served model has one (``model=sasrec_text``: items ``e_i = P t_i
+ r_i``), a query is represented as the tower represents an item nobody has interacted with,
``P t_q``, and its match with item ``i`` is the mean of two z-scored cosines: in the encoder's
space (``t_q`` against the title, the exact wording) and in the tower's (``P t_q`` against
``e_i``, what the federation learned about the item). Given a history, the recommender's scores
``h . e_i + b_i`` are in that same space. Removed items are not in the served catalog, so they
are never found.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from federation.catalog import Catalog
from serving.scoring import fit

if TYPE_CHECKING:
    from serving.snapshot import Snapshot

__all__ = ["TitleSearch", "tower_space"]

log = logging.getLogger(__name__)

_KEEP = 3  # catalog versions whose embeddings stay in memory (the served one, the one before, a spare)
_CHUNK = 64  # titles encoded per hold of the encoder


class TitleSearch:
    """Title embeddings per catalog version and the query encoder.

    ``state``: "disabled" (not requested), "building", "ready", "unavailable: ..." (no text
    extra) or "failed: ...". ``blend`` is the recommender's weight when a history is given.
    ``catalog`` is the catalog served at start (the one :meth:`build` indexes first).
    """

    def __init__(self, catalog: Catalog | None, device: torch.device, *, cache: Path | None, blend: float) -> None:
        self.catalog = catalog
        self.device = device
        self.blend = blend
        self.state = "disabled"
        self._cache = cache
        self._encoder = None
        self._emb: dict[str, torch.Tensor] = {}  # catalog version -> (n + 1, 384) CPU, row 0 zero
        self._on_device: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()  # the dicts above: held briefly, never while encoding
        self._load_lock = threading.Lock()  # loading the encoder once
        # One encode at a time (a fast tokenizer is not safe across threads); a catalog's titles
        # are encoded in chunks of _CHUNK, so a query waits for one chunk, not for a whole catalog.
        self._encode_lock = threading.Lock()

    # -- embeddings ---------------------------------------------------------------------------
    def cache_path(self, catalog: Catalog | None = None) -> Path:
        """The ``.npy`` cache of ``catalog``'s title embeddings: one file per catalog version."""
        catalog = catalog or self.catalog
        assert catalog is not None, "which catalog?"
        version = catalog.version
        if self._cache is not None:
            c = Path(self._cache)
            return c.with_name(f"{c.stem}-{version}{c.suffix or '.npy'}")
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedmart"
        return base / f"title-emb-{version}.npy"

    def embeddings(self, catalog: Catalog, previous: Catalog | None = None) -> torch.Tensor:
        """(n + 1, 384) CPU title embeddings of ``catalog`` (row 0 zero): memory, disk cache, or encoded now.

        With ``previous``, titles it already has are copied from its embeddings; only the rest are encoded.
        """
        from federation.text import TEXT_DIM

        with self._lock:
            got = self._emb.get(catalog.version)
        if got is not None:
            return got
        path = self.cache_path(catalog)
        arr = np.load(path) if path.is_file() else None
        if arr is None or arr.shape != (catalog.num_items + 1, TEXT_DIM):
            arr = self._encode(catalog, previous)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
            np.save(tmp, arr)
            os.replace(tmp, path)
        with self._lock:
            emb = self._emb.setdefault(catalog.version, torch.from_numpy(np.asarray(arr, dtype=np.float32)))
            for old in list(self._emb)[:-_KEEP]:
                self._emb.pop(old)
                self._on_device.pop(old, None)
        return emb

    def _encode(self, catalog: Catalog, previous: Catalog | None) -> np.ndarray:
        from federation.text import TEXT_DIM

        titles = [str(t) for t in catalog.title.tolist()]
        arr = np.zeros((len(titles) + 1, TEXT_DIM), dtype=np.float32)
        todo = list(range(len(titles)))
        with self._lock:
            before = self._emb.get(previous.version) if previous is not None else None
        if previous is not None and before is not None:
            known = {t: i + 1 for i, t in enumerate(previous.title.tolist())}
            old = before.numpy()
            todo = []
            for i, t in enumerate(titles):
                j = known.get(t)
                if j is None:
                    todo.append(i)
                else:
                    arr[i + 1] = old[j]
        for start in range(0, len(todo), _CHUNK):
            chunk = todo[start : start + _CHUNK]
            arr[np.asarray(chunk) + 1] = self.encode([titles[i] for i in chunk]).astype(np.float32)
        log.info("catalog %s: %d titles embedded, %d reused", catalog.version, len(todo), len(titles) - len(todo))
        return arr

    def _encoder_or_load(self):
        with self._load_lock:
            if self._encoder is None:
                from federation.text import TitleEncoder

                self._encoder = TitleEncoder(device=self.device)
            return self._encoder

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) unit vectors; one encode at a time across threads."""
        encoder = self._encoder_or_load()
        with self._encode_lock:
            return encoder.encode(texts)

    def prepare(self, catalog: Catalog, previous: Catalog | None) -> None:
        """Embed a catalog about to be swapped in, when search is on (called off the request path)."""
        if self.state in ("building", "ready"):
            self.embeddings(catalog, previous)

    # -- the index's life ------------------------------------------------------------------------
    def available(self) -> bool:
        """Is the text extra installed? Cheap (no model load); sets ``state`` when it is not."""
        from federation.text import TextExtraMissing, model_dir

        try:
            model_dir()
        except TextExtraMissing as exc:
            self.state = f"unavailable: {exc}"
            log.warning("/search disabled: %s", exc)
            return False
        return True

    def build(self, current: Callable[[], Catalog] | None = None) -> None:
        """Load the title encoder and the served catalog's title embeddings (slow: run off the request path).

        ``current`` gives the catalog served now (it may have been swapped while the encoder loaded).
        """
        from federation.text import TextExtraMissing

        self.state = "building"
        try:
            self._encoder_or_load()
            catalog = current() if current is not None else self.catalog
            assert catalog is not None, "which catalog?"
            self.embeddings(catalog)
            self.state = "ready"
            log.info("search index ready: %d titles", catalog.num_items)
        except TextExtraMissing as exc:
            self.state = f"unavailable: {exc}"
            log.warning("/search disabled: %s", exc)
        except Exception as exc:  # a broken encoder must not take the recommender down
            self.state = f"failed: {exc}"
            log.exception("building the search index failed; /search is disabled")

    # -- ranking -------------------------------------------------------------------------------
    def rank(
        self,
        query: str,
        snap: Snapshot,
        seq: np.ndarray | None,
        *,
        k: int,
        outside: torch.Tensor | None,
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """Items of ``snap``'s catalog by text match with ``query`` -> (version, 1-based indices, scores), best first.

        With a left-padded history ``seq`` the z-scored text match is blended with ``snap``'s
        z-scored recommendation; ``outside`` (True for items to leave out) filters a department.
        """
        assert self._encoder is not None, "the search index is not built"
        titles = self._device_embeddings(snap.view.catalog)  # (n + 1, 384)
        q = torch.from_numpy(self.encode([query])[0]).to(self.device)  # (384,)
        with torch.inference_mode():
            score = _zscore(titles[1:] @ q)  # (n,)
            space = snap.tower_space
            if space is not None:
                rows, project = space
                qp = torch.nn.functional.normalize(project(q), dim=0)  # (d,)
                score = 0.5 * (score + _zscore(rows[1:] @ qp))
            if seq is not None:
                rec = snap.infer(torch.from_numpy(fit(seq, snap.max_len))[None].to(self.device))[0, 1:]
                w = self.blend
                score = (1 - w) * score + w * _zscore(rec)
            if outside is not None:
                score = score.masked_fill(outside[1:], -math.inf)
            top = torch.topk(score, min(k, score.shape[0]))
            vals, idx = top.values.cpu().numpy(), top.indices.cpu().numpy() + 1
        keep = np.isfinite(vals)
        return snap.version, idx[keep], vals[keep]

    def _device_embeddings(self, catalog: Catalog) -> torch.Tensor:
        with self._lock:
            emb = self._on_device.get(catalog.version)
        if emb is None:
            emb = self.embeddings(catalog).to(self.device)  # prepared before the swap: a lookup
            with self._lock:
                emb = self._on_device.setdefault(catalog.version, emb)
        return emb


def tower_space(model: torch.nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """For a model with a text tower: (its unit item rows (n + 1, d), the projection of a text embedding); else None.

    The tower (``model=sasrec_text``, ``privacy/tied.py``'s ``TiedEmbedding`` as ``model.tower``)
    has ``rows()`` (every item's ``P t_i + r_i``) and ``proj`` (``P``, (d, 384)). Computed once per
    snapshot (``serving/snapshot.py``), not per query.
    """
    tower = getattr(model, "tower", None)
    if tower is None or not hasattr(tower, "rows") or not hasattr(tower, "proj"):
        return None
    with torch.inference_mode():
        rows = torch.nn.functional.normalize(tower.rows(), dim=-1)
        proj = tower.proj.detach()
    return rows, lambda t: proj @ t


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardised scores; items with no finite score (no learned score: ``-inf``) get the lowest finite one."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        low = x[finite].min() if bool(finite.any()) else x.new_tensor(0.0)
        x = torch.where(finite, x, low)
    return (x - x.mean()) / x.std().clamp(min=1e-6)
