"""``fedmart``: the command line, and the composition root that wires the packages together.

Hydra apps (``simulate``, ``train-central``) take Hydra's own syntax after the
subcommand (overrides, ``-m`` sweeps, ``--help``, ``--cfg job``); the other
subcommands are plain argparse.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from federation.errors import exit_on_user_error

__all__ = ["main"]

# Subcommands that are Hydra apps: name -> "module:function" (imported lazily so
# `fedmart --help` stays fast).
HYDRA_APPS: dict[str, str] = {
    "simulate": "federation.simulate:main",
    "train-central": "clients.central:main",
    "coordinate": "federation.deploy:coordinate_main",
}

# Plain subcommands register themselves here: name -> (help, add_arguments, run).
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str):
    """Decorator: register ``run(args) -> int`` with an ``add_arguments(parser)`` attribute."""

    def deco(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, getattr(run, "add_arguments", lambda p: None), run)
        return run

    return deco


def _load(target: str) -> Callable:
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# --- data ------------------------------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", required=True)
    f = sub.add_parser("fetch", help="download a public dataset (movielens-100k) into a data directory")
    f.add_argument("name", choices=["movielens-100k"])
    f.add_argument("--dest", default="data/ml-100k", help="directory to extract into (default: data/ml-100k)")
    c = sub.add_parser("check", help="validate an interactions file against a catalog; report and quarantine")
    c.add_argument("path", help="interactions file (.parquet/.csv) or a MovieLens directory")
    c.add_argument("--catalog", help="catalog.parquet (not needed for a MovieLens directory)")
    c.add_argument("--out", help="where report.json and quarantine.parquet go (default: PATH.check/)")
    c.add_argument("--min-history", type=int, default=3)
    g = sub.add_parser("synth", help="write synthetic interactions + catalog (Parquet) to a directory")
    g.add_argument("--dest", default="data/synthetic")
    g.add_argument("--users", type=int, default=20_000)
    g.add_argument("--items", type=int, default=2_000)
    g.add_argument("--departments", type=int, default=10)
    g.add_argument("--merchants", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)


@exit_on_user_error
def _data_run(args: argparse.Namespace) -> int:
    from federation.console import console

    if args.data_cmd == "fetch":
        from clients.movielens import fetch

        dest = fetch(args.dest)
        console.print(f"MovieLens-100K ready in {dest}")
        return 0
    if args.data_cmd == "synth":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from clients.synthetic import SyntheticConfig, generate

        catalog, inter = generate(
            SyntheticConfig(
                num_users=args.users,
                num_items=args.items,
                num_departments=args.departments,
                num_merchants=args.merchants,
                seed=args.seed,
            )
        )
        dest = Path(args.dest)
        catalog.save(dest / "catalog.parquet")
        table = pa.table(
            {
                "user_id": inter.user_ids[inter.user],
                "item_id": catalog.item_id[inter.item - 1],
                "timestamp": inter.timestamp,
                "event": inter.event,
            }
        )
        pq.write_table(table, dest / "interactions.parquet")
        console.print(f"wrote {len(inter)} interactions and {catalog.num_items} items to {dest}")
        return 0
    # check
    from clients import movielens
    from clients.interactions import read_table
    from clients.validation import validate, write_report
    from federation.catalog import Catalog
    from federation.errors import UserError

    path = Path(args.path)
    if path.is_dir():
        catalog, table, _ = movielens.load(path)
    else:
        if not args.catalog:
            raise UserError(f"{path}: --catalog CATALOG.parquet is required to check an interactions file")
        catalog = Catalog.load(args.catalog)
        table = read_table(path)
    result = validate(table, catalog, min_history=args.min_history, source=str(path))
    out = Path(args.out) if args.out else path.with_name(path.name + ".check")
    report_path, q_path = write_report(result, out)
    _print_check(result.report, report_path, q_path)
    return 0 if result.ok else 1


_data_run.add_arguments = _data_args  # type: ignore[attr-defined]
command("data", "fetch, generate and check interaction data")(_data_run)


def _print_check(report: dict, report_path: Path, q_path: Path) -> None:
    from rich.table import Table

    from federation.console import console

    status = "[green]clean[/]" if not report["rows_quarantined"] else "[yellow]problems found[/]"
    console.print(f"[bold]{report['source']}[/]: {status}")
    console.print(
        f"rows in {report['rows_in']:,}  clean {report['rows_clean']:,}  quarantined "
        f"{report['rows_quarantined']:,}  users {report['users_clean']:,}  catalog {report['catalog_version']}"
    )
    if report["problems"]:
        t = Table("problem", "rows", "what it means / how to fix", "first rows")
        for name, p in report["problems"].items():
            t.add_row(name, f"{p['count']:,}", p["reason"], ", ".join(map(str, p["example_rows"])))
        console.print(t)
    if report["unexpected_columns"]:
        console.print(f"unexpected columns (ignored): {', '.join(report['unexpected_columns'])}")
    console.print(f"report: {report_path}\nquarantine: {q_path}")


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

    for module in ("federation.commands", "federation.deploy"):
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
    # themselves in ``federation.cli.COMMANDS``, which is a different dict under ``python -m``.
    from federation.cli import main as _main

    raise SystemExit(_main())
