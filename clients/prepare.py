"""A department's own export to a node's data directory (``fedmart data prepare``).

A department exports its interactions with its own column names and, often, its own item
ids. :func:`prepare` renames the columns (:class:`ColumnMap`: flags or a small YAML), maps
the item ids to the platform catalog's (:func:`read_item_map`), validates the rows against
the catalog (:func:`clients.validation.validate`), quarantines corruption (the department's
own rows, with the reason, in ``quarantine.csv``) and writes the directory ``fedmart node
--data DIR`` reads (:func:`clients.node.load_node`)::

    DIR/interactions.parquet   rows that are not corrupt, fedmart schema, catalog item ids
    DIR/catalog.parquet        the catalog they were mapped to
    DIR/node.json              name, catalog, catalog_version (checked when the node starts
                               and against the coordinator's at join), what prepare found
    DIR/prepare-report.json    the validation report, the columns and mapping used
    DIR/quarantine.csv         the corrupt rows as the department wrote them, + _row, _reason

Columns the mapping does not name never reach the directory. A directory that already holds
a node's state (``DIR/.fedmart/``: its privacy ledger, population id) keeps it: new data is
the same population, with the same spend.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clients.interactions import DataError, read_table
from clients.validation import id_strings, quarantine_refusal, quarantined_phrase, summary, usable_table, validate
from federation.catalog import Catalog

__all__ = ["ColumnMap", "Prepared", "prepare", "read_item_map", "to_schema"]

# ColumnMap field -> the `fedmart data prepare` flag that sets it (YAML keys are the field names).
FLAGS = {
    "user_col": "--user-col",
    "item_col": "--item-col",
    "time_col": "--time-col",
    "event_col": "--event-col",
    "time_format": "--time-format",
    "map_file": "--map-file",
}


@dataclass(frozen=True)
class ColumnMap:
    """Which of the department's columns hold the user, the item, the time and the event.

    ``event_col`` None uses a column named ``event`` if there is one. ``time_format`` is a
    ``strptime`` format for times that are neither seconds nor ISO-8601. ``map_file`` maps
    the department's item ids to the catalog's (:func:`read_item_map`); None means the
    department already uses the catalog's ids.
    """

    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    event_col: str | None = None
    time_format: str | None = None
    map_file: str | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # field -> where it was set

    @classmethod
    def from_yaml(cls, path: str | Path) -> ColumnMap:
        """Read ``--columns FILE``: any of the field names as keys; ``map_file`` is relative to the file."""
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(f"--columns {path}: cannot be read ({str(exc).splitlines()[0]})") from exc
        known = list(FLAGS)
        if not isinstance(values, dict) or set(values) - set(known):
            extra = sorted(set(values) - set(known)) if isinstance(values, dict) else values
            raise DataError(f"--columns {path}: unknown keys {extra}; known: {known}")
        bad = {k: v for k, v in values.items() if v is not None and not isinstance(v, str | int)}
        if bad:
            raise DataError(f"--columns {path}: {sorted(bad)} must be column names (strings)")
        values = {k: str(v) for k, v in values.items() if v is not None}
        if "map_file" in values:
            values["map_file"] = str(path.parent / values["map_file"])
        return cls(**values, sources={k: f"{k} in {path}" for k in values})

    def with_flags(self, **flags: str | None) -> ColumnMap:
        """This map with the flags that were given (not None) taking precedence."""
        given = {k: v for k, v in flags.items() if v is not None}
        unknown = set(given) - set(FLAGS)
        if unknown:
            raise ValueError(f"not column-map fields: {sorted(unknown)}")
        return replace(self, **given, sources={**self.sources, **{k: FLAGS[k] for k in given}})

    def where(self, name: str) -> str:
        """Where a field was set, for error messages (the flag, or the YAML key and file)."""
        return self.sources.get(name, f"{FLAGS[name]} (default {getattr(self, name)!r})")

    def to_dict(self) -> dict[str, str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"}


def read_item_map(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The department's item ids and the catalog item ids they map to, from a CSV or Parquet file.

    The file has a header and two columns: the department's id first, the catalog's
    ``item_id`` second (further columns are ignored). Empty ids, or one department id mapped
    to two catalog ids, are refused: a mapping that guesses would train on the wrong items.
    """
    path = Path(path)
    table = read_table(path)
    if table.num_columns < 2:
        raise DataError(
            f"--map-file {path}: needs two columns (the department's item id, then the catalog's item_id), "
            f"found {table.column_names}"
        )
    dept, cat = id_strings(table.column(0)), id_strings(table.column(1))
    empty = np.flatnonzero(pc.or_(pc.is_null(dept), pc.is_null(cat)).to_numpy(zero_copy_only=False))
    if len(empty):
        raise DataError(f"--map-file {path}: row {int(empty[0])} has an empty id; every row maps one id to one id")
    dept = dept.to_numpy(zero_copy_only=False).astype(str)
    cat = cat.to_numpy(zero_copy_only=False).astype(str)
    pairs = np.unique(np.stack([dept, cat], axis=1), axis=0)
    ids, counts = np.unique(pairs[:, 0], return_counts=True)
    if (counts > 1).any():
        twice = ids[counts > 1][0]
        targets = sorted(pairs[pairs[:, 0] == twice, 1].tolist())
        raise DataError(f"--map-file {path}: {str(twice)!r} maps to several catalog items {targets[:3]}; keep one")
    return pairs[:, 0], pairs[:, 1]


