"""SecAggConfig validation and the Hydra group conf/secagg/{off,on}.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from privacy.secagg import SecAggConfig

CONF = Path(__file__).resolve().parents[3] / "conf" / "secagg"


@pytest.mark.parametrize("option", ["off", "on"])
def test_yaml_options_build_valid_configs(option: str) -> None:
    values = OmegaConf.to_container(OmegaConf.load(CONF / f"{option}.yaml"))

    cfg = SecAggConfig.from_mapping(values)

    assert cfg.enabled is (option == "on")
    assert cfg.encoding.modulus_bits == 32


def test_from_mapping_accepts_hydra_dictconfig() -> None:
    cfg = SecAggConfig.from_mapping(OmegaConf.load(CONF / "on.yaml"))

    assert cfg == SecAggConfig(enabled=True)


def test_both_options_name_the_same_keys() -> None:
    off = set(OmegaConf.load(CONF / "off.yaml"))
    on = set(OmegaConf.load(CONF / "on.yaml"))

    assert off == on == {f for f in SecAggConfig.__dataclass_fields__}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1}, "count must be >= 2"),
        ({"threshold": 0.0}, r"fraction must lie in \(0, 1\]"),
        ({"threshold": 1.5}, r"fraction must lie in \(0, 1\]"),
        ({"threshold": True}, "threshold"),
        ({"threshold": 60}, "exceeds max_nodes"),
        ({"threshold": 6, "neighbours": 4}, "exceeds neighbours"),
        ({"neighbours": 3}, "even"),
        ({"neighbours": -2}, "even"),
        ({"timeout": 0}, "timeout"),
        ({"unmask_spare": -1}, "unmask_spare must be an int >= 0"),
        ({"unmask_spare": 1.5}, "unmask_spare must be an int >= 0"),
        ({"bits": 40}, "bits"),
        ({"clip_range": -1.0}, "clip_range"),
        ({"max_nodes": 10**6, "max_weight": 10**6, "bits": 32}, r"must be < 2\*\*64"),
    ],
)
def test_bad_values_are_refused_with_the_constraint(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SecAggConfig(**kwargs)


def test_from_mapping_rejects_unknown_keys_and_parses_threshold_strings() -> None:
    with pytest.raises(ValueError, match="unknown secagg keys"):
        SecAggConfig.from_mapping({"enabled": True, "treshold": 0.5})
    assert SecAggConfig.from_mapping({"threshold": "3"}).threshold == 3
    assert SecAggConfig.from_mapping({"threshold": "0.75"}).threshold == 0.75
