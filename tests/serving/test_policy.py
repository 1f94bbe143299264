"""What a promoted version must meet before it is served (serving/policy.py): --require and the promotion counter."""

from __future__ import annotations

import json

import pytest

from serving.policy import HighWater, Requirements, default_state_path

DP = {"privacy": {"mode": "target", "secagg": {"enabled": True}, "epsilon_max": 3.0}}
PLAIN = {"privacy": {"mode": "off", "secagg": {"enabled": False}, "epsilon_max": None}}


@pytest.mark.parametrize(
    ("terms", "expected"),
    [
        ([], Requirements()),
        (["dp"], Requirements(dp=True)),
        (["dp,secagg", "epsilon<=8"], Requirements(dp=True, secagg=True, max_epsilon=8.0)),
        (["ε < 2.5"], Requirements(max_epsilon=2.5, strict=True)),
        (["epsilon<=8", "eps<=4"], Requirements(max_epsilon=4.0)),  # the tighter bound wins
    ],
)
def test_require_terms_parse(terms, expected):
    assert Requirements.parse(terms) == expected


@pytest.mark.parametrize("bad", ["dpp", "epsilon>=1", "epsilon<=", "k-anonymity"])
def test_an_unknown_require_term_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match="--require"):
        Requirements.parse([bad])


def test_a_dp_version_with_secagg_meets_everything_it_records():
    assert Requirements.parse(["dp", "secagg", "epsilon<=3"]).unmet(DP) is None


@pytest.mark.parametrize(
    ("terms", "metadata", "reason"),
    [
        (["dp"], PLAIN, "privacy mode 'off'"),
        (["secagg"], PLAIN, "secure aggregation"),
        (["epsilon<=8"], PLAIN, "records no ε"),
        (["epsilon<=2"], DP, "records ε 3"),
        (["epsilon<3"], DP, "records ε 3"),
        (["dp"], {}, "privacy mode None"),  # a version from before the privacy metadata
        (["epsilon<=8"], {"privacy": {"epsilon_max": "inf"}}, "records ε inf"),
    ],
)
def test_unmet_requirements_say_which_and_what_the_metadata_records(terms, metadata, reason):
    why = Requirements.parse(terms).unmet(metadata)
    assert why is not None and why.startswith(f"--require {terms[0].split('<')[0]}") and reason in why


def test_high_water_refuses_a_lower_or_rewritten_counter_and_persists(tmp_path):
    state = tmp_path / "state" / "serve.json"
    hw = HighWater(state, "key1")
    assert hw.refusal(1, "v1") is None
    hw.advance(2, "v2")

    again = HighWater(state, "key1")

    assert (again.counter, again.version) == (2, "v2")
    assert "rolled back" in again.refusal(1, "v1")
    assert "rewritten" in again.refusal(2, "v9")
    assert again.refusal(2, "v2") is None and again.refusal(3, "v1") is None
    assert json.loads(state.read_text()) == {"key_id": "key1", "counter": 2, "version": "v2"}


def test_high_water_of_another_key_is_ignored_and_a_broken_file_is_an_error(tmp_path):
    state = tmp_path / "serve.json"
    HighWater(state, "old-key").advance(5, "v5")
    assert HighWater(state, "new-key").counter == 0

    state.write_text("{not json")
    with pytest.raises(ValueError, match="not a fedmart serve state file"):
        HighWater(state, "new-key")


def test_the_default_state_lives_outside_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    registry = tmp_path / "outputs" / "run" / "registry"

    path = default_state_path(registry)

    assert path.parent == tmp_path / "state" / "fedmart" and registry not in path.parents
    assert default_state_path(registry) == path != default_state_path(tmp_path / "other" / "registry")
