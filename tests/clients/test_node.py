"""A node's private side (clients/node.py): where its data lives, its split, its identity,
the replies it already released and its cached model skeleton.

Every load goes through :func:`load_node` as the app calls it, with the node config and
run settings a deployment, a simulation or a bare ``flwr run .`` would pass.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.interactions import DataError, Interactions
from clients.node import NodeRefused, check_catalog, model_skeleton, node_dir_for, write_node_dir
from clients.node import load_node as _load_node
from conf.settings import ModelSettings, NodeSettings, RunSettings

TINY_MODEL = {"hidden": 8, "layers": 1, "heads": 1, "dropout": 0.0, "text": False}


def load_node(node_config: dict, settings: dict):
    """``clients.node.load_node`` as the app calls it: the node's config and the run config, typed."""
    return _load_node(NodeSettings.from_node_config(node_config), RunSettings.from_dict(settings))


BUILTIN = {  # the run settings of `flwr run .` without prepared data: built-in synthetic, department silos
    "data": {
        "source": "synthetic",
        "max_len": 8,
        "synthetic": {"num_users": 60, "num_items": 24, "num_departments": 3, "num_merchants": 3, "seed": 5},
    },
    "partition": {"scheme": "department"},
}
GOOD_ROWS = [  # (user, item, timestamp): two users of three events, one of four
    ("ann", "i1", 100), ("ann", "i2", 200), ("ann", "i3", 300),
    ("bob", "i4", 100), ("bob", "i5", 150), ("bob", "i6", 160),
    ("cyd", "i1", 10), ("cyd", "i3", 20), ("cyd", "i5", 30), ("cyd", "i2", 40),
]  # fmt: skip
BAD_ROW = ("cyd", "no-such-item", 50)


def _interactions(users: list[list[tuple[int, int]]]) -> Interactions:
    """One list of (item, timestamp) per user, rows in the given order."""
    rows = [(u, item, ts) for u, events in enumerate(users) for item, ts in events]
    return Interactions(
        user=np.array([r[0] for r in rows], np.int64),
        item=np.array([r[1] for r in rows], np.int64),
        timestamp=np.array([r[2] for r in rows], np.int64),
        user_ids=np.array([f"u{u}" for u in range(len(users))]),
    )


def _columns(inter: Interactions) -> tuple:
    return inter.user.tolist(), inter.item.tolist(), inter.timestamp.tolist(), inter.user_ids.tolist()


@pytest.fixture
def catalog_file(tiny_catalog, tmp_path) -> Path:
    return tiny_catalog.save(tmp_path / "catalog.parquet")


@pytest.fixture
def raw_node(tiny_catalog, tmp_path):
    """``make(rows, name="dept", fmt="parquet")``: a deployed node's data directory, as the department exports it."""

    def make(rows: list[tuple], name: str = "dept", fmt: str = "parquet") -> Path:
        d = tmp_path / name
        tiny_catalog.save(d / "catalog.parquet")
        table = pa.table(
            {k: pa.array([str(r[i]) for r in rows]) for i, k in enumerate(("user_id", "item_id", "timestamp"))}
        )
        if fmt == "parquet":
            pq.write_table(table, d / "interactions.parquet")
        else:
            table.to_pandas().to_csv(d / "interactions.csv", index=False)
        return d

    return make


# --- where a node's data lives ------------------------------------------------------------------


def test_node_dir_for_numbers_the_simulated_nodes_directories(tmp_path):
    assert node_dir_for(tmp_path, 3) == tmp_path / "node-0003"
    assert node_dir_for(str(tmp_path), 1234) == tmp_path / "node-1234"


def test_every_partition_gets_its_own_directory(tmp_path):
    dirs = {node_dir_for(tmp_path, pid) for pid in range(0, 20_000, 7)}

    assert len(dirs) == len(range(0, 20_000, 7)) and all(d.parent == tmp_path for d in dirs)