def _check_columns(raw: pa.Table, cmap: ColumnMap, source: str) -> None:
    """Every named column is there, or one line naming each missing one and the flag that names it."""
    wanted = ["user_col", "item_col", "time_col", *(["event_col"] if cmap.event_col else [])]
    missing = [f"{getattr(cmap, n)!r} ({cmap.where(n)})" for n in wanted if getattr(cmap, n) not in raw.column_names]
    if missing:
        raise DataError(f"{source}: no column {', '.join(missing)}; its columns are {', '.join(raw.column_names)}")


def _times(col: pa.ChunkedArray, fmt: str | None) -> pa.ChunkedArray:
    """The time column as validation reads it; with ``fmt``, parsed here (unparseable -> null -> bad_type)."""
    if fmt is None:
        return col
    parsed = pc.strptime(id_strings(col), format=fmt, unit="s", error_is_null=True)
    return pc.cast(parsed, pa.int64())


def to_schema(
    raw: pa.Table, cmap: ColumnMap, item_map: tuple[np.ndarray, np.ndarray] | None, *, source: str = "<table>"
) -> tuple[pa.Table, np.ndarray]:
    """The department's table in the fedmart schema, and the rows whose item id the mapping lacks.

    A null item id stays null (validation quarantines it as ``null_id``); an item id the
    mapping lacks keeps the department's id and is flagged (quarantined as ``unmapped_item``).
    """
    _check_columns(raw, cmap, source)
    items = id_strings(raw[cmap.item_col])
    unmapped = np.zeros(raw.num_rows, dtype=bool)
    if item_map is not None:
        dept_ids, cat_ids = item_map
        pos = pc.index_in(items, value_set=pa.array(dept_ids, pa.string()))
        found = pc.is_valid(pos).to_numpy(zero_copy_only=False)
        unmapped = pc.is_valid(items).to_numpy(zero_copy_only=False) & ~found
        mapped = pa.array(cat_ids, pa.string()).take(pc.fill_null(pos, 0))
        items = pc.if_else(pa.array(found), mapped, items)
    cols = {
        "user_id": raw[cmap.user_col],
        "item_id": items,
        "timestamp": _times(raw[cmap.time_col], cmap.time_format),
    }
    if cmap.event_col is not None:
        cols["event"] = raw[cmap.event_col]
    elif "event" in raw.column_names:
        cols["event"] = raw["event"]
    return pa.table(cols), unmapped


