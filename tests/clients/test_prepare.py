"""A department's own export to a node's data directory (clients/prepare.py).

The department in these tests exports ``customer,sku,when,what,store`` with its own item ids
(``SKU-n``), a mapping to the catalog's ids, and the kinds of damage real exports carry.
"""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest

from clients.interactions import DataError
from clients.node import load_node
from clients.prepare import ColumnMap, prepare, read_item_map
from conf.settings import NodeSettings, RunSettings

HEADER = ["customer", "sku", "when", "what", "store"]
GOOD = [  # three users with 3-4 events each, in the department's own ids
    ("ann", "SKU-1", "2024-01-01", "view", "s1"), ("ann", "SKU-2", "2024-01-02", "view", "s1"),
    ("ann", "SKU-3", "2024-01-03", "cart", "s1"), ("bob", "SKU-4", "2024-01-01", "view", "s2"),
    ("bob", "SKU-5", "2024-01-05", "view", "s2"), ("bob", "SKU-6", "2024-01-06", "buy", "s2"),
    ("cyd", "SKU-1", "2024-02-01", "view", "s1"), ("cyd", "SKU-3", "2024-02-02", "view", "s1"),
    ("cyd", "SKU-5", "2024-02-03", "view", "s1"), ("cyd", "SKU-2", "2024-02-04", "buy", "s1"),
]  # fmt: skip
SHORT = [("dan", "SKU-1", "2024-03-01", "view", "s3")]  # one event: the node's nature, not an error
NULL_ID = ("", "SKU-2", "2024-03-02", "view", "s3")
DUPLICATE = ("ann", "SKU-1", "2024-01-01", "view", "s1")
UNMAPPED = ("bob", "SKU-99", "2024-01-07", "view", "s2")  # not in the department's mapping
MAPPED_OUTSIDE = ("cyd", "SKU-7", "2024-02-05", "view", "s1")  # mapped to an id the catalog lacks
MAP = [("SKU-1", "i1"), ("SKU-2", "i2"), ("SKU-3", "i3"), ("SKU-4", "i4"), ("SKU-5", "i5"), ("SKU-6", "i6"),
       ("SKU-7", "i-retired")]  # fmt: skip
COLUMNS = {"user_col": "customer", "item_col": "sku", "time_col": "when", "event_col": "what"}


def _csv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def dept(tmp_path, tiny_catalog):
    """``make(rows)``: (export, catalog, column map with the mapping) for the department."""
    catalog = tiny_catalog.save(tmp_path / "platform" / "catalog.parquet")
    mapping = _csv(tmp_path / "sku-map.csv", ["sku", "catalog_item"], MAP)

    def make(rows):
        export = _csv(tmp_path / "export.csv", HEADER, rows)
        return export, catalog, ColumnMap(**COLUMNS, map_file=str(mapping))

    return make


def test_an_export_with_its_own_columns_and_ids_becomes_a_node_directory(dept, tmp_path, tiny_catalog):
    rows = [*GOOD, *SHORT, NULL_ID, DUPLICATE, UNMAPPED, MAPPED_OUTSIDE]
    export, catalog, cmap = dept(rows)

    done = prepare(export, catalog, tmp_path / "books", cmap, max_quarantine_fraction=0.3)  # 4 of 15

    assert done.refusal is None
    v = done.report["validation"]
    assert v["rows_quarantined"] == 4 and {k: p["count"] for k, p in v["problems"].items()} == {
        "null_id": 1,
        "unmapped_item": 1,
        "unknown_item": 1,
        "duplicate": 1,
    }
    assert (v["users_short_history"], v["rows_short_history"]) == (1, 1)
    assert done.summary.endswith("quarantined 4 (1 null id, 1 unmapped item, 1 unknown item, 1 duplicate)")
    # the quarantine file holds the department's own rows, with the row number and the reason
    with done.quarantine.open() as f:
        quarantined = list(csv.DictReader(f))
    assert [(q["customer"], q["sku"], q["_row"], q["_reason"]) for q in quarantined] == [
        ("", "SKU-2", str(len(GOOD) + 1), "null_id"),
        ("ann", "SKU-1", str(len(GOOD) + 2), "duplicate"),
        ("bob", "SKU-99", str(len(GOOD) + 3), "unmapped_item"),
        ("cyd", "SKU-7", str(len(GOOD) + 4), "unknown_item"),
    ]
    assert done.report["ignored_columns"] == ["store"]
    assert done.report["item_map"]["entries_not_in_catalog"] == 1

    # the directory is what `fedmart node --data` reads, with the catalog's ids
    written = pq.read_table(tmp_path / "books" / "interactions.parquet")
    assert written.column_names == ["user_id", "item_id", "timestamp", "event"]  # not the store column
    assert written.num_rows == len(GOOD) + len(SHORT)  # not corrupt: kept for the node, short ones too
    node = load_node(NodeSettings.from_node_config({"data-dir": str(tmp_path / "books")}), RunSettings())
    assert node.name == "books" and node.catalog.version == tiny_catalog.version
    assert len(node.interactions) == len(GOOD) and node.interactions.num_users == 3
    assert node.report["rows_quarantined"] == 0 and node.report["users_short_history"] == 1
    assert json.loads((tmp_path / "books" / "node.json").read_text())["catalog_version"] == tiny_catalog.version


