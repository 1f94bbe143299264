"""Building the global model from config, and moving its weights in and out.

Weights travel as a flat ``{name: ndarray}`` (a Flower ``ArrayRecord`` on the wire)
and rest as safetensors. Frozen buffers (title embeddings) are rebuilt from the
public catalog on each side and never travel.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from conf.settings import ModelSettings
from conf.typed import build
from federation.catalog import Catalog
from federation.model import SASRec, SASRecConfig, create
from federation.wire import ITEM_HOLDERS

__all__ = [
    "model_config",
    "build_model",
    "get_weights",
    "set_weights",
    "save_weights",
    "load_weights",
]

log = logging.getLogger(__name__)


def model_config(catalog: Catalog, model: ModelSettings | Mapping[str, Any], max_len: int) -> SASRecConfig:
    """The model's own config from the ``model`` group (or a registry version's ``model_config``)."""
    from federation.text import TEXT_DIM

    if not isinstance(model, ModelSettings):  # a registry version's metadata: the group plus max_len
        model = build(ModelSettings, dict(model), prefix="model", ignore_unknown=True)
    tower = model.name == "sasrec_text"
    return SASRecConfig(
        num_items=catalog.num_items,
        max_len=int(max_len),
        hidden=model.hidden,
        layers=model.layers,
        heads=model.heads,
        dropout=model.dropout,
        attn_dropout=model.attn_dropout,
        text_dim=TEXT_DIM if model.text or tower else 0,
        label_smoothing=model.label_smoothing,
        tower=tower,
        item_bias=model.item_bias,
        id_dropout=model.id_dropout,
    )


def build_model(
    catalog: Catalog,
    model_cfg: ModelSettings | Mapping[str, Any],
    max_len: int,
    *,
    seed: int = 0,
    text_cache: str | Path | None = None,
) -> SASRec:
    """A freshly initialised model (deterministic in ``seed``) sized by the catalog.

    ``text_cache`` is the .npy cache of the title embeddings (``model.text``); the text
    tower (``model=sasrec_text``) caches its item texts' embeddings beside it, one file per
    catalog version (``federation.text.item_text_embeddings``).
    """
    cfg = model_config(catalog, model_cfg, max_len)
    text = None
    if cfg.tower:
        from federation.text import item_text_embeddings

        text = item_text_embeddings(catalog, Path(text_cache).parent if text_cache is not None else None)
    elif cfg.text_dim:
        from federation.text import title_embeddings

        text = title_embeddings(catalog.title, cache=text_cache)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create(cfg, text_embeddings=text)


def get_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Trainable state as float32 NumPy arrays (CPU copies), in a stable order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load ``weights`` strictly: a missing, extra or mis-shaped tensor is an error.

    The aggregation bookkeeping array ``wire.ITEM_HOLDERS`` is not a weight and is ignored.
    """
    weights = {k: v for k, v in weights.items() if k != ITEM_HOLDERS}
    state = model.state_dict()
    if set(state) != set(weights):
        missing, extra = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in weights.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"weight {k!r} has shape {tuple(v.shape)}, the model expects {tuple(state[k].shape)}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})


def save_weights(weights: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path), metadata=metadata)
    return path


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))
