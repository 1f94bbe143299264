"""``fedmart data prepare`` and ``fedmart data split`` through the real CLI: what they print, their exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clients.node import load_node
from conf.settings import NodeSettings, RunSettings
from fedmart.node_cmd import node_data_line

ROOT = Path(__file__).resolve().parents[2]
EXPORT = """customer;sku;when
ann;A-1;2024-01-01
ann;A-2;2024-01-02
ann;A-3;2024-01-03
bob;A-4;2024-01-01
bob;A-5;2024-01-02
bob;A-6;2024-01-03
bob;A-1;2024-01-04
cyd;A-2;2024-01-05
;A-3;2024-01-06
ann;A-1;2024-01-01
"""  # the department's own columns and ids; cyd has one event, one null id, one duplicate


def _fedmart(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m fedmart ...`` in ``cwd``, running this checkout's code (not whatever is installed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "fedmart", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture
def department(tmp_path, tiny_catalog):
    tiny_catalog.save(tmp_path / "catalog.parquet")
    (tmp_path / "export.csv").write_text(EXPORT.replace(";", ","))
    (tmp_path / "map.csv").write_text("sku,item_id\n" + "".join(f"A-{k},i{k}\n" for k in range(1, 7)))
    (tmp_path / "columns.yaml").write_text("user_col: customer\nitem_col: sku\nmap_file: map.csv\n")
    return tmp_path


def test_prepare_writes_a_node_directory_and_says_what_it_set_aside(department):
    res = _fedmart(
        "data", "prepare", "export.csv", "--columns", "columns.yaml", "--time-col", "when",
        "--catalog", "catalog.parquet", "--out", "nodes/books", "--max-quarantine-fraction", "0.2",
        cwd=department,
    )  # fmt: skip

    assert res.returncode == 0, res.stderr
    assert (
        "data ok: 7 events, 2 users; 1 users with <3 events set aside (1 events: too short to train on, not an "
        "error); quarantined 2 (1 null id, 1 duplicate)"
    ) in res.stdout
    assert "quarantine: nodes/books/quarantine.csv" in res.stdout
    node = load_node(NodeSettings.from_node_config({"data-dir": str(department / "nodes/books")}), RunSettings())
    assert (node.name, len(node.interactions)) == ("books", 7)
    # `fedmart node` says it again when it starts, with what prepare set aside before
    assert node_data_line(node) == (
        "7 events, 2 users; 1 users with <3 events set aside (1 events: too short to train on, not an error); "
        "quarantined 0 (before that, data prepare quarantined 2 (1 null id, 1 duplicate))"
    )


def test_prepare_refuses_corruption_above_its_tolerance_in_one_line_naming_the_flag(department):
    res = _fedmart(
        "data", "prepare", "export.csv", "--columns", "columns.yaml", "--time-col", "when",
        "--catalog", "catalog.parquet", "--out", "nodes/books", cwd=department,
    )  # fmt: skip

    assert res.returncode == 2
    assert res.stderr.startswith("fedmart: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "2 of 10 rows quarantined" in res.stderr and "more than --max-quarantine-fraction 0.01" in res.stderr
    assert "nothing written for the node" in res.stderr and "Traceback" not in res.stderr
    assert "data refused: 7 events, 2 users" in res.stdout  # the counts, all the same
    assert not (department / "nodes/books/interactions.parquet").exists()


def test_prepare_names_the_flag_for_a_missing_column(department):
    res = _fedmart("data", "prepare", "export.csv", "--catalog", "catalog.parquet", "--out", "n", cwd=department)

    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert (
        "no column 'user_id' (--user-col (default 'user_id')), 'item_id' (--item-col (default 'item_id')), "
        "'timestamp' (--time-col (default 'timestamp')); its columns are customer, sku, when"
    ) in res.stderr


def test_split_then_prepare_gives_each_simulated_department_a_node(department):
    # the fedmart-schema file a platform team would split: the export above, on the catalog's ids
    rows = [line.split(";") for line in EXPORT.strip().splitlines()[1:]]
    (department / "all.csv").write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},{s.replace('A-', 'i')},{t}\n" for u, s, t in rows)
    )

    split = _fedmart(
        "data", "split", "all.csv", "--by", "department", "--catalog", "catalog.parquet", "--out", "raw",
        "--own-columns", "--own-item-ids", cwd=department,
    )  # fmt: skip

    assert split.returncode == 0, split.stderr
    assert "grocery: 3 rows -> raw/grocery.csv" in split.stdout and "kitchen: 7 rows" in split.stdout
    prepare = [
        "data", "prepare", "--catalog", "catalog.parquet", "--max-quarantine-fraction", "0.5",
    ]  # fmt: skip
    kitchen = _fedmart(*prepare, "raw/kitchen.csv", "--columns", "raw/kitchen.columns.yaml", "--out", "nodes/kitchen",
                       cwd=department)  # fmt: skip
    grocery = _fedmart(*prepare, "raw/grocery.csv", "--columns", "raw/grocery.columns.yaml", "--out", "nodes/grocery",
                       cwd=department)  # fmt: skip

    assert kitchen.returncode == 0, kitchen.stderr
    node = load_node(NodeSettings.from_node_config({"data-dir": str(department / "nodes/kitchen")}), RunSettings())
    assert (node.name, node.interactions.num_users) == ("kitchen", 1)  # bob: ann and cyd have <3 events there
    # grocery's users have one event each there: nothing to train on, whatever the tolerance
    assert grocery.returncode == 2 and "no row to train on" in grocery.stderr
