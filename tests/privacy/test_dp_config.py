"""DPConfig (privacy/dp_config.py): validation that names the constraint, and the Hydra privacy group."""

from __future__ import annotations

import pytest

from privacy.dp_config import DEFAULT_GRAD_SAMPLE_MODE, DPConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "on"}, "mode must be one of"),
        ({"mode": "dp", "noise_multiplier": 0.0}, "noise_multiplier must be > 0"),
        ({"mode": "dp", "max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
        ({"mode": "dp", "delta": 1.0}, "delta must be in"),
        ({"mode": "target"}, "needs target_epsilon > 0"),
        ({"mode": "target", "target_epsilon": -2.0}, "needs target_epsilon > 0"),
        ({"mode": "dp", "target_epsilon": 3.0}, "only used with mode='target'"),
        ({"mode": "dp", "accountant": "gdp"}, "accountant must be one of"),
        ({"mode": "dp", "grad_sample_mode": "ew"}, "grad_sample_mode must be one of"),
    ],
)
def test_config_rejects_bad_values_naming_the_constraint(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPConfig(**kwargs)


def test_config_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        DPConfig("dp")  # type: ignore[misc]
    cfg = DPConfig(mode="dp")
    with pytest.raises(AttributeError):
        cfg.noise_multiplier = 2.0  # type: ignore[misc]
    assert cfg.grad_sample_mode == DEFAULT_GRAD_SAMPLE_MODE
    assert cfg.resolve_delta(200) == pytest.approx(1 / 200)


def test_config_reads_the_hydra_privacy_group():
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[2] / "conf" / "privacy"
    dp = yaml.safe_load((conf / "dp.yaml").read_text())
    cfg = DPConfig.from_mapping(dp)
    assert (cfg.mode, cfg.noise_multiplier, cfg.accountant) == ("dp", 1.0, "rdp")
    target = {
        **dp,
        **{k: v for k, v in yaml.safe_load((conf / "dp_target.yaml").read_text()).items() if k != "defaults"},
    }
    assert DPConfig.from_mapping(target).target_epsilon == 8.0
    assert not DPConfig.from_mapping(yaml.safe_load((conf / "none.yaml").read_text())).is_private
    with pytest.raises(ValueError, match="unknown privacy settings"):
        DPConfig.from_mapping({**dp, "noise": 2.0})
