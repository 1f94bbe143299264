"""Deployment pieces that need no running Flower: the run-config table Flower checks keys
against, the staged app, the process command lines, the node-side update guard, the
test-only faults, and the coordinator's triage of refused, vanished and slow nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomli
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from clients.guard import fault_mod, parse_fault, update_guard_mod
from federation import wire
from federation.coordinator import Coordinator, RoundRecord
from federation.runconfig import flatten
from fedmart.coordinate import record_catalog, round_line, round_lines, superlink_argv
from fedmart.node_cmd import explain_supernode_exit, node_config_toml, supernode_argv
from fedmart.staging import app_config_defaults, app_packages, compose_config, stage_app, sync_pyproject

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def defaults() -> dict:
    return app_config_defaults()


def test_pyproject_run_config_table_is_in_sync_with_conf():
    assert not sync_pyproject(ROOT / "pyproject.toml", check=True), (
        "[tool.flwr.app.config] is stale: run `python -m fedmart.staging sync-pyproject`"
    )


def test_every_option_of_every_group_has_its_keys_in_the_table(defaults):
    table = tomli.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(defaults)
    for override in ("federation=fedadam", "privacy=dp_target", "data=movielens", "partition=dirichlet"):
        request = {k: v for k, v in compose_config([override]).items() if k != "node"}
        assert set(flatten(request)) <= set(table), override
    assert not [k for k in table if k.startswith("node.")], "a node's policy is never part of the run config"
    assert {"sim.run_dir", "sim.catalog", "sim.num_nodes", "sim.nodes_dir", "sim.central_data"} <= set(table)
    assert table["federation.num_rounds"] == compose_config()["federation"]["num_rounds"]


def test_staged_app_is_a_valid_flower_app(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    run_config = {"federation.num_rounds": 2, "sim.run-dir": "/x"}
    app = stage_app(tmp_path / "app", run_config)
    config, _ = load_and_validate(app / "pyproject.toml", check_module=False)
    assert config["tool"]["flwr"]["app"]["config"] == run_config
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "clients.app:app"
    assert "federations" not in config["tool"]["flwr"]  # flwr run would rewrite the file otherwise
    for f in ("federation/app.py", "clients/app.py", "privacy/secagg/mod.py", "conf/config.yaml"):
        assert (app / f).is_file(), f
    assert {p.name for p in app.iterdir() if p.is_dir()} == set(app_packages())


def test_staged_packages_are_those_the_wheel_ships():
    """One list: what `fedmart coordinate` stages is what pyproject's package discovery puts in the wheel."""
    from setuptools import find_packages

    find = tomli.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = find_packages(str(ROOT), include=find["include"], exclude=find["exclude"])
    assert set(app_packages()) == {p.split(".")[0] for p in shipped}
    assert {"federation", "clients", "privacy", "conf", "fedmart"} <= set(app_packages())
    assert "privacy.secagg" in shipped and not any(p.startswith(("tests", "bench")) for p in shipped)


def test_node_config_file_is_what_flower_parses(tmp_path):
    from flwr.common.config import parse_config_args

    path = tmp_path / "node-config.toml"
    path.write_text(node_config_toml({"data-dir": "/d ir/x", "max-epsilon": 4.0, "catalog": None, "fault": ""}))
    assert parse_config_args([str(path)]) == {"data-dir": "/d ir/x", "max-epsilon": 4.0}


def test_process_command_lines_turn_tls_and_node_auth_on(tmp_path):
    link = superlink_argv(certs=tmp_path, host="127.0.0.1", port=9, database=tmp_path / "db", isolation="subprocess")
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--database"):
        assert flag in link
    assert "--insecure" not in link
    node = supernode_argv(
        superlink="127.0.0.1:9",
        root_cert=tmp_path / "ca.pem",
        auth_key=tmp_path / "n.key",
        node_config=tmp_path / "c.toml",
        isolation="process",
        runtime_port=5,
    )
    assert "--root-certificates" in node and "--auth-supernode-private-key" in node and "--insecure" not in node


