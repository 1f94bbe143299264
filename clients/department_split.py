"""Simulated departments' raw exports from one interactions file (``fedmart data split``).

For trying a deployment before real departments take part: one fedmart-schema file becomes
N raw CSVs, one per simulated department, which then go through ``fedmart data prepare``
like real exports. Rows are copied as they are, corrupt ones included (validation is
``prepare``'s job), so the files together hold exactly the input's rows. Optionally each
department gets its own column names (and a ``NAME.columns.yaml`` that ``prepare --columns``
reads) and its own item ids (and a ``NAME.item-map.csv``: its ids to the catalog's).

Silos: by the catalog's ``department`` of each row's item (rows whose item is not in the
catalog cannot be placed and go to ``unassigned.csv``), or by a hash of the user id (stable
across runs and machines: SHA-256, not Python's salted ``hash``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from clients.interactions import REQUIRED_COLUMNS, DataError
from clients.validation import id_strings
from federation.catalog import Catalog

__all__ = ["SCHEMES", "COLUMN_STYLES", "Department", "assign", "write_departments"]

SCHEMES = ("department", "user")
# Department-own column names, one style per department in turn (fedmart name -> department's).
COLUMN_STYLES = (
    {"user_id": "customer_id", "item_id": "sku", "timestamp": "ordered_at", "event": "action"},
    {"user_id": "client", "item_id": "product_code", "timestamp": "event_time", "event": "kind"},
    {"user_id": "shopper_ref", "item_id": "article", "timestamp": "ts", "event": "interaction"},
    {"user_id": "member_no", "item_id": "item_ref", "timestamp": "when", "event": "type"},
)
_YAML_KEYS = {"user_id": "user_col", "item_id": "item_col", "timestamp": "time_col", "event": "event_col"}


@dataclass(frozen=True)
class Department:
    name: str
    rows: np.ndarray  # indices into the input table
    csv: Path | None = None
    columns_yaml: Path | None = None
    item_map: Path | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "dept"


def _user_bucket(user_ids: pa.ChunkedArray, n: int) -> np.ndarray:
    ids = pc.fill_null(id_strings(user_ids), "").to_pylist()
    return np.array([int.from_bytes(hashlib.sha256(u.encode()).digest()[:8], "big") % n for u in ids], np.int64)


def assign(
    table: pa.Table, *, by: str, catalog: Catalog | None = None, nodes: int | None = None
) -> tuple[list[Department], np.ndarray]:
    """Each row's simulated department; returns the departments and the rows none could take.

    ``by="department"`` needs the catalog; ``nodes`` then groups the departments (sorted by
    name, dealt round-robin) into that many. ``by="user"`` needs ``nodes``.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}: data split reads a fedmart-schema file "
                        f"({', '.join(REQUIRED_COLUMNS)}, optional event)")  # fmt: skip
    if by not in SCHEMES:
        raise DataError(f"--by {by}: expected one of {', '.join(SCHEMES)}")
    if nodes is not None and nodes < 1:
        raise DataError(f"--nodes must be >= 1, got {nodes}")
    if by == "user":
        if nodes is None:
            raise DataError("--by user needs --nodes N (how many departments to simulate)")
        bucket = _user_bucket(table["user_id"], nodes)
        depts = [Department(f"dept-{k:02d}", np.flatnonzero(bucket == k)) for k in range(nodes)]
        return [d for d in depts if len(d.rows)], np.zeros(0, dtype=np.int64)
    if catalog is None:
        raise DataError("--by department needs --catalog CATALOG.parquet (its department column), or use --by user")
    items = pc.fill_null(id_strings(table["item_id"]), "").to_numpy(zero_copy_only=False).astype(str)
    idx = catalog.index_of(items)
    unassigned = np.flatnonzero(idx == 0)
    dept = np.where(idx > 0, catalog.department[np.maximum(idx, 1) - 1], "")
    names = sorted(set(dept[idx > 0].tolist()))
    if nodes is None:
        groups = {n: [n] for n in names}
    else:
        groups = {f"dept-{k:02d}": names[k::nodes] for k in range(min(nodes, len(names)))}
    out, used = [], set()
    for label, members in groups.items():
        slug = _slug(label)
        while slug in used:
            slug += "-x"
        used.add(slug)
        out.append(Department(slug, np.flatnonzero(np.isin(dept, members) & (idx > 0))))
    return out, unassigned


def _as_text(table: pa.Table) -> pa.Table:
    return pa.table({c: pc.cast(table[c], pa.string()) for c in table.column_names})


def write_departments(
    table: pa.Table,
    departments: list[Department],
    unassigned: np.ndarray,
    out: str | Path,
    *,
    own_columns: bool = False,
    own_item_ids: bool = False,
) -> tuple[list[Department], Path | None]:
    """Write ``OUT/NAME.csv`` per department (and its columns YAML and item map when asked), and
    ``OUT/unassigned.csv`` when some rows could not be placed. Returns what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = _as_text(table)
    written = []
    for k, dept in enumerate(departments):
        part = text.take(pa.array(dept.rows, pa.int64()))
        columns_yaml = item_map = None
        if own_item_ids:
            item_map = out / f"{dept.name}.item-map.csv"
            part = _own_item_ids(part, dept.name, item_map)
        if own_columns:
            style = COLUMN_STYLES[k % len(COLUMN_STYLES)]
            part = part.rename_columns([style.get(c, c) for c in part.column_names])
            columns_yaml = out / f"{dept.name}.columns.yaml"
            lines = [f"{_YAML_KEYS[c]}: {style[c]}" for c in _YAML_KEYS if c in text.column_names]
            if item_map is not None:
                lines.append(f"map_file: {item_map.name}")
            columns_yaml.write_text("\n".join(lines) + "\n")
        elif item_map is not None:
            columns_yaml = out / f"{dept.name}.columns.yaml"
            columns_yaml.write_text(f"map_file: {item_map.name}\n")
        csv = out / f"{dept.name}.csv"
        pacsv.write_csv(part, csv)
        written.append(Department(dept.name, dept.rows, csv, columns_yaml, item_map))
    rest = None
    if len(unassigned):
        rest = out / "unassigned.csv"
        pacsv.write_csv(text.take(pa.array(unassigned, pa.int64())), rest)
    return written, rest


def _own_item_ids(part: pa.Table, name: str, map_path: Path) -> pa.Table:
    """Replace the catalog's item ids by department-own ones (``NAME-000001``...); write the mapping."""
    items = part["item_id"]
    known = pc.unique(pc.drop_null(items)).to_numpy(zero_copy_only=False).astype(str)
    known.sort()
    own = np.array([f"{name}-{k:06d}" for k in range(1, len(known) + 1)], dtype=object)
    pacsv.write_csv(pa.table({f"{name}_item": pa.array(own, pa.string()), "item_id": pa.array(known)}), map_path)
    pos = pc.index_in(items, value_set=pa.array(known))
    renamed = pa.array(own, pa.string()).take(pos)  # a null item id stays null
    return part.set_column(part.column_names.index("item_id"), "item_id", renamed)
