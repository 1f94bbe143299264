"""The run's trail (federation/trail.py): the audit log signed with the coordinator's key, the signed
privacy metadata ``fedmart serve --require`` reads, and no signing key created where none may be."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conf.settings import PrivacySettings, RegistrySettings, Settings
from federation.coordinator import RoundRecord
from federation.outputs import to_arrays
from federation.server import privacy_summary
from federation.trail import AuditRecorder, RegistryPublisher, open_trail
from privacy.audit import AuditLog, verify_audit
from privacy.secagg.config import SecAggConfig
from privacy.signing import KeyFileError, load_or_create_keypair, load_public_key


def _settings(tmp_path, *, create_key: bool = False, mode: str = "target", secagg: bool = True) -> Settings:
    return dataclasses.replace(
        Settings(),
        registry=RegistrySettings(signing_key=str(tmp_path / "keys" / "coordinator.key"), create_key=create_key),
        privacy=dataclasses.replace(PrivacySettings(), mode=mode),
        secagg=SecAggConfig(enabled=secagg),
    )


def _run(tmp_path, settings: Settings, eps_by_round: list[dict[str, float]]) -> tuple[AuditLog, list[str]]:
    """What run_server does around the rounds, with fabricated round records."""
    registry, audit = open_trail(tmp_path / "run", settings)
    publisher = RegistryPublisher(
        registry,
        run="run",
        config_hash="cfg",
        catalog_version="cat",
        model_config={},
        privacy=privacy_summary(settings),
        audit=audit,
    )
    recorder = AuditRecorder(audit, "run")
    audit.append("run_start", run="run")
    for r, eps in enumerate(eps_by_round, start=1):
        recorder.on_round_start(r)
        record = RoundRecord(round=r, replied=sorted(eps), aggregated=True)
        record.node_metrics = {n: {"epsilon": e} for n, e in eps.items()}
        arrays = to_arrays({"w": np.full(3, float(r), dtype=np.float32)})
        publisher.on_round_end(record, arrays, None)
        recorder.on_round_end(record, arrays, None)
    audit.append("run_end", run="run")
    return audit, registry.versions()


@pytest.fixture
def key(tmp_path):
    return load_or_create_keypair(tmp_path / "keys" / "coordinator.key")


def test_the_run_audit_log_verifies_with_the_coordinators_public_key(tmp_path, key):
    audit, _ = _run(tmp_path, _settings(tmp_path), [{"a": 1.0}, {"a": 2.0}])
    public = load_public_key(tmp_path / "keys" / "coordinator.key.pub")

    result = verify_audit(audit.path, public_key=public)

    assert result.ok and result.entries == 6, result.reason  # run_start, 2 x (round_start, round_end), run_end
    assert all("sig" in json.loads(line) for line in audit.path.read_text().splitlines())


@pytest.mark.parametrize("forgery", ["unsigned entry", "other key", "rewritten chain"])
def test_a_forged_audit_entry_fails_verification(tmp_path, key, forgery):
    audit, _ = _run(tmp_path, _settings(tmp_path), [{"a": 1.0}])
    public = load_public_key(tmp_path / "keys" / "coordinator.key.pub")
    path = audit.path
    lines = path.read_text().splitlines()
    if forgery == "unsigned entry":  # appended with a valid hash chain, but no key
        AuditLog(path).append("promotion", version="v0001-r1-deadbeef", by="mallory")
        bad = len(lines) + 1
    elif forgery == "other key":
        other, _ = load_or_create_keypair(tmp_path / "other.key")
        AuditLog(path, private_key=other).append("promotion", version="v0001-r1-deadbeef", by="mallory")
        bad = len(lines) + 1
    else:  # edit round 1's ε and recompute every hash after it, keeping the old signatures
        path.write_text("")
        forged = AuditLog(path)
        for line in lines:
            entry = json.loads(line)
            for k in ("seq", "ts", "prev", "hash", "sig"):
                entry.pop(k)
            if entry["event"] == "round_end":
                entry["epsilon_by_node"] = {"a": 0.1}
            forged.append(entry.pop("event"), **entry)
        bad = 1

    assert verify_audit(path).ok, "the bare hash chain cannot tell: only the signature can"
    result = verify_audit(path, public_key=public)
    assert not result.ok and result.bad_line == bad and "signature" in result.reason


def test_signed_metadata_records_dp_mode_secagg_and_the_running_max_epsilon(tmp_path, key):
    _, versions = _run(tmp_path, _settings(tmp_path), [{"a": 1.0, "b": 3.0}, {"a": 2.5}])
    registry, _ = open_trail(tmp_path / "run", _settings(tmp_path))

    privacy = [registry.load(v)[1]["privacy"] for v in versions]

    assert [p["mode"] for p in privacy] == ["target", "target"]
    assert all(p["secagg"]["enabled"] is True for p in privacy)
    assert [p["epsilon_by_node"] for p in privacy] == [{"a": 1.0, "b": 3.0}, {"a": 2.5}]
    assert [p["epsilon_max"] for p in privacy] == [3.0, 3.0], "b's round-1 update is still in round 2's model"


def test_without_dp_the_metadata_says_so(tmp_path, key):
    _, versions = _run(tmp_path, _settings(tmp_path, mode="off", secagg=False), [{}])
    registry, _ = open_trail(tmp_path / "run", _settings(tmp_path))

    privacy = registry.load(versions[0])[1]["privacy"]

    assert privacy["mode"] == "off" and privacy["secagg"]["enabled"] is False and privacy["epsilon_max"] is None


def test_a_missing_key_stops_the_trail_unless_it_may_be_created(tmp_path):
    with pytest.raises(KeyFileError, match="private key not found"):
        open_trail(tmp_path / "run", _settings(tmp_path, create_key=False))
    assert not (tmp_path / "keys").exists() and not (tmp_path / "run").exists()

    registry, audit = open_trail(tmp_path / "run", _settings(tmp_path, create_key=True))  # simulation
    assert (tmp_path / "keys" / "coordinator.key").is_file() and registry.signing_key is not None