def test_short_histories_never_refuse_while_corruption_above_the_tolerance_does(dept, tmp_path):
    many_short = [(f"new{k}", "SKU-1", "2024-03-01", "view", "s3") for k in range(30)]
    export, catalog, cmap = dept([*GOOD, *many_short])  # 30 of 40 rows: users with one event

    ok = prepare(export, catalog, tmp_path / "short", cmap, max_quarantine_fraction=0.0)

    assert ok.refusal is None and (tmp_path / "short" / "interactions.parquet").is_file()

    export, catalog, cmap = dept([*GOOD, NULL_ID, DUPLICATE])  # 2 of 12 rows corrupt
    refused = prepare(export, catalog, tmp_path / "dirty", cmap, max_quarantine_fraction=0.1)

    assert refused.refusal is not None and "--max-quarantine-fraction 0.1" in refused.refusal
    assert "null_id=1, duplicate=1" in refused.refusal
    assert not (tmp_path / "dirty" / "interactions.parquet").exists()  # nothing for the node
    assert refused.quarantine.is_file() and refused.report_path.is_file()  # what to fix, all the same
    assert prepare(export, catalog, tmp_path / "dirty", cmap, max_quarantine_fraction=0.2).refusal is None
    # refused again: the rows the looser tolerance let through are not left for the node
    assert prepare(export, catalog, tmp_path / "dirty", cmap, max_quarantine_fraction=0.1).refusal is not None
    assert not (tmp_path / "dirty" / "interactions.parquet").exists()
    assert not (tmp_path / "dirty" / "node.json").exists()


def test_a_yaml_names_the_columns_and_flags_override_it(dept, tmp_path):
    export, catalog, _ = dept(GOOD)
    (tmp_path / "cols.yaml").write_text(
        "user_col: customer\nitem_col: sku\ntime_col: wrong\nevent_col: what\nmap_file: sku-map.csv\n"
    )

    cmap = ColumnMap.from_yaml(tmp_path / "cols.yaml")
    with pytest.raises(DataError, match=r"no column 'wrong' \(time_col in .*cols.yaml\); its columns are customer"):
        prepare(export, catalog, tmp_path / "n", cmap)
    done = prepare(export, catalog, tmp_path / "n", cmap.with_flags(time_col="when"))

    assert done.refusal is None and done.report["validation"]["rows_clean"] == len(GOOD)


def test_a_missing_column_names_the_flag_that_sets_it(dept, tmp_path):
    export, catalog, cmap = dept(GOOD)

    with pytest.raises(DataError, match=r"no column 'user_id' \(--user-col \(default 'user_id'\)\)"):
        prepare(export, catalog, tmp_path / "n", ColumnMap(item_col="sku", time_col="when"))


def test_unknown_yaml_keys_are_refused(tmp_path):
    (tmp_path / "cols.yaml").write_text("user: customer\n")

    with pytest.raises(DataError, match=r"unknown keys \['user'\]"):
        ColumnMap.from_yaml(tmp_path / "cols.yaml")


def test_an_ambiguous_mapping_is_refused_rather_than_guessed(tmp_path):
    path = _csv(tmp_path / "map.csv", ["sku", "item"], [("SKU-1", "i1"), ("SKU-1", "i2"), ("SKU-2", "i2")])

    with pytest.raises(DataError, match=r"'SKU-1' maps to several catalog items \['i1', 'i2'\]"):
        read_item_map(path)


def test_a_time_format_parses_the_departments_own_dates(dept, tmp_path):
    rows = [(u, s, f"{t[8:10]}/{t[5:7]}/{t[:4]}", e, st) for u, s, t, e, st in GOOD]  # dd/mm/yyyy
    export, catalog, cmap = dept([*rows, ("ann", "SKU-4", "45/01/2024", "view", "s1")])  # no such day

    done = prepare(export, catalog, tmp_path / "n", cmap.with_flags(time_format="%d/%m/%Y"))

    assert done.report["validation"]["rows_clean"] == len(GOOD)
    assert done.report["validation"]["problems"]["bad_type"]["count"] == 1


def test_preparing_again_keeps_the_nodes_ledger_and_population(dept, tmp_path):
    export, catalog, cmap = dept(GOOD)
    out = tmp_path / "books"
    prepare(export, catalog, out, cmap)
    (out / ".fedmart").mkdir()
    (out / ".fedmart" / "privacy-ledger.json").write_text("{}")

    prepare(export, catalog, out, cmap)

    assert (out / ".fedmart" / "privacy-ledger.json").read_text() == "{}"


def test_a_simulated_nodes_directory_is_not_overwritten(dept, tmp_path):
    export, catalog, cmap = dept(GOOD)
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "interactions.npz").write_bytes(b"")

    with pytest.raises(DataError, match="interactions.npz"):
        prepare(export, catalog, tmp_path / "sim", cmap)
