"""A missing signing key stops ``fedmart coordinate`` in one line (exit code 2) before anything starts; only
simulation (``registry.create_key``, the default of conf/config.yaml) may create one (fedmart/simulate.py)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from conf.deploy_settings import CoordinateSettings
from conf.settings import RegistrySettings, SimulateSettings
from fedmart.errors import UserError
from fedmart.simulate import check_signing_key
from privacy.signing import load_or_create_keypair


def _with_key(settings, path: Path, create: bool):
    return dataclasses.replace(settings, registry=RegistrySettings(signing_key=str(path), create_key=create))


def test_a_deployment_refuses_to_create_its_key_and_simulation_may():
    assert CoordinateSettings().registry.create_key is False
    assert SimulateSettings().registry.create_key is True


def test_a_missing_key_is_a_user_error_and_nothing_is_created(tmp_path):
    key = tmp_path / "keys" / "typo.key"

    with pytest.raises(UserError, match=r"typo.key: private key not found; it is never created here"):
        check_signing_key(_with_key(SimulateSettings(), key, create=False))
    assert not key.parent.exists()


def test_an_existing_key_is_made_absolute_for_the_serverapp(tmp_path, monkeypatch):
    load_or_create_keypair(tmp_path / "keys" / "coordinator.key")
    monkeypatch.chdir(tmp_path)

    settings = check_signing_key(_with_key(SimulateSettings(), Path("keys/coordinator.key"), create=False))

    assert settings.registry.signing_key == str(tmp_path / "keys" / "coordinator.key")


def test_where_the_key_may_be_created_nothing_is_checked(tmp_path):
    settings = _with_key(SimulateSettings(), tmp_path / "k.key", create=True)
    assert check_signing_key(settings) is settings


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("registry.signing_key=keys/typo.key", "keys/typo.key: private key not found; it is never created here"),
        ("registry.create_key=true", "`fedmart coordinate` never creates the signing key"),
    ],
)
def test_fedmart_coordinate_with_a_missing_key_is_one_line_exit_code_2(tmp_path, override, message):
    # No certificates either: the key is checked first, before anything else starts.
    proc = subprocess.run(
        [sys.executable, "-m", "fedmart", "coordinate", override], cwd=tmp_path, capture_output=True, text=True
    )

    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("fedmart: error:") and "\n" not in err and message in err, err
    assert not (tmp_path / "keys").exists()
