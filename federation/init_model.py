"""``federation.init``: start a federation from a published, signed model version (fine-tuning).

``federation.init`` names a version directory of a registry (``REGISTRY/v0003-r3-1a2b3c4d``)
or a registry (its newest promoted version, else its newest version). :func:`load_init`

1. verifies the version's signature and file digests against ``federation.init_public_key``
   (default: the public half of this coordinator's own ``registry.signing_key``) before
   reading anything else from it; a tampered or foreign version is refused;
2. checks that its model has this run's shape: model kind, ``hidden``, ``layers``, ``heads``,
   ``max_len`` and ``text`` (:func:`shape_mismatch`);
3. maps its item rows onto this run's catalog by item_id (``federation/catalog_map.py``): the
   catalog it was trained on is this run's, or a signed catalog version of its registry
   (``federation/catalogs.py``); new items take the rows of a freshly initialised model of
   this catalog (for the text tower: a zero ID residual, so a new item starts as its text),
   removed items are dropped;
4. returns the weights and their ``origin`` (the version, its registry, its key fingerprint, the
   catalog mapping), which the run signs into every version it publishes and into the audit
   log's ``run_start`` (``federation/server.py``, ``federation/trail.py``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conf.settings import Settings
from federation.catalog import Catalog
from federation.catalog_map import align, item_keys, map_item_rows, rows_from
from federation.globalmodel import build_model, get_weights
from federation.registry import ModelRegistry, RegistryError
from privacy.signing import KeyFileError, key_fingerprint, load_keypair, public_key_path_for

__all__ = ["InitError", "InitModel", "load_init", "resolve_init", "shape_mismatch", "verified_init"]

log = logging.getLogger(__name__)

# How each shape field is set in this run, named in a refusal.
_SETTING = {
    "model": "model (the group)",
    "hidden": "model.hidden",
    "layers": "model.layers",
    "heads": "model.heads",
    "max_len": "data.max_len",
    "text": "model.text",
}


class InitError(ValueError):
    """``federation.init`` cannot be used: not found, not verified, another shape, an unknown catalog."""


@dataclass(frozen=True)
class InitModel:
    """The starting weights (on this run's catalog) and where they came from."""

    weights: dict[str, np.ndarray]
    origin: dict[str, Any]


def resolve_init(spec: str) -> tuple[Path, str | None]:
    """``federation.init`` -> (registry root, version id or None for the registry's newest)."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "metadata.json").is_file():
        return path.parent, path.name
    if path.is_dir() and ((path / "promotions.jsonl").is_file() or any(path.glob("v*-r*-*"))):
        return path, None
    raise InitError(
        f"federation.init={spec}: not a registry version directory (REGISTRY/v0003-r3-1a2b3c4d) nor a registry"
    )


def _public_key_path(settings: Settings) -> Path:
    fed = settings.federation
    if fed.init_public_key:
        return Path(fed.init_public_key)
    key = Path(settings.registry.signing_key)
    try:
        load_keypair(key)  # exports <key>.pub when it is missing
    except KeyFileError as exc:
        raise InitError(
            f"federation.init: no key to verify it with ({exc}); set federation.init_public_key=PUB "
            "(the .pub of the key that signed it)"
        ) from exc
    return public_key_path_for(key)


def verified_init(settings: Settings) -> tuple[ModelRegistry, str, dict[str, np.ndarray], dict[str, Any]]:
    """(registry, version, weights, metadata) of ``federation.init``, verified and of this run's shape."""
    spec = str(settings.federation.init)
    root, version = resolve_init(spec)
    pub = _public_key_path(settings)
    try:
        registry = ModelRegistry(root, public_key_path=pub)
    except KeyFileError as exc:
        raise InitError(f"federation.init_public_key: {exc}") from exc
    if version is None:
        version = registry.latest_promoted_verified() or (registry.versions() or [None])[-1]
        if version is None:
            raise InitError(f"federation.init={spec}: the registry holds no version")
    try:
        weights, meta = registry.load(version)  # the signature first: nothing unverified is read
    except RegistryError as exc:
        reason = str(exc).removeprefix(f"{version}: ")
        raise InitError(f"federation.init={spec}: refused {version}: {reason} (verified with {pub})") from exc
    why = shape_mismatch(dict(meta.get("model_config") or {}), settings)
    if why:
        raise InitError(f"federation.init={spec}: {version} has another model shape: {why}")
    return registry, version, weights, meta


def shape(model_config: dict[str, Any]) -> dict[str, Any]:
    """A version's model shape, from its ``model_config`` (a Hydra model group plus max_len, or SASRecConfig's)."""
    kind = model_config.get("name") or ("sasrec_text" if model_config.get("tower") else "sasrec")
    text = bool(model_config.get("text")) or (bool(model_config.get("text_dim")) and kind == "sasrec")
    keys = ("hidden", "layers", "heads", "max_len")
    return {"model": kind, **{k: int(model_config[k]) for k in keys if k in model_config}, "text": text}


def shape_mismatch(model_config: dict[str, Any], settings: Settings) -> str | None:
    """What differs between a version's model and this run's (``hidden 64 there, 16 here (model.hidden)``), or None."""
    there = shape(model_config)
    here = shape({**asdict(settings.model), "max_len": settings.data.max_len})
    diffs = [
        f"{k} {there.get(k)!r} there, {here[k]!r} here ({_SETTING[k]})" for k in _SETTING if there.get(k) != here[k]
    ]
    if not diffs:
        return None
    return "; ".join(diffs) + ": set these to match it, or start without federation.init"


def load_init(settings: Settings, catalog: Catalog) -> InitModel:
    """The verified ``federation.init`` version's weights, mapped onto ``catalog`` (module docstring)."""
    spec = str(settings.federation.init)
    registry, version, weights, meta = verified_init(settings)
    trained_on = str(meta.get("catalog_version") or "")
    if trained_on == catalog.version:
        old = catalog
    else:
        found = registry.catalogs.find(trained_on) if trained_on else None
        if found is None:
            raise InitError(
                f"federation.init={spec}: {version} was trained on catalog {trained_on or '(none recorded)'}, which is "
                f"not this run's ({catalog.version}) nor a signed catalog version in {registry.root}: publish it there "
                "with `fedmart registry publish-catalog`"
            )
        old = found.catalog
    fresh = get_weights(build_model(catalog, settings.model, settings.data.max_len, seed=settings.seed))
    alignment = align(old, catalog)
    try:
        mapped = map_item_rows(
            weights, old, catalog, item_keys(weights), init_row=rows_from(fresh), alignment=alignment
        )
    except ValueError as exc:
        raise InitError(f"federation.init={spec}: {version}: {exc}") from exc
    missing, extra = sorted(set(fresh) - set(mapped)), sorted(set(mapped) - set(fresh))
    wrong = [k for k in fresh if k in mapped and mapped[k].shape != fresh[k].shape]
    if missing or extra or wrong:
        raise InitError(
            f"federation.init={spec}: {version}'s weights do not fit this model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}, other shape {wrong[:3]}): it was built with other model settings"
        )
    origin = {
        "version": version,
        "registry": str(registry.root.resolve()),
        "key_id": key_fingerprint(registry.public_key),
        "run": meta.get("run"),
        "round": meta.get("round"),
        "catalog_version": trained_on,
        "catalog_map": alignment.summary(),
    }
    log.info(
        "starting from %s of %s (key %s): %d items kept, %d new, %d removed",
        version,
        registry.root,
        origin["key_id"],
        catalog.num_items - len(alignment.added),
        len(alignment.added),
        len(alignment.removed),
    )
    return InitModel(mapped, origin)