@dataclass(frozen=True)
class Prepared:
    out: Path
    report: dict  # prepare-report.json
    quarantine: Path
    report_path: Path
    refusal: str | None  # why nothing was written for the node (too much corruption), else None

    @property
    def summary(self) -> str:
        return summary(self.report["validation"])


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_quarantine(raw: pa.Table, quarantine: pa.Table, path: Path) -> None:
    """The corrupt rows as the department wrote them (all its columns, as text), with _row and _reason."""
    rows = quarantine.column("_row")
    cols = {c: pc.cast(raw[c], pa.string()).take(rows) for c in raw.column_names}
    cols["_row"] = rows
    cols["_reason"] = quarantine.column("_reason")
    pacsv.write_csv(pa.table(cols), path)


def prepare(
    source: str | Path,
    catalog_path: str | Path,
    out: str | Path,
    cmap: ColumnMap,
    *,
    name: str | None = None,
    max_quarantine_fraction: float = 0.01,
) -> Prepared:
    """Map, validate and quarantine a department's export; write the node's data directory.

    Corruption above ``max_quarantine_fraction`` of the rows (or no row left to train on)
    writes the report and the quarantine file but no data for the node: ``Prepared.refusal``
    says why, naming the flag. Short histories never count against the tolerance.
    """
    source, out = Path(source), Path(out)
    if not 0 <= max_quarantine_fraction <= 1:
        raise DataError(f"--max-quarantine-fraction must be in [0, 1], got {max_quarantine_fraction}")
    if (out / "interactions.npz").is_file():
        raise DataError(
            f"--out {out}: holds a simulated node's interactions.npz, which `fedmart node` would read instead; "
            "choose another --out"
        )
    catalog = Catalog.load(catalog_path)
    raw = read_table(source)
    item_map = read_item_map(cmap.map_file) if cmap.map_file else None
    table, unmapped = to_schema(raw, cmap, item_map, source=str(source))
    result = validate(table, catalog, source=str(source), unmapped=unmapped)
    event = cmap.event_col or ("event" if "event" in raw.column_names else None)
    used = {cmap.user_col, cmap.item_col, cmap.time_col, event}
    report = {
        "source": str(source.resolve()),
        "prepared_at": int(time.time()),
        "columns": cmap.to_dict(),
        "ignored_columns": [c for c in raw.column_names if c not in used],
        "item_map": None
        if item_map is None
        else {
            "file": str(Path(cmap.map_file).resolve()),
            "entries": len(item_map[0]),
            "entries_not_in_catalog": int((catalog.index_of(item_map[1]) == 0).sum()),
        },
        "catalog": str(Path(catalog_path).resolve()),
        "catalog_version": catalog.version,
        "max_quarantine_fraction": max_quarantine_fraction,
        "validation": result.report,
    }
    out.mkdir(parents=True, exist_ok=True)
    q_path, report_path = out / "quarantine.csv", out / "prepare-report.json"
    _write_quarantine(raw, result.quarantine, q_path)
    refusal = quarantine_refusal(result.report, max_quarantine_fraction, where=q_path)
    report["refused"] = refusal
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if refusal is not None:
        # A refused export must not leave an earlier one behind for the node to train on: the
        # node would start on data that no longer matches this report. The earlier rows are
        # derived from the department's own export, which prepare never touches.
        for stale in ("interactions.parquet", "node.json"):
            (out / stale).unlink(missing_ok=True)
    else:
        catalog.save(out / "catalog.parquet")
        _atomic_parquet(usable_table(table, result), out / "interactions.parquet")
        meta = {
            "name": name or out.resolve().name,
            "catalog": "catalog.parquet",
            "catalog_version": catalog.version,
            "prepared": {
                "source": report["source"],
                "at": report["prepared_at"],
                "summary": summary(result.report),
                "quarantined": quarantined_phrase(result.report),
            },
        }
        (out / "node.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Prepared(out=out, report=report, quarantine=q_path, report_path=report_path, refusal=refusal)
