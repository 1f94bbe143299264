"""``fedmart data fetch|check|synth|prepare|split``: get, generate, validate and prepare interaction data."""

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
    _prepare_args(sub)
    _split_args(sub)


def _prepare_args(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="a department's own export (CSV/Parquet, its own column names and item ids) -> a node's data directory",
    )
    p.add_argument("path", help="the department's interactions file (.csv, .tsv or .parquet)")
    p.add_argument("--catalog", required=True, help="the platform catalog (catalog.parquet, from the coordinator)")
    p.add_argument("--out", required=True, help="the node's data directory to write (what `fedmart node --data` reads)")
    p.add_argument(
        "--columns",
        help="a YAML naming the columns: user_col, item_col, time_col, event_col, "
        "time_format, map_file (flags override it)",
    )
    p.add_argument("--user-col", help="the column with the user id (default user_id)")
    p.add_argument("--item-col", help="the column with the item id (default item_id)")
    p.add_argument("--time-col", help="the column with the time: seconds or ISO-8601 (default timestamp)")
    p.add_argument("--event-col", help="the column with the event type (optional; default: a column named event)")
    p.add_argument("--time-format", help="strptime format of the time column, e.g. '%%d/%%m/%%Y %%H:%%M'")
    p.add_argument("--map-file", help="CSV/Parquet: the department's item id, then the catalog's item_id")
    p.add_argument("--name", help="the node's name (default: the --out directory's name)")
    p.add_argument(
        "--max-quarantine-fraction",
        type=float,
        default=0.01,
        help="share of corrupt rows (null ids, unmapped or unknown items, bad timestamps, duplicates) tolerated; "
        "short histories never count (default 0.01)",
    )


def _split_args(sub) -> None:
    p = sub.add_parser("split", help="one interactions file -> N simulated departments' raw CSVs (to try a deployment)")
    p.add_argument("path", help="a fedmart-schema interactions file (user_id, item_id, timestamp, optional event)")
    p.add_argument("--out", required=True, help="directory for NAME.csv per department")
    p.add_argument(
        "--by",
        choices=["department", "user"],
        default="department",
        help="department: the catalog's department of each item (needs --catalog); user: a hash of "
        "the user id (needs --nodes)",
    )
    p.add_argument("--catalog", help="catalog.parquet (for --by department)")
    p.add_argument("--nodes", type=int, help="how many departments (--by department: groups the catalog's)")
    p.add_argument(
        "--own-columns",
        action="store_true",
        help="each department gets its own column names, and NAME.columns.yaml for prepare --columns",
    )
    p.add_argument(
        "--own-item-ids",
        action="store_true",
        help="each department gets its own item ids, and NAME.item-map.csv for prepare --map-file",
    )


@exit_on_user_error
def data_cmd(args: argparse.Namespace) -> int:
    from fedmart.console import console

    if args.data_cmd == "fetch":
        from clients.movielens import fetch

        dest = fetch(args.dest)
        console.print(f"MovieLens-100K ready in {dest}")
        return 0
    if args.data_cmd == "prepare":
        return _prepare(args)
    if args.data_cmd == "split":
        return _split(args)
    if args.data_cmd == "synth":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from clients.synthetic import generate
        from conf.settings import SettingsError, SyntheticSettings

        try:
            cfg = SyntheticSettings(
                num_users=args.users,
                num_items=args.items,
                num_departments=args.departments,
                num_merchants=args.merchants,
                seed=args.seed,
            )
        except SettingsError as exc:
            raise UserError(f"data synth: {exc}") from exc
        catalog, inter = generate(cfg)
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
        catalog = Catalog.load(args.catalog, hint="pass --catalog PATH: the platform catalog.parquet")
        table = read_table(path)
    result = validate(table, catalog, min_history=args.min_history, source=str(path))
    out = Path(args.out) if args.out else path.with_name(path.name + ".check")
    report_path, q_path = write_report(result, out)
    print_check(result.report, report_path, q_path)
    return 0 if result.ok else 1


def _say(line: str) -> None:
    """One output line, never wrapped (paths and counts are copied from it) nor colour-highlighted."""
    from fedmart.console import console

    console.print(line, soft_wrap=True, highlight=False)


def _prepare(args: argparse.Namespace) -> int:
    from clients.prepare import ColumnMap, prepare

    cmap = ColumnMap.from_yaml(args.columns) if args.columns else ColumnMap()
    cmap = cmap.with_flags(
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        event_col=args.event_col,
        time_format=args.time_format,
        map_file=args.map_file,
    )
    done = prepare(
        args.path, args.catalog, args.out, cmap, name=args.name, max_quarantine_fraction=args.max_quarantine_fraction
    )
    if done.report["ignored_columns"]:
        _say(f"ignored columns (not copied to the node): {', '.join(done.report['ignored_columns'])}")
    if done.refusal:
        _say(f"data refused: {done.summary}")
        raise UserError(f"{done.refusal}; nothing written for the node")
    _say(f"data ok: {done.summary}")
    _say(
        f"node data in {done.out}: interactions.parquet, catalog.parquet (catalog {done.report['catalog_version']}), "
        f"node.json; quarantine: {done.quarantine}; report: {done.report_path}"
    )
    return 0


def _split(args: argparse.Namespace) -> int:
    from clients.department_split import assign, write_departments
    from clients.interactions import read_table
    from federation.catalog import Catalog

    table = read_table(args.path)
    catalog = (
        Catalog.load(args.catalog, hint="pass --catalog PATH: the platform catalog.parquet") if args.catalog else None
    )
    depts, unassigned = assign(table, by=args.by, catalog=catalog, nodes=args.nodes)
    written, rest = write_departments(
        table, depts, unassigned, args.out, own_columns=args.own_columns, own_item_ids=args.own_item_ids
    )
    for d in written:
        extra = f" (columns: {d.columns_yaml})" if d.columns_yaml else ""
        _say(f"{d.name}: {len(d.rows):,} rows -> {d.csv}{extra}")
    if rest is not None:
        _say(f"unassigned: {len(unassigned):,} rows whose item is not in the catalog -> {rest}")
    columns = " --columns " + str(Path(args.out) / "NAME.columns.yaml") if any(d.columns_yaml for d in written) else ""
    _say(
        f"{len(written)} departments from {table.num_rows:,} rows; next, for each NAME: "
        f"fedmart data prepare {Path(args.out) / 'NAME.csv'}{columns} --catalog {args.catalog or 'CATALOG'} "
        "--out nodes/NAME"
    )
    return 0


def print_check(report: dict, report_path: Path, q_path: Path) -> None:
    """Print a validation report (`fedmart data check`, and `fedmart node` when it refuses to join)."""
    from rich.table import Table

    from clients.validation import summary
    from fedmart.console import console

    status = "[green]clean[/]" if not report["rows_quarantined"] else "[yellow]problems found[/]"
    console.print(f"[bold]{report['source']}[/]: {status} (catalog {report['catalog_version']})")
    console.print(summary(report), soft_wrap=True, highlight=False)
    if report["problems"]:
        t = Table("problem", "rows", "what it means / how to fix", "first rows")
        for name, p in report["problems"].items():
            t.add_row(name, f"{p['count']:,}", p["reason"], ", ".join(map(str, p["example_rows"])))
        console.print(t)
    if report["unexpected_columns"]:
        console.print(f"unexpected columns (ignored): {', '.join(report['unexpected_columns'])}")
    console.print(f"report: {report_path}\nquarantine: {q_path}")


data_cmd.add_arguments = _data_args  # type: ignore[attr-defined]
command("data", "fetch, generate, check, prepare and split interaction data")(data_cmd)
