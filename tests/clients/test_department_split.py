"""Simulated departments' raw exports (clients/department_split.py): the files together are the input."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from clients.department_split import assign, write_departments
from clients.interactions import DataError, read_table
from clients.prepare import ColumnMap, read_item_map, to_schema

ROWS = [  # (user, item, timestamp, event): Kitchen items i1 i2 i5 i6, Grocery i3 i4 (tests/conftest.py)
    ("ann", "i1", "100", "view"), ("ann", "i3", "200", "view"), ("ann", "i5", "300", "buy"),
    ("bob", "i2", "100", "view"), ("bob", "i4", "150", "cart"), ("bob", "i6", "160", "view"),
    ("cyd", "i3", "10", "view"), ("cyd", "nope", "20", "view"), ("cyd", None, "30", "view"),
    ("dan", "i1", "bad", "view"), ("dan", "i1", "bad", "view"),  # corrupt rows are copied as they are
]  # fmt: skip


def _table() -> pa.Table:
    names = ("user_id", "item_id", "timestamp", "event")
    return pa.table({n: pa.array([r[i] for r in ROWS], pa.string()) for i, n in enumerate(names)})


def _rows(table: pa.Table) -> Counter:
    return Counter(zip(*(table[c].to_pylist() for c in ("user_id", "item_id", "timestamp", "event")), strict=True))


def _read_back(dept) -> pa.Table:
    """A department's CSV in the fedmart schema again, as `fedmart data prepare` reads it."""
    cmap = ColumnMap.from_yaml(dept.columns_yaml) if dept.columns_yaml else ColumnMap()
    item_map = read_item_map(cmap.map_file) if cmap.map_file else None
    table, unmapped = to_schema(read_table(dept.csv), cmap, item_map)
    assert not unmapped.any()
    return table


@pytest.mark.parametrize("own", [(False, False), (True, False), (True, True)], ids=["plain", "columns", "ids"])
def test_split_by_department_round_trips(tiny_catalog, tmp_path, own):
    table = _table()
    depts, unassigned = assign(table, by="department", catalog=tiny_catalog)

    written, rest = write_departments(table, depts, unassigned, tmp_path, own_columns=own[0], own_item_ids=own[1])

    assert [d.name for d in written] == ["grocery", "kitchen"]
    back = [_read_back(d) for d in written]
    for d, part in zip(written, back, strict=True):
        items = tiny_catalog.index_of(part["item_id"].to_numpy(zero_copy_only=False).astype(str))
        assert set(tiny_catalog.department[items - 1]) == {d.name.capitalize()}  # one department per file
    # rows whose item is not in the catalog cannot be placed: they are in unassigned.csv, not lost
    assert rest is not None and _rows(read_table(rest)) == Counter({("cyd", "nope", "20", "view"): 1,
                                                                    ("cyd", None, "30", "view"): 1})  # fmt: skip
    together = sum((_rows(t) for t in back), Counter()) + _rows(read_table(rest))
    assert together == _rows(table)
    if own[0]:
        assert read_table(written[0].csv).column_names != read_table(written[1].csv).column_names
    if own[1]:
        assert "i1" not in read_table(written[1].csv).column(1).to_pylist()  # the department's own ids


def test_split_by_user_keeps_each_user_in_one_department_and_every_row(tmp_path):
    table = _table()
    depts, unassigned = assign(table, by="user", nodes=3)

    written, rest = write_departments(table, depts, unassigned, tmp_path)

    assert rest is None and len(unassigned) == 0
    parts = [read_table(d.csv) for d in written]
    users = [set(p["user_id"].to_pylist()) for p in parts]
    assert sum(len(u) for u in users) == len(set().union(*users)) == 4  # no user in two departments
    assert sum((_rows(p) for p in parts), Counter()) == _rows(table)
    again, _ = assign(table, by="user", nodes=3)
    assert [d.rows.tolist() for d in again] == [d.rows.tolist() for d in depts]  # stable: a hash, not random


def test_departments_can_be_grouped_into_fewer_nodes(tiny_catalog):
    depts, _ = assign(_table(), by="department", catalog=tiny_catalog, nodes=1)

    assert [d.name for d in depts] == ["dept-00"] and len(depts[0].rows) == 9  # all but the 2 unplaceable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"by": "department"}, "needs --catalog"),
        ({"by": "user"}, "needs --nodes"),
        ({"by": "user", "nodes": 0}, "--nodes must be >= 1"),
    ],
)
def test_what_each_scheme_needs_is_said(kwargs, message):
    with pytest.raises(DataError, match=message):
        assign(_table(), **kwargs)
