"""Text search: the frozen all-MiniLM-L6-v2 title encoder and the catalog's title embeddings.

The index is built off the request path (slow: the encoder loads and every title is
embedded, or read from the ``.npy`` cache); until then ``state`` says why ``/search``
cannot answer. The text extra is optional: without it the rest of the API keeps working.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from federation.catalog import Catalog
from serving.scoring import fit

if TYPE_CHECKING:
    from serving.snapshot import Snapshot

__all__ = ["TitleSearch"]

log = logging.getLogger(__name__)


class TitleSearch:
    """Title embeddings and the query encoder for one catalog.

    ``state``: "disabled" (not requested), "building", "ready", "unavailable: ..." (no text
    extra) or "failed: ...". ``blend`` is the recommender's weight when a history is given.
    """

    def __init__(self, catalog: Catalog, device: torch.device, *, cache: Path | None, blend: float) -> None:
        self.catalog = catalog
        self.device = device
        self.blend = blend
        self.state = "disabled"
        self._cache = cache
        self._title_emb: torch.Tensor | None = None  # (n + 1, 384) on device, row 0 zero
        self._encoder = None
        self._model_emb: torch.Tensor | None = None

    def model_embeddings(self) -> torch.Tensor:
        """The title embeddings a text model is built with (computed once, cached on disk)."""
        if self._model_emb is None:
            from federation.text import title_embeddings

            self._model_emb = title_embeddings(self.catalog.title, cache=self.cache_path())
        return self._model_emb

    def cache_path(self) -> Path:
        if self._cache is not None:
            return Path(self._cache)
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedmart"
        return base / f"title-emb-{self.catalog.version}.npy"

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

    def build(self) -> None:
        """Load the title encoder and the catalog's title embeddings (slow: run off the request path)."""
        from federation.text import TextExtraMissing, TitleEncoder, title_embeddings

        self.state = "building"
        try:
            encoder = TitleEncoder(device=self.device)
            emb = self._model_emb
            if emb is None:
                emb = title_embeddings(self.catalog.title, cache=self.cache_path())
            self._title_emb = emb.to(self.device)
            self._encoder = encoder
            self.state = "ready"
            log.info("search index ready: %d titles", self.catalog.num_items)
        except TextExtraMissing as exc:
            self.state = f"unavailable: {exc}"
            log.warning("/search disabled: %s", exc)
        except Exception as exc:  # a broken encoder must not take the recommender down
            self.state = f"failed: {exc}"
            log.exception("building the search index failed; /search is disabled")

    def rank(
        self,
        query: str,
        snap: Snapshot,
        seq: np.ndarray | None,
        *,
        k: int,
        outside: torch.Tensor | None,
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """Items by title similarity to ``query`` -> (version, 1-based indices, scores), best first.

        With a left-padded history ``seq`` the z-scored similarity is blended with ``snap``'s
        z-scored recommendation; ``outside`` (True for items to leave out) filters a department.
        """
        assert self._encoder is not None and self._title_emb is not None
        q = torch.from_numpy(self._encoder.encode([query])[0]).to(self.device)  # (384,)
        with torch.inference_mode():
            score = _zscore(self._title_emb[1:] @ q)  # (n,)
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


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp(min=1e-6)
