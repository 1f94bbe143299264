"""Data governance: every bad row gets its reason, and no row is ever lost."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clients.interactions import DataError, read_table
from clients.validation import REASONS, validate, write_report


def _table(rows: list[tuple], event: bool = True) -> pa.Table:
    cols = {"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "timestamp": [r[2] for r in rows]}
    if event:
        cols["event"] = [r[3] if len(r) > 3 else "view" for r in rows]
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


GOOD = [("u1", "i1", "100"), ("u1", "i2", "200"), ("u1", "i3", "300"), ("u2", "i4", "100"),
        ("u2", "i5", "150"), ("u2", "i6", "160")]  # fmt: skip


def test_clean_data_passes(tiny_catalog):
    result = validate(_table(GOOD), tiny_catalog, min_history=3)
    assert result.ok
    assert result.report["rows_clean"] == 6
    assert result.interactions.num_users == 2
    # item ids map to 1-based model indices
    assert sorted(result.interactions.item.tolist()) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ((None, "i1", "400"), "null_id"),
        (("u1", "", "400"), "null_id"),
        (("u1", "i1", "yesterday"), "bad_type"),
        (("u1", "i1", None), "bad_type"),
        (("u1", "nope", "400"), "unknown_item"),
        (("u1", "i1", "-5"), "timestamp_out_of_range"),
        (("u1", "i1", "99999999999"), "timestamp_out_of_range"),
        (("u1", "i1", "100"), "duplicate"),
    ],
)
def test_each_problem_gets_its_reason_and_no_row_is_lost(tiny_catalog, bad_row, reason):
    table = _table([*GOOD, bad_row])
    result = validate(table, tiny_catalog, min_history=3)
    assert result.report["problems"][reason]["count"] == 1
    assert result.quarantine.column("_reason").to_pylist() == [reason]
    assert result.quarantine.column("_row").to_pylist() == [len(GOOD)]
    assert result.report["rows_clean"] + result.report["rows_quarantined"] == table.num_rows
    assert reason in REASONS


def test_short_history_quarantines_the_whole_user(tiny_catalog):
    table = _table([*GOOD, ("u3", "i1", "100"), ("u3", "i2", "200")])
    result = validate(table, tiny_catalog, min_history=3)
    assert result.report["problems"]["short_history"]["count"] == 2
    assert sorted(result.quarantine.column("_row").to_pylist()) == [6, 7]
    assert "u3" not in set(result.interactions.user_ids)


def test_duplicate_keeps_the_first_copy(tiny_catalog):
    table = _table([*GOOD, ("u1", "i1", "100", "view")])
    result = validate(table, tiny_catalog)
    assert result.report["rows_clean"] == 6
    # a different event type at the same instant is not a duplicate
    table = _table([*GOOD, ("u1", "i1", "100", "purchase")])
    assert validate(table, tiny_catalog).report["rows_clean"] == 7


def test_iso_timestamps_are_accepted(tiny_catalog):
    rows = [("u1", "i1", "2024-01-01"), ("u1", "i2", "2024-01-02T10:00:00"), ("u1", "i3", "2024-01-03 11:00:00")]
    result = validate(_table(rows), tiny_catalog)
    assert result.ok
    assert np.all(np.diff(np.sort(result.interactions.timestamp)) > 0)


def test_mixed_problems_partition_every_row(tiny_catalog):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(300):
        u = f"u{rng.integers(0, 20)}"
        it = ["i1", "i2", "i3", "i4", "nope", None][rng.integers(0, 6)]
        ts = [str(rng.integers(1, 10_000)), "bad", "-1"][rng.choice(3, p=[0.8, 0.1, 0.1])]
        rows.append((u, it, ts))
    table = _table(rows)
    result = validate(table, tiny_catalog)
    q_rows = set(result.quarantine.column("_row").to_pylist())
    assert len(q_rows) == result.report["rows_quarantined"]
    assert result.report["rows_clean"] + len(q_rows) == table.num_rows
    assert sum(p["count"] for p in result.report["problems"].values()) == len(q_rows)


def test_missing_required_column_is_fatal_with_one_line(tiny_catalog):
    table = pa.table({"user_id": ["u1"], "timestamp": ["1"]})
    with pytest.raises(DataError) as err:
        validate(table, tiny_catalog, source="f.csv")
    msg = str(err.value)
    assert "\n" not in msg and "item_id" in msg and "f.csv" in msg


def test_unexpected_columns_are_reported(tiny_catalog):
    table = _table(GOOD).append_column("price", pa.array(["1"] * 6))
    assert validate(table, tiny_catalog).report["unexpected_columns"] == ["price"]


def test_read_table_csv_keeps_malformed_values_as_rows(tmp_path, tiny_catalog):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,100\nu1,i2,abc\nu1,i3,300\nu1,i4,400\n")
    result = validate(read_table(path), tiny_catalog)
    assert result.report["problems"]["bad_type"]["count"] == 1
    assert result.report["rows_clean"] == 3


def test_unreadable_file_is_a_data_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        read_table(path)


def test_report_and_quarantine_files(tmp_path, tiny_catalog):
    result = validate(_table([*GOOD, ("u1", "nope", "1")]), tiny_catalog)
    report_path, q_path = write_report(result, tmp_path)
    assert json.loads(report_path.read_text())["rows_quarantined"] == 1
    assert pq.read_table(q_path).num_rows == 1


def _fedmart(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmart", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_data_check(tmp_path, tiny_catalog):
    cat = tiny_catalog.save(tmp_path / "catalog.parquet")
    good = tmp_path / "good.csv"
    good.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in GOOD))
    bad = tmp_path / "bad.csv"
    bad.write_text(good.read_text() + "u1,nope,5\n")
    ok = _fedmart("data", "check", str(good), "--catalog", str(cat))
    assert ok.returncode == 0, ok.stderr
    res = _fedmart("data", "check", str(bad), "--catalog", str(cat))
    assert res.returncode == 1
    assert "unknown_item" in res.stdout
    assert (tmp_path / "bad.csv.check" / "quarantine.parquet").is_file()
    missing = tmp_path / "nocol.csv"
    missing.write_text("user_id,timestamp\nu1,1\n")
    fatal = _fedmart("data", "check", str(missing), "--catalog", str(cat))
    assert fatal.returncode == 2
    assert fatal.stderr.strip().count("\n") == 0 and "item_id" in fatal.stderr
    assert "Traceback" not in fatal.stderr