def test_supernode_exit_explanations():
    refused = "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
    assert "not registered" in explain_supernode_exit(refused, pub="books.pub", superlink="h:1")
    assert "books.pub" in explain_supernode_exit(refused, pub="books.pub", superlink="h:1")
    other = explain_supernode_exit("boom\nException: bad thing", pub="p", superlink="h:1")
    assert "bad thing" in other and "\n" not in other


def test_round_line_names_dropouts_and_rejections():
    row = {
        "round": 3,
        "sampled": ["a", "b", "c"],
        "replied": ["a"],
        "timed_out": ["c"],
        "rejected": {"b": "NaN"},
        "train_metrics": {"train_loss": 1.5},
        "node_metrics": {"a": {"epsilon": 2.5}},
        "seconds": {"total": 4.0},
    }
    line = round_line(row)
    assert "1/3 replied" in line and "dropped: c" in line and "rejected: b" in line and "ε≤2.50" in line
    assert "joined" not in line
    assert "joined (registered during the run): d" in round_line(row | {"joined": ["d"], "sampled": list("abcd")})
    assert round_lines(row) == [line]  # no secure aggregation in that round


def test_a_deployment_records_its_catalog_for_serve_and_resume_keeps_it(tmp_path):
    from federation.catalog import Catalog, CatalogError
    from fedmart.errors import UserError

    def catalog(titles):
        n = len(titles)
        return Catalog(
            item_id=np.array([f"i{k}" for k in range(n)]), title=np.array(titles), department=np.array(["d"] * n),
            merchant=np.array(["m"] * n), price=np.ones(n),
        )  # fmt: skip

    platform = catalog(["a", "b", "c"]).save(tmp_path / "platform" / "catalog.parquet")
    run = tmp_path / "outputs" / "dep"
    kept = record_catalog(platform, run)
    assert kept == run / "catalog.parquet" and Catalog.load(kept).version == Catalog.load(platform).version
    assert record_catalog(platform, run) == kept  # resumed with the same catalog
    catalog(["a", "b", "c", "d"]).save(platform)  # the platform's file changed under a run in progress
    with pytest.raises(UserError, match="resume with the run's own catalog"):
        record_catalog(platform, run)
    with pytest.raises(CatalogError, match="catalog file not found; pass deploy.catalog=PATH"):
        record_catalog(tmp_path / "nowhere.parquet", tmp_path / "outputs" / "other")


def test_a_deployment_prints_the_secure_round_line_as_simulation_logs_it():
    from privacy.secagg.round_state import RoundReport

    report = RoundReport(2, sampled=3, shared=3, masked=2, asked=2, unmasked=2, threshold=2, pipelined=True)
    row = {"round": 2, "sampled": ["a", "b", "c"], "replied": ["a", "b"], "timed_out": ["c"],
           "secure_aggregation": report.to_json()}  # fmt: skip
    lines = round_lines(row)
    assert lines == [report.summary(), round_line(row)]
    assert lines[0].startswith("secure aggregation: round 2, 3 sampled, 2 masked, 1 dropped after sharing keys")


# --- node-side guard and test-only faults -----------------------------------------------------


def _train_msg(node_id: int = 7) -> Message:
    arrays = ArrayRecord({"w": Array(np.zeros((3, 2), np.float32)), "b": Array(np.zeros(2, np.float32))})
    content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(content, dst_node_id=node_id, message_type="train")


def _handler(msg: Message, ctxt: Context) -> Message:
    new = ArrayRecord({k: Array(v.numpy() + 0.5) for k, v in msg.content[wire.ARRAYS].items()})
    return Message(RecordDict({wire.ARRAYS: new}), reply_to=msg)


