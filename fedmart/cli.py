"""``fedmart``: the command line of the composition root.

Hydra apps (``simulate``, ``train-central``, ``coordinate``) take Hydra's own syntax after
the subcommand (overrides, ``-m`` sweeps, ``--help``, ``--cfg job``); the other
subcommands are plain argparse, one module per command family, each registering itself
with :func:`command`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["COMMANDS", "HYDRA_APPS", "command", "main"]

# Subcommands that are Hydra apps: name -> "module:function" (imported lazily so
# `fedmart --help` stays fast).
HYDRA_APPS: dict[str, str] = {
    "simulate": "fedmart.simulate:main",
    "train-central": "fedmart.central_cmd:main",
    "coordinate": "fedmart.coordinate:main",
}

# Two-word spellings of plain subcommands: `fedmart node keygen` runs `node-keygen` (`fedmart node`
# itself takes only flags, so a first positional word cannot be anything else).
SPELLINGS: dict[tuple[str, str], str] = {("node", "keygen"): "node-keygen"}

# Plain subcommands register themselves here: name -> (help, add_arguments, run).
Run = Callable[[argparse.Namespace], int]
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Run]
COMMANDS: dict[str, Command] = {}
# The modules that register them (imported only when a plain subcommand runs).
COMMAND_MODULES = (
    "fedmart.data_cmds",
    "fedmart.registry_cmds",
    "fedmart.serve_cmd",
    "fedmart.certs",
    "fedmart.node_cmd",
    "fedmart.node_keys",
    "fedmart.nodes_admin",
    "fedmart.roster_cmd",
)


def command(name: str, help: str) -> Callable[[Run], Run]:
    """Decorator: register ``run(args) -> int`` with an ``add_arguments(parser)`` attribute."""

    def deco(run: Run) -> Run:
        COMMANDS[name] = (help, getattr(run, "add_arguments", lambda p: None), run)
        return run

    return deco


def _load(target: str) -> Callable:
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# --- entry point ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmart",
        description="Federated, differentially private training of an e-commerce recommender.",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for name in HYDRA_APPS:
        sub.add_parser(name, help=f"Hydra app: `fedmart {name} --help` lists its config groups", add_help=False)
    for name, (help_, add_args, _) in sorted(COMMANDS.items()):
        sp = sub.add_parser(name, help=help_)
        add_args(sp)
    return p


def _register_optional_commands() -> None:
    """Import modules that register further subcommands (registry, audit, serve, ...)."""
    import importlib

    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in HYDRA_APPS:
        name = argv[0]
        # Hydra parses sys.argv itself; present it as if `fedmart-<name>` were the program.
        sys.argv = [f"fedmart {name}", *argv[1:]]
        _load(HYDRA_APPS[name])()
        return 0
    if tuple(argv[:2]) in SPELLINGS:
        argv = [SPELLINGS[(argv[0], argv[1])], *argv[2:]]
    _register_optional_commands()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return 0
    rc = COMMANDS[args.cmd][2](args)
    sys.exit(rc)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy's: subcommand modules register
    # themselves in ``fedmart.cli.COMMANDS``, which is a different dict under ``python -m``.
    from fedmart.cli import main as _main

    raise SystemExit(_main())
