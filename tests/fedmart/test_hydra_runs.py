"""Resume, shared by `fedmart simulate` and `fedmart coordinate` (fedmart/hydra_runs.py)."""

from __future__ import annotations

import pytest
import yaml

from fedmart.errors import UserError
from fedmart.hydra_runs import load_for_resume


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\nfederation:\n  num_rounds: 2\n  local_epochs: 1\n")
    return tmp_path


def test_key_overrides_go_on_top_of_the_saved_config_and_are_saved(run_dir):
    resolved = load_for_resume(run_dir, [f"resume={run_dir}", "federation.num_rounds=5"], command="simulate")

    assert resolved == {"seed": 0, "federation": {"num_rounds": 5, "local_epochs": 1}}
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == resolved


def test_a_directory_without_config_names_the_command(tmp_path):
    with pytest.raises(UserError, match=r"no config.yaml there; pass the directory of an earlier `fedmart coordinate`"):
        load_for_resume(tmp_path, [], command="coordinate")


@pytest.mark.parametrize("note", ["", ": config groups come from the saved run's config.yaml"])
def test_group_overrides_are_refused_in_one_line(run_dir, note):
    with pytest.raises(UserError) as exc:
        load_for_resume(run_dir, ["privacy=dp"], command="simulate", groups_note=note)

    assert str(exc.value) == f"resume takes key overrides such as federation.num_rounds=N, not 'privacy=dp'{note}"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["federation"]["num_rounds"] == 2
