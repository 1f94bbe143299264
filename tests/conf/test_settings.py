"""The typed settings tree (conf/settings.py) against the YAML files of conf/."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

import conf
from conf.deploy_settings import CoordinateSettings, DeploySettings
from conf.settings import (
    CentralSettings,
    NodeSettings,
    RunSettings,
    Settings,
    SimulateSettings,
)
from conf.typed import SettingsError, build
from federation.runconfig import flatten, unflatten

CONF = Path(conf.__file__).parent
GROUPS = ("data", "partition", "model", "train", "federation", "privacy", "secagg", "node")

# Every value an option file sets that differs from the dataclass default, and why. The
# default composition (config.yaml's defaults list) must differ in nothing.
NAMED = {
    "data/movielens.yaml": {
        "source": "the option itself",
        "path": "where `fedmart data fetch` extracts it",
        "fetch": "extract MovieLens from the recbole wheel on first use",
        "max_len": "ML-100K histories are long (median ~60 events)",
    },
    "data/files.yaml": {
        "source": "the option itself",
        "path": "required (???)",
        "catalog": "required (???)",
        "max_len": "a department's own histories may be long",
    },
    "partition/merchant.yaml": {"scheme": "the option itself"},
    "partition/dirichlet.yaml": {"scheme": "the option itself", "num_partitions": "needs a node count"},
    "partition/iid.yaml": {"scheme": "the option itself", "num_partitions": "needs a node count"},
    "federation/fedadam.yaml": {"strategy": "the option itself"},
    "privacy/dp.yaml": {"mode": "the option itself", "noise_multiplier": "σ = 1", "target_epsilon": "unused"},
    "privacy/none.yaml": {"mode": "the option itself", "target_epsilon": "unused"},
    "train/default.yaml": {"lr": "the centralized baseline's", "batch_size": "small batches without DP"},
    "node/open.yaml": {
        "require_dp": "non-private baselines only",
        "require_secagg": "unmasked baselines only",
        "evaluation": "exact metrics for research",
    },
    "secagg/off.yaml": {"enabled": "the option itself"},
    "model/sasrec_text.yaml": {"name": "the option itself", "id_dropout": "the tower trains text alone (cold start)"},
}
DEFAULT_OPTIONS = {f"{g}/{o}.yaml" for g, o in [
    ("data", "synthetic"), ("partition", "department"), ("model", "sasrec"), ("train", "federated"),
    ("federation", "fedavg"), ("privacy", "dp_target"), ("secagg", "on"), ("node", "default"),
]}  # fmt: skip


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _default(cls: type, dotted: str) -> Any:
    obj: Any = cls()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _raw(path: Path) -> dict[str, Any]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: v for k, v in data.items() if k not in ("defaults", "hydra")}


def _differences(path: Path, cls: type, prefix: str) -> dict[str, Any]:
    diffs = {}
    for key, value in _leaves(_raw(path)).items():
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation (the run seed): resolved at composition
        default = _default(cls, f"{prefix}{key}")
        if value != default or type(value) is bool is not type(default):
            diffs[key] = value
    return diffs


@pytest.mark.parametrize("path", sorted(p.relative_to(CONF).as_posix() for g in GROUPS for p in (CONF / g).glob("*")))
def test_every_group_value_equals_the_dataclass_default_or_is_named(path):
    group = path.split("/")[0]
    diffs = _differences(CONF / path, SimulateSettings, f"{group}.")
    named = NAMED.get(path, {})
    assert set(diffs) == set(named), f"{path}: differs from conf/settings.py in {sorted(diffs)}, named {sorted(named)}"
    if path in DEFAULT_OPTIONS:
        assert not diffs


@pytest.mark.parametrize(
    ("path", "cls", "prefix"),
    [
        ("config.yaml", SimulateSettings, ""),
        ("central.yaml", CentralSettings, ""),
        ("coordinate.yaml", DeploySettings, ""),
    ],
)
def test_top_level_files_set_only_dataclass_defaults(path, cls, prefix):
    raw = _raw(CONF / path)
    if cls is DeploySettings:
        raw = raw["deploy"]
    diffs = {k: v for k, v in _leaves(raw).items() if not str(v).startswith("${") and v != _default(cls, k)}
    assert diffs == {}


def test_the_default_composition_is_the_dataclass_defaults(compose):
    assert SimulateSettings.from_dict(compose()) == SimulateSettings()
    assert CoordinateSettings.from_dict(compose(config_name="coordinate")) == CoordinateSettings()


def test_every_option_and_experiment_composes_into_the_typed_tree(compose):
    for group in (*GROUPS, "experiment"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            if group == "experiment" and option == "ml100k":
                CentralSettings.from_dict(compose([f"experiment={option}"], config_name="central"))
                continue
            SimulateSettings.from_dict(compose([f"{group}={option}"]))


def test_hydra_refuses_an_unknown_key_or_a_wrong_type_at_composition(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["federation.num_roundz=3"])
    with pytest.raises(ConfigCompositionException):
        compose(["federation.num_rounds=many"])


def test_the_run_config_round_trips_through_flowers_flat_form():
    settings = RunSettings.from_dict({"federation": {"num_rounds": 3}, "sim": {"run-dir": "/x", "num-nodes": 4}})
    assert RunSettings.from_dict(unflatten(flatten(settings.to_dict()))) == settings
    assert settings.sim.run_dir == "/x" and settings.sim.num_nodes == 4


def test_a_partial_group_keeps_the_trees_defaults_and_secure_aggregation_stays_on():
    # Settings() has secure aggregation on; a mapping that sets one other secagg key (a test,
    # a script, a partial run config) must not switch the rest of the group to other defaults.
    settings = Settings.from_dict({"secagg": {"timeout": 30.0}})

    assert settings.secagg == dataclasses.replace(Settings().secagg, timeout=30.0)
    assert settings.secagg.enabled


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"federation": {"strategy": "fedprox"}}, "federation.strategy"),
        ({"federation": {"item_rows": "all"}}, "federation.item_rows"),
        ({"federation": {"num_rounds": "3"}}, "federation.num_rounds must be an integer"),
        ({"federation": {"colour": 1}}, "unknown setting 'federation.colour'"),
        ({"privacy": {"mode": "on"}}, "privacy.mode"),
        ({"model": {"hidden": 10, "heads": 3}}, "model.hidden"),
        ({"data": {"source": "s3"}}, "data.source"),
        ({"partition": {"scheme": "iid"}}, "num_partitions"),
        ({"secagg": {"threshold": True}}, "secagg.threshold"),
        ({"device": "tpu"}, "device"),
        ({"train": {"batch_size": True}}, "train.batch_size must be an integer"),
        ({"model": {"name": "bert4rec"}}, "model.name"),
        ({"model": {"name": "sasrec_text", "text": True}}, "model=sasrec_text always uses text: drop it"),
        ({"model": {"name": "sasrec_text"}, "privacy": {"grad_sample_mode": "ghost"}}, "privacy.grad_sample_mode=bk"),
    ],
)
def test_a_bad_setting_is_refused_with_its_key(values, message):
    with pytest.raises(SettingsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        Settings.from_dict(values)


def test_numbers_coerce_only_where_lossless():
    s = Settings.from_dict({"federation": {"round_timeout": 60, "num_rounds": 3.0}})
    assert s.federation.round_timeout == 60.0 and isinstance(s.federation.num_rounds, int)


def test_node_settings_come_from_dashed_node_config_and_ignore_flowers_own_keys():
    node = NodeSettings.from_node_config(
        {"partition-id": 2, "num-partitions": 10, "data-dir": "/d", "max-epsilon": 8.0, "flower-specific": 1}
    )
    assert (node.partition_id, node.data_dir, node.max_epsilon) == (2, "/d", 8.0)
    assert NodeSettings.from_node_config({"max-epsilon": "inf"}).max_epsilon is None


def test_request_and_node_decisions_are_different_types():
    # The node's own policy, budget and data never travel in the run config.
    run_keys = {f.name for f in dataclasses.fields(RunSettings)}
    assert not run_keys & {"node", "data_dir", "max_quarantine_fraction", "fault", "policy"}
    privacy_keys = {f.name for f in dataclasses.fields(RunSettings().privacy)}
    assert not privacy_keys & {"delta", "max_epsilon", "secure_rng"}  # the node's, not the coordinator's
    with pytest.raises(SettingsError, match="unknown setting 'node'"):
        build(RunSettings, {"node": {"require_dp": False}})
    with pytest.raises(SettingsError, match="unknown setting 'data_dir'"):
        build(RunSettings, {"data_dir": "/elsewhere"})
