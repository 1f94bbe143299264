"""Typed settings from plain data, and their registration with Hydra (used by :mod:`conf.settings`).

:func:`build` turns a nested mapping (Hydra's composed config, Flower's unflattened
``run_config`` or ``node_config``) into a settings dataclass: an unknown key, a value of
the wrong type or out of range raises :class:`SettingsError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from typing import Any, TypeVar, Union

__all__ = ["SettingsError", "build", "register"]

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is unknown, of the wrong type, or out of range; the message names the key."""


def _coerce(path: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for option in options:  # the value's own type first (int | float keeps an int an int)
            if isinstance(option, type) and isinstance(value, option) and not isinstance(value, bool):
                return value
        errors = []
        for option in options:
            try:
                return _coerce(path, option, value)
            except SettingsError as exc:
                errors.append(str(exc))
        raise SettingsError(errors[0])
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):  # a default group object, already validated
            return value
        if not isinstance(value, dict):
            raise SettingsError(f"{path} is a group of settings, not {value!r}")
        return build(hint, value, prefix=path)
    if value is None:
        raise SettingsError(f"{path} must be set (it may not be null)")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{path} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SettingsError(f"{path} must be an integer, not {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value in ("inf", "Infinity"):
            return math.inf
        raise SettingsError(f"{path} must be a number, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise SettingsError(f"{path} must be a string, not {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise SettingsError(f"{path} must be a list, not {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    raise TypeError(f"{path}: unsupported annotation {hint!r}")  # pragma: no cover - a programming error


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _as_mapping(obj: Any) -> dict[str, Any]:
    """A dataclass's own fields, one level deep (nested groups stay objects)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def build(cls: type[T], values: dict[str, Any], *, prefix: str = "", ignore_unknown: bool = False) -> T:
    """``cls`` from a nested mapping: unknown keys, wrong types and bad values name the key.

    Keys may use dashes (Flower's ``node_config``, ``sim.run-dir``); they map to underscores.
    Missing keys take the dataclass default.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        path = f"{prefix}.{key}" if prefix else str(key)
        if name not in names:
            if ignore_unknown:
                continue
            raise SettingsError(f"unknown setting {path!r}; {prefix or 'the top level'} has {', '.join(sorted(names))}")
        default = _field_default(cls, name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A partial group keeps the tree's own default for it, not its class's
            # (Settings.secagg is SecAggConfig(enabled=True), SecAggConfig() is not).
            kwargs[name] = build(type(default), {**_as_mapping(default), **value}, prefix=path)
        else:
            kwargs[name] = _coerce(path, hints[name], value)
    try:
        return cls(**kwargs)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{prefix or cls.__name__}: {exc}") from exc


def register() -> None:
    """Register the schemas with Hydra's ConfigStore as the ``schema`` group; ``conf/*.yaml`` pick one first.

    The dataclasses are frozen, and OmegaConf makes a frozen dataclass read-only, which
    would forbid the group files from merging onto it: the stored nodes are unlocked.
    Types and key names are still enforced at composition.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    def unlocked(node: DictConfig) -> DictConfig:
        OmegaConf.set_readonly(node, False)
        for key in list(node):
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                unlocked(child)
            else:
                OmegaConf.set_readonly(child, False)
        return node

    from conf.deploy_settings import SCHEMAS

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=unlocked(OmegaConf.structured(schema)), package="_global_")