def test_a_simulated_nodes_partition_round_trips_through_its_directory(tiny_catalog, catalog_file, tmp_path):
    inter = _interactions([[(1, 10), (2, 20), (3, 30)], [(4, 5), (5, 6), (6, 7), (1, 8)]])
    nodes = tmp_path / "outputs" / "nodes"

    written = write_node_dir(node_dir_for(nodes, 2), "Kitchen", catalog_file, inter)
    node = load_node({"partition-id": 2}, {"sim": {"nodes-dir": str(nodes)}})

    assert written == node_dir_for(nodes, 2) == node.directory
    assert node.name == "Kitchen"
    assert node.catalog.version == tiny_catalog.version
    assert _columns(node.interactions) == _columns(inter)
    assert node.report is None  # validated by `fedmart simulate` before it wrote the partition


def test_a_data_dir_takes_the_nodes_own_name_and_catalog(tiny_catalog, catalog_file, tmp_path):
    write_node_dir(tmp_path / "d", "from-node-json", tmp_path / "missing.parquet", _interactions([[(1, 1), (2, 2)]]))

    node = load_node({"data-dir": str(tmp_path / "d"), "name": "Garden", "catalog": str(catalog_file)}, {})

    assert node.name == "Garden" and node.catalog.version == tiny_catalog.version


def test_the_nodes_own_data_dir_comes_before_the_simulation_and_the_builtin_data(catalog_file, tmp_path):
    write_node_dir(tmp_path / "mine", "mine", catalog_file, _interactions([[(1, 1), (2, 2), (3, 3)]]))
    write_node_dir(node_dir_for(tmp_path / "sim", 0), "simulated", catalog_file, _interactions([[(4, 1), (5, 2)]]))
    settings_ = {"sim": {"nodes-dir": str(tmp_path / "sim")}, **BUILTIN}

    assert load_node({"data-dir": str(tmp_path / "mine"), "partition-id": 0}, settings_).name == "mine"
    assert load_node({"partition-id": 0}, settings_).name == "simulated"


def test_without_prepared_data_a_node_builds_its_silo_of_the_builtin_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    first, second = load_node({"partition-id": 0}, BUILTIN), load_node({"partition-id": 1}, BUILTIN)

    assert first.directory is None and first.name != second.name
    assert set(first.catalog.department[first.interactions.item - 1]) == {first.name}  # a department silo
    # no data directory of its own: its private state goes under the working directory
    assert first.state_dir.resolve() == (tmp_path / ".fedmart-node" / first.name / ".fedmart").resolve()
    assert first.state_dir.is_dir()


def test_a_partition_id_beyond_the_builtin_silos_is_refused_with_the_fix():
    with pytest.raises(DataError, match=r"partition-id 3 is out of range.*num-supernodes=3"):
        load_node({"partition-id": 3}, BUILTIN)


def test_a_nodes_private_state_lives_in_its_own_data_directory(catalog_file, tmp_path):
    write_node_dir(tmp_path / "d", "d", catalog_file, _interactions([[(1, 1), (2, 2)]]))

    node = load_node({"data-dir": str(tmp_path / "d")}, {})

    assert node.state_dir == tmp_path / "d" / ".fedmart" and node.state_dir.is_dir()


def test_a_node_is_loaded_once_per_process(catalog_file, tmp_path):
    write_node_dir(tmp_path / "d", "d", catalog_file, _interactions([[(1, 1), (2, 2)]]))

    assert load_node({"data-dir": str(tmp_path / "d")}, {}) is load_node({"data-dir": str(tmp_path / "d")}, {})


# --- a deployed node validates its own file -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_clean_export_is_validated_and_loaded(raw_node, fmt):
    d = raw_node(GOOD_ROWS, fmt=fmt)

    node = load_node({"data-dir": str(d)}, {})

    assert node.name == "dept" and len(node.interactions) == len(GOOD_ROWS)
    assert node.report["rows_quarantined"] == 0
    assert json.loads((d / ".fedmart" / "validation" / "report.json").read_text())["rows_clean"] == len(GOOD_ROWS)


