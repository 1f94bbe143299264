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
from clients.validation import REASONS, quarantine_refusal, summary, validate, write_report


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


def test_a_short_history_is_set_aside_and_counted_not_quarantined(tiny_catalog):
    table = _table([*GOOD, ("u3", "i1", "100"), ("u3", "i2", "200")])

    result = validate(table, tiny_catalog, min_history=3)

    report = result.report
    assert result.ok and report["rows_quarantined"] == 0 and result.quarantine.num_rows == 0
    assert (report["users_short_history"], report["rows_short_history"]) == (1, 2)
    assert "short_history" not in report["problems"]
    # the rows trained on are what they were when short histories were quarantined
    assert "u3" not in set(result.interactions.user_ids) and report["rows_clean"] == len(GOOD)
    assert report["rows_clean"] + report["rows_quarantined"] + report["rows_short_history"] == table.num_rows


def test_short_histories_never_refuse_whatever_the_tolerance(tiny_catalog):
    table = _table([*GOOD, *[(f"s{k}", "i1", "100") for k in range(20)]])  # 20 users with one event each

    report = validate(table, tiny_catalog, min_history=3).report

    assert report["rows_short_history"] == 20 and report["rows_short_history"] > report["rows_clean"]
    assert quarantine_refusal(report, 0.0) is None


def test_corruption_above_the_tolerance_is_refused_naming_the_flag(tiny_catalog):
    table = _table([*GOOD, (None, "i1", "400"), ("u1", "i1", "100")])  # a null id and a duplicate

    report = validate(table, tiny_catalog, min_history=3).report

    refusal = quarantine_refusal(report, 0.1, where="q.csv")
    assert refusal is not None and "\n" not in refusal
    assert "2 of 8 rows quarantined" in refusal and "null_id=1" in refusal and "duplicate=1" in refusal
    assert "--max-quarantine-fraction 0.1" in refusal and "raise --max-quarantine-fraction" in refusal
    assert "q.csv" in refusal
    assert quarantine_refusal(report, 0.25) is None  # 2 of 8 is within a quarter
    assert "raise --max-corrupt" in quarantine_refusal(report, 0.0, flag="--max-corrupt")  # the caller's flag


def test_no_row_to_train_on_is_refused_whatever_the_tolerance(tiny_catalog):
    report = validate(_table([("u1", "i1", "1"), ("u1", "i2", "2")]), tiny_catalog, min_history=3).report

    refusal = quarantine_refusal(report, 1.0)

    assert refusal is not None and "no row to train on" in refusal and "at least 3 events" in refusal


def test_the_summary_always_counts_corruption_and_short_histories(tiny_catalog):
    table = _table([*GOOD, ("u3", "i1", "100"), (None, "i1", "400"), ("u1", "i1", "100")])

    line = summary(validate(table, tiny_catalog, min_history=3).report)

    assert line == (
        "6 events, 2 users; 1 users with <3 events set aside (1 events: too short to train on, not an error); "
        "quarantined 2 (1 null id, 1 duplicate)"
    )
    assert summary(validate(_table(GOOD), tiny_catalog).report) == "6 events, 2 users; quarantined 0"


def test_unmapped_items_are_quarantined_with_their_own_reason(tiny_catalog):
    table = _table([*GOOD, ("u1", "dept-sku-9", "400")])
    unmapped = np.zeros(table.num_rows, dtype=bool)
    unmapped[-1] = True

    result = validate(table, tiny_catalog, unmapped=unmapped)

    assert result.quarantine.column("_reason").to_pylist() == ["unmapped_item"]
    assert result.report["problems"]["unmapped_item"]["count"] == 1


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
    assert result.report["rows_clean"] + len(q_rows) + result.report["rows_short_history"] == table.num_rows
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


def test_read_table_csv_with_a_quoted_header_still_reads_every_value_as_text(tmp_path, tiny_catalog):
    path = tmp_path / "quoted.csv"  # how pyarrow and spreadsheet exports write headers
    path.write_text('"user_id","item_id","timestamp"\n"007","i1","100"\n"007","i2","200"\n"007","i3","300"\n')

    table = read_table(path)

    assert table["user_id"].to_pylist() == ["007"] * 3  # not the number 7: ids are text
    assert validate(table, tiny_catalog).interactions.user_ids.tolist() == ["007"]