def _ctx(**node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _chain(msg: Message, ctxt: Context) -> Message:
    return update_guard_mod(msg, ctxt, lambda m, c: fault_mod(m, c, _handler))


def test_guard_passes_a_good_update_untouched():
    out = _chain(_train_msg(), _ctx())
    assert not out.has_error() and float(out.content[wire.ARRAYS]["w"].numpy()[0, 0]) == 0.5


@pytest.mark.parametrize("fault", ["nan-update", "inf-update", "bad-shape"])
def test_guard_refuses_a_malformed_update_before_it_leaves_the_node(fault):
    out = _chain(_train_msg(), _ctx(fault=fault))
    assert out.has_error() and out.error.code == wire.ERR_BAD_UPDATE
    assert "refused by the node" in out.error.reason


def test_guard_ignores_other_messages():
    msg = Message(RecordDict({wire.CONFIG: ConfigRecord({"q": "hello"})}), dst_node_id=7, message_type="query.hello")
    seen = []
    update_guard_mod(msg, _ctx(fault="nan-update"), lambda m, c: seen.append(m) or Message(RecordDict(), reply_to=m))
    assert seen == [msg]


def test_parse_fault():
    assert parse_fault("slow:2.5") == ("slow", 2.5)
    assert parse_fault("nan-update") == ("nan-update", 0.0)
    for bad in ("slow", "slow:x", "explode"):
        with pytest.raises(ValueError):
            parse_fault(bad)


# --- coordinator triage -----------------------------------------------------------------------


class _Grid:
    """Answers a round's train messages as each node's behaviour says; nothing else."""

    def __init__(self, behaviour: dict[int, str]) -> None:
        self.behaviour = behaviour

    def get_node_ids(self):
        return list(self.behaviour)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            node, how = m.metadata.dst_node_id, self.behaviour[m.metadata.dst_node_id]
            if how == "ok":
                out.append(_handler(m, _ctx()))
            elif how == "nan":
                out.append(_chain(m, _ctx(fault="nan-update")))
            elif how == "gone":  # Flower's own reply for a node that went offline
                out.append(Message(Error(code=5, reason="node unavailable"), reply_to=m))
            elif how == "crash":
                out.append(Message(Error(code=2, reason="<class 'RuntimeError'>:<'boom'>"), reply_to=m))
            # "slow": no reply before the timeout
            assert node
        return out


def test_triage_sorts_refused_vanished_slow_and_crashed_nodes():
    from federation.coordinator import NodeInfo

    behaviour = {1: "ok", 2: "ok", 3: "nan", 4: "gone", 5: "slow", 6: "crash"}
    names = {1: "a", 2: "b", 3: "nan", 4: "gone", 5: "slow", 6: "crash"}
    nodes = {i: NodeInfo(i, n) for i, n in names.items()}
    strategy = FedAvg(min_train_nodes=2, min_available_nodes=2, min_evaluate_nodes=2)
    coord = Coordinator(strategy=strategy, grid=_Grid(behaviour), nodes=nodes, num_rounds=1, round_timeout=1, seed=0)
    arrays = _train_msg().content[wire.ARRAYS]
    config = ConfigRecord({wire.SERVER_ROUND: 1})
    messages = list(strategy.configure_train(1, arrays, config, coord.grid))
    record = RoundRecord(round=1)
    valid = coord._triage(record, messages, coord.grid.send_and_receive(messages), arrays)
    assert sorted(record.replied) == ["a", "b"] and len(valid) == 2
    assert set(record.rejected) == {"nan"} and "non-finite" in record.rejected["nan"]
    assert sorted(record.timed_out) == ["gone", "slow"], "a vanished node and a straggler are dropouts"
    assert set(record.failed) == {"crash"}


def test_two_nodes_that_give_the_same_name_are_told_apart_by_their_node_ids(caplog):
    from federation.coordinator import NodeInfo, _distinct_names

    nodes = {11: NodeInfo(11, "books"), 12: NodeInfo(12, "books"), 13: NodeInfo(13, "toys")}
    named = _distinct_names(nodes)
    assert sorted(n.name for n in named.values()) == ["books@11", "books@12", "toys"]
    assert "2 nodes call themselves books" in caplog.text


def test_the_start_up_line_never_tells_nodes_to_dial_a_wildcard_address():
    from fedmart.coordinate import Deployment

    def dep(host: str) -> Deployment:
        return Deployment(**{**_deployment_fields(), "host": host})

    assert dep("10.0.0.5").dial_hint == "https://10.0.0.5:9092"
    wild = dep("0.0.0.0").dial_hint
    assert "0.0.0.0" not in wild and ":9092" in wild and "fedmart certs --hosts" in wild


def _deployment_fields() -> dict:
    from conf.deploy_settings import DeploySettings
    from fedmart.coordinate import Deployment

    d = Deployment.from_settings(DeploySettings())
    return {f: getattr(d, f) for f in d.__dataclass_fields__}