def test_a_node_refuses_to_take_part_when_a_row_fails_and_no_bad_row_is_allowed(raw_node):
    d = raw_node([*GOOD_ROWS, BAD_ROW])

    with pytest.raises(NodeRefused) as refused:
        load_node({"data-dir": str(d)}, {})

    message = str(refused.value)
    assert "1 of 11 rows quarantined" in message and "unknown_item=1" in message
    assert "more than --max-quarantine-fraction 0 allows" in message  # the flag that changes it
    assert str(d / ".fedmart" / "validation" / "report.json") in message
    assert (d / ".fedmart" / "validation" / "report.json").is_file()
    assert isinstance(refused.value, DataError)  # commands that report data errors report this one too


@pytest.mark.parametrize("allowed", [1 / 11, 0.5])
def test_within_its_quarantine_allowance_a_node_trains_on_the_clean_rows_only(raw_node, allowed):
    d = raw_node([*GOOD_ROWS, BAD_ROW])

    node = load_node({"data-dir": str(d), "max-quarantine-fraction": allowed}, {})

    assert len(node.interactions) == len(GOOD_ROWS) and node.report["rows_quarantined"] == 1


def test_a_node_with_no_clean_row_refuses_whatever_its_allowance(raw_node):
    d = raw_node([("ann", "i1", 1), ("ann", "i2", 2)])  # too short a history: nothing to train on

    with pytest.raises(NodeRefused, match=r"no row to train on \(2 rows: 0 quarantined, 2 in histories shorter"):
        load_node({"data-dir": str(d), "max-quarantine-fraction": 1.0}, {})


def test_users_with_short_histories_never_stop_a_node_from_joining(raw_node):
    short = [(f"new{k}", "i1", 5) for k in range(8)] + [("two", "i2", 1), ("two", "i3", 2)]
    d = raw_node([*GOOD_ROWS, *short])  # 10 of 20 rows are users with 1-2 events: the node's nature

    node = load_node({"data-dir": str(d)}, {})  # the default tolerance, 0

    assert len(node.interactions) == len(GOOD_ROWS)  # trained on: as before, the users with 3+ events
    assert (node.report["users_short_history"], node.report["rows_quarantined"]) == (9, 0)


# --- the catalog a node's data was prepared with ------------------------------------------------


def _prepared_dir(tmp_path, catalog, rows) -> Path:
    """A data directory as `fedmart data prepare` writes it: relative catalog, its version recorded."""
    d = tmp_path / "prepared"
    catalog.save(d / "catalog.parquet")
    table = pa.table(
        {k: pa.array([str(r[i]) for r in rows]) for i, k in enumerate(("user_id", "item_id", "timestamp"))}
    )
    pq.write_table(table, d / "interactions.parquet")
    meta = {"name": "books", "catalog": "catalog.parquet", "catalog_version": catalog.version}
    (d / "node.json").write_text(json.dumps(meta))
    return d


def _other_catalog(catalog):
    import dataclasses

    return dataclasses.replace(catalog, price=catalog.price + 1.0)


def test_a_prepared_directory_reads_its_own_catalog_relative_to_itself(tiny_catalog, tmp_path, monkeypatch):
    d = _prepared_dir(tmp_path, tiny_catalog, GOOD_ROWS)
    monkeypatch.chdir(tmp_path.parent)  # not where the directory is

    node = load_node({"data-dir": str(d)}, {})

    assert node.name == "books" and node.catalog.version == tiny_catalog.version


def test_a_prepared_directory_refuses_a_catalog_other_than_the_one_it_was_prepared_with(tiny_catalog, tmp_path):
    d = _prepared_dir(tmp_path, tiny_catalog, GOOD_ROWS)
    other = _other_catalog(tiny_catalog).save(tmp_path / "other.parquet")

    with pytest.raises(NodeRefused, match=r"prepared against catalog \w+, but .*other.parquet is catalog") as refused:
        load_node({"data-dir": str(d), "catalog": str(other)}, {})

    assert "fedmart data prepare --catalog" in str(refused.value)


