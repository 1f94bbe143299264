"""Staging the Flower app: the run config Flower accepts, and the app directory ``flwr run`` builds its FAB from.

``[tool.flwr.app.config]`` in ``pyproject.toml`` is generated from ``conf/`` (``python -m
fedmart.staging sync-pyproject``; ``check-pyproject`` fails when it is stale), so that
``flwr run .`` accepts every key a composed config can have. ``fedmart coordinate`` stages
the installed packages plus a generated ``pyproject.toml`` holding exactly the run's keys.
The packages staged are those ``pyproject.toml``'s package discovery ships (:func:`app_packages`).
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from federation.runconfig import flatten

__all__ = [
    "APP_NAME",
    "FAB_ID",
    "PUBLISHER",
    "app_config_defaults",
    "app_packages",
    "compose_config",
    "conf_dir",
    "render_app_config",
    "stage_app",
    "sync_pyproject",
]

DISTRIBUTION = "fedmart"
APP_NAME = "fedmart"
PUBLISHER = "fedmart"
FAB_ID = f"{PUBLISHER}/{APP_NAME}"  # what a node's warm worker accepts
_GENERATED = (
    "# Generated from the typed settings (conf/settings.py): `python -m fedmart.staging sync-pyproject`.\n"
    "# Flower refuses run-config keys missing here, and `fedmart coordinate` sends every key of the\n"
    "# run config; tests/federation/test_deploy_config.py checks this table against conf/.\n"
)


# --- the packages fedmart ships ----------------------------------------------------------------


def app_packages() -> tuple[str, ...]:
    """The top-level packages of the fedmart distribution, as ``pyproject.toml`` discovers them.

    The one list is ``[tool.setuptools.packages.find]``: in a source tree (a checkout, an
    editable install) it is applied here to the tree's top-level packages; an installed
    wheel has no ``pyproject.toml``, and its metadata (``top_level.txt``) is that list's result.
    """
    import tomllib

    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        doc = tomllib.loads(pyproject.read_text())
        if doc.get("project", {}).get("name") == DISTRIBUTION:
            find = doc["tool"]["setuptools"]["packages"]["find"]
            return tuple(
                sorted(
                    d.name
                    for d in root.iterdir()
                    if (d / "__init__.py").is_file()
                    and any(fnmatch.fnmatchcase(d.name, p) for p in find.get("include", ["*"]))
                    and not any(fnmatch.fnmatchcase(d.name, p) for p in find.get("exclude", []))
                )
            )
    return _installed_packages()


def _installed_packages() -> tuple[str, ...]:
    from importlib.metadata import distribution

    dist = distribution(DISTRIBUTION)
    top = dist.read_text("top_level.txt")
    if top:
        return tuple(sorted(name for name in top.split() if name))
    files = dist.files or []
    return tuple(sorted({f.parts[0] for f in files if len(f.parts) == 2 and f.name == "__init__.py"}))


# --- the run config Flower accepts -------------------------------------------------------------


def conf_dir() -> Path:
    """Where the installed ``conf/`` package (the Hydra configs) lives."""
    import conf

    return Path(conf.__file__).parent


def compose_config(overrides: Iterable[str] = (), config_name: str = "config") -> dict[str, Any]:
    """The composed Hydra config as plain data (``???`` left as ``None``)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conf.typed import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return None if x == "???" else x

    return clean(data)


def app_config_defaults() -> dict[str, bool | int | float | str]:
    """Every run-config key, with its default: the typed tree :class:`conf.settings.RunSettings`, flattened.

    The dataclass defaults equal the default composition of ``conf/`` (tests/conf), and every
    key any option of any group can set is a field of the tree, so this is exactly what a
    composed run config can hold.
    """
    from conf.settings import RunSettings

    return dict(sorted(flatten(RunSettings().to_dict()).items()))


def render_app_config(values: dict[str, Any]) -> str:
    """The body of ``[tool.flwr.app.config]``: one quoted dotted key per line."""
    import tomli_w

    return _GENERATED + tomli_w.dumps(values)


def _replace_section(text: str, header: str, body: str) -> str:
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == header)
    except StopIteration:
        return text.rstrip("\n") + f"\n\n{header}\n{body}"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    return "".join(lines[: start + 1]) + body + "\n" + "".join(lines[end:])


def sync_pyproject(path: str | Path, *, check: bool = False) -> bool:
    """Rewrite ``[tool.flwr.app.config]`` of ``path`` from ``conf/``; returns whether it changed.

    With ``check=True`` nothing is written (CI: fail when the table is stale).
    """
    path = Path(path)
    text = path.read_text()
    new = _replace_section(text, "[tool.flwr.app.config]", render_app_config(app_config_defaults()))
    if new != text and not check:
        path.write_text(new)
    return new != text


# --- the staged app ----------------------------------------------------------------------------


def stage_app(dest: Path, app_config: dict[str, Any]) -> Path:
    """Copy the installed fedmart packages and a generated ``pyproject.toml`` to ``dest``.

    ``flwr run`` builds its FAB from this directory, never from the source tree: the
    source ``pyproject.toml`` is left alone (Flower 1.41 migrates and comments out a
    ``[tool.flwr.federations]`` table it finds), the app works from an installed wheel too,
    and the staged ``[tool.flwr.app.config]`` holds exactly the keys this run sends.
    """
    import importlib

    import tomli_w

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in app_packages():
        src = Path(importlib.import_module(name).__file__).parent
        for f in src.rglob("*"):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                target = dest / name / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
    pyproject = {
        "project": {"name": APP_NAME, "version": "0.1.0", "description": "fedmart", "license": "Proprietary"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": "federation.app:app", "clientapp": "clients.app:app"},
                    "config": app_config,
                }
            }
        },
    }
    (dest / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return dest


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmart.staging")
    p.add_argument("action", choices=["sync-pyproject", "check-pyproject"])
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = p.parse_args(argv)
    changed = sync_pyproject(args.pyproject, check=args.action == "check-pyproject")
    if args.action == "check-pyproject" and changed:
        sys.stderr.write(
            f"{args.pyproject}: [tool.flwr.app.config] is stale; run python -m fedmart.staging sync-pyproject\n"
        )
        return 1
    sys.stderr.write(f"{args.pyproject}: {'updated' if changed else 'up to date'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
