"""The one crossing from Hydra's nested config to Flower's flat ``run_config`` and back.

Flower's run config is a flat mapping of scalars; Hydra's is nested. ``flatten``
goes one way (keys joined with dots, ``None`` as the empty string, lists as JSON),
``unflatten`` the other. Apps read settings only through :func:`unflatten`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["flatten", "unflatten", "config_hash", "NONE"]

NONE = ""  # Flower config values cannot be None


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    out: dict[str, bool | int | float | str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is None:
            out[name] = NONE
        elif isinstance(value, (list, tuple)):
            out[name] = "json:" + json.dumps(list(value))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            raise TypeError(f"config key {name!r} has unsupported type {type(value).__name__}")
    return out


def _decode(value: Any) -> Any:
    if value == NONE:
        return None
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    return value


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _decode(value)
    return out


def config_hash(cfg: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of the canonical JSON of a nested config."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