def test_a_node_refuses_a_coordinator_that_trains_on_another_catalog(tiny_catalog, tmp_path):
    node = load_node({"data-dir": str(_prepared_dir(tmp_path, tiny_catalog, GOOD_ROWS))}, {})
    theirs = _other_catalog(tiny_catalog).version

    check_catalog(node, tiny_catalog.version)  # the same catalog: no refusal
    check_catalog(node, None)  # a coordinator that announces none (simulation): no check
    with pytest.raises(NodeRefused) as refused:
        check_catalog(node, theirs)

    message = str(refused.value)
    assert "\n" not in message and tiny_catalog.version in message and theirs in message
    assert "re-run `fedmart data prepare --catalog" in message


def test_a_data_dir_without_an_interactions_file_says_what_to_put_there(tiny_catalog, tmp_path):
    tiny_catalog.save(tmp_path / "empty" / "catalog.parquet")

    with pytest.raises(DataError, match="interactions.parquet or interactions.csv"):
        load_node({"data-dir": str(tmp_path / "empty")}, {})


# --- the leave-one-out split ------------------------------------------------------------------------


def test_the_split_holds_out_each_users_two_latest_events(catalog_file, tmp_path):
    # rows out of time order; u1 has too short a history to be evaluated
    inter = _interactions([[(3, 30), (1, 10), (4, 40), (2, 20)], [(5, 2), (6, 1)]])
    write_node_dir(tmp_path / "d", "d", catalog_file, inter)

    node = load_node({"data-dir": str(tmp_path / "d")}, {})

    assert node.split.test_target.tolist() == [4, 0] and node.split.valid_target.tolist() == [3, 0]
    assert node.split.train.of(0).tolist() == [1, 2] and node.split.train.of(1).tolist() == [6, 5]
    assert len(node.train_dataset(max_len=4)) == 2  # both users have a next-item pair to train on


_users = st.lists(
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 10**6)), min_size=1, max_size=7, unique_by=lambda e: e[1]),
    min_size=1,
    max_size=5,
)
_fresh = itertools.count()


# catalog_file is only read; each example writes a fresh node directory of its own
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(users=_users)
def test_the_split_loses_no_event_and_never_trains_on_a_held_out_one(catalog_file, users):
    d = Path(tempfile.mkdtemp(dir=catalog_file.parent, prefix=f"node{next(_fresh)}-"))
    write_node_dir(d, "n", catalog_file, _interactions(users))

    split = load_node({"data-dir": str(d)}, {}).split

    for u, events in enumerate(users):
        history = [item for item, _ in sorted(events, key=lambda e: e[1])]
        held_out = [split.valid_target[u], split.test_target[u]]
        if len(history) >= 3:
            assert split.train.of(u).tolist() + held_out == history
        else:
            assert split.train.of(u).tolist() == history and held_out == [0, 0]


# --- the dataset's content hash (for the node's own logs; it never leaves the node) ------------------


def _dataset_id(directory: Path, catalog_file: Path, inter: Interactions) -> str:
    write_node_dir(directory, "n", catalog_file, inter)
    return load_node({"data-dir": str(directory)}, {}).dataset_id


def test_the_same_events_are_the_same_dataset_wherever_they_live(catalog_file, tmp_path):
    inter = _interactions([[(1, 10), (2, 20), (3, 30)], [(4, 1), (5, 2)]])

    assert _dataset_id(tmp_path / "a", catalog_file, inter) == _dataset_id(tmp_path / "b", catalog_file, inter)


def test_the_dataset_id_does_not_change_between_versions(catalog_file, tmp_path):
    # Ledgers on the nodes' disks carry this id: a new hash would make every one of them refuse to open.
    inter = _interactions([[(1, 10), (2, 20), (3, 30)], [(4, 1), (5, 2)]])

    assert _dataset_id(tmp_path / "a", catalog_file, inter) == "59e60b260a6952a4"


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param([[(1, 10), (2, 20), (3, 31)], [(4, 1), (5, 2)]], id="a-timestamp"),
        pytest.param([[(1, 10), (2, 20), (6, 30)], [(4, 1), (5, 2)]], id="an-item"),
        pytest.param([[(1, 10), (2, 20), (3, 30)], [(4, 1)]], id="an-event-fewer"),
    ],
)
def test_other_events_are_another_dataset(catalog_file, tmp_path, changed):
    base = _interactions([[(1, 10), (2, 20), (3, 30)], [(4, 1), (5, 2)]])

    assert _dataset_id(tmp_path / "a", catalog_file, base) != _dataset_id(
        tmp_path / "b", catalog_file, _interactions(changed)
    )


