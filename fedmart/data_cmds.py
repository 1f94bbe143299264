"""``fedmart data fetch|check|synth``: get, generate and validate interaction data."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmart.cli import command
from fedmart.errors import UserError, exit_on_user_error

__all__ = ["data_cmd", "print_check"]


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
def data_cmd(args: argparse.Namespace) -> int:
    from fedmart.console import console

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
    print_check(result.report, report_path, q_path)
    return 0 if result.ok else 1


def print_check(report: dict, report_path: Path, q_path: Path) -> None:
    """Print a validation report (`fedmart data check`, and `fedmart node` when it refuses to join)."""
    from rich.table import Table

    from fedmart.console import console

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


data_cmd.add_arguments = _data_args  # type: ignore[attr-defined]
command("data", "fetch, generate and check interaction data")(data_cmd)