def test_other_users_are_another_dataset(catalog_file, tmp_path):
    base = _interactions([[(1, 10), (2, 20), (3, 30)]])
    renamed = _interactions([[(1, 10), (2, 20), (3, 30)]])
    renamed.user_ids = np.array(["someone-else"])

    assert _dataset_id(tmp_path / "a", catalog_file, base) != _dataset_id(tmp_path / "b", catalog_file, renamed)


def test_the_builtin_silo_is_the_same_dataset_on_every_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings_ = json.loads(json.dumps(BUILTIN))  # an equal, not identical, settings tree

    assert load_node({"partition-id": 1}, BUILTIN).dataset_id == load_node({"partition-id": 1}, settings_).dataset_id


# --- the node's population id (its ledger's identity) -----------------------------------------------


def test_the_population_id_is_random_private_and_stable(tmp_path, raw_node):
    d = raw_node(GOOD_ROWS, name="d")
    first = load_node({"data-dir": str(d)}, {})
    pid = first.population_id
    assert len(pid) == 32 and pid == first.population_id  # created once, then read back
    assert pid != first.dataset_id  # not derived from the data
    assert (first.state_dir / "population-id").stat().st_mode & 0o777 == 0o600


# --- the model skeleton -------------------------------------------------------------------------------


@pytest.fixture
def node(catalog_file, tmp_path):
    write_node_dir(tmp_path / "d", "d", catalog_file, _interactions([[(1, 1), (2, 2), (3, 3)]]))
    return load_node({"data-dir": str(tmp_path / "d")}, {})


def test_the_model_skeleton_is_built_once_and_reused_across_rounds(node):
    first = model_skeleton(node, ModelSettings(**TINY_MODEL), 5)

    again = model_skeleton(
        node, ModelSettings(**dict(reversed(list(TINY_MODEL.items())))), 5
    )  # same config, other key order

    assert again is first


def test_a_skeleton_has_the_shape_its_catalog_and_config_ask_for(node):
    five, seven = (
        model_skeleton(node, ModelSettings(**TINY_MODEL), 5),
        model_skeleton(node, ModelSettings(**TINY_MODEL), 7),
    )
    wider = model_skeleton(node, ModelSettings(**{**TINY_MODEL, "hidden": 16}), 5)

    assert five is not seven and five is not wider
    vocabulary = node.catalog.num_items + 1  # row 0 is padding
    assert five.state_dict()["item_emb.weight"].shape == (vocabulary, 8)
    assert wider.state_dict()["item_emb.weight"].shape == (vocabulary, 16)
    assert five.config.max_len == 5 and seven.config.max_len == 7


@pytest.mark.parametrize("announced", ["same", "other"])
def test_the_nodes_app_answers_hello_only_on_the_coordinators_catalog(tiny_catalog, tmp_path, flower_task, announced):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from clients.app import build_client_app
    from conf.settings import SimSettings
    from federation import wire
    from federation.runconfig import flatten

    d = _prepared_dir(tmp_path, tiny_catalog, GOOD_ROWS)
    version = tiny_catalog.version if announced == "same" else _other_catalog(tiny_catalog).version
    run_config = flatten(RunSettings().with_sim(SimSettings(catalog_version=version)).to_dict())
    app = build_client_app(fixed_run_config=run_config)
    hello = Message(RecordDict({wire.CONFIG: ConfigRecord({"q": "hello"})}), dst_node_id=7, message_type="query.hello")
    context = Context(run_id=1, node_id=7, node_config={"data-dir": str(d)}, state=RecordDict(), run_config={})

    reply = app(hello, context)

    if announced == "same":
        assert not reply.has_error() and reply.content["node"]["catalog-version"] == version
    else:
        assert reply.has_error() and reply.error.code == wire.ERR_BAD_DATA
        assert "catalog mismatch" in reply.error.reason and version in reply.error.reason
