"""`fedmart registry ...` and `fedmart audit verify` (fedmart/registry_cmds.py), run through the CLI's main()."""

from __future__ import annotations

import json

import pytest

from fedmart.cli import main
from privacy.audit import AuditLog


def fedmart(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return exc.value.code


@pytest.fixture
def world(tmp_path, support):
    return support.make_world(tmp_path, num_items=40, promote=False)


def _reg(world, *args):
    return ("registry", *args, "--root", str(world.registry_path), "--public-key", str(world.pub))


def test_registry_verify_passes_then_fails_after_one_flipped_byte(world, capsys, support):
    v = world.versions[0]
    assert fedmart(*_reg(world, "verify")) == 0
    assert "ok" in capsys.readouterr().out

    support.flip_byte(world.registry_path / v / "weights.safetensors", 100)

    assert fedmart(*_reg(world, "verify", v)) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "weights.safetensors does not match" in out


def test_registry_verify_fails_after_one_flipped_metadata_byte(world, capsys, support):
    v = world.versions[0]
    support.flip_byte(world.registry_path / v / "metadata.json", 30)

    assert fedmart(*_reg(world, "verify")) == 1
    assert "signature does not verify" in capsys.readouterr().out


def test_registry_options_work_before_the_subcommand_too(world):
    assert fedmart("registry", "--root", str(world.registry_path), "--public-key", str(world.pub), "verify") == 0


def test_promote_records_in_promotions_and_the_audit_log(world, capsys):
    audit = world.registry_path.parent / "audit.jsonl"
    AuditLog(audit).append("run_start", run="test")
    v = world.versions[0]

    assert fedmart(*_reg(world, "promote", v, "--by", "carol", "--signing-key", str(world.key))) == 0

    assert world.registry.promoted()[-1]["by"] == "carol"
    last = json.loads(audit.read_text().splitlines()[-1])
    assert (last["event"], last["version"], last["by"]) == ("promotion", v, "carol")
    assert fedmart("audit", "verify", str(audit)) == 0


def test_promote_refuses_a_tampered_version_with_one_line(world, capsys, support):
    v = world.versions[0]
    support.flip_byte(world.registry_path / v / "weights.safetensors")

    assert fedmart(*_reg(world, "promote", v, "--signing-key", str(world.key))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmart: error: refusing to promote") and "\n" not in err


def test_list_and_show(world, capsys):
    assert fedmart("registry", "list", "--root", str(world.registry_path)) == 0
    assert world.versions[0] in capsys.readouterr().out
    assert fedmart("registry", "show", world.versions[0], "--root", str(world.registry_path)) == 0
    assert json.loads(capsys.readouterr().out)["version"] == world.versions[0]


def test_verify_without_a_public_key_is_a_one_line_error(world, capsys, monkeypatch):
    monkeypatch.delenv("FEDMART_PUBLIC_KEY", raising=False)

    assert fedmart("registry", "verify", "--root", str(world.registry_path)) == 2
    assert "--public-key" in capsys.readouterr().err


def test_show_of_an_unknown_version_is_a_one_line_error(world, capsys):
    assert fedmart("registry", "show", "v0077-r1-abcdef01", "--root", str(world.registry_path)) == 2
    assert capsys.readouterr().err.startswith("fedmart: error: v0077-r1-abcdef01: no such version")


def test_audit_verify_names_the_edited_line(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for r in range(1, 6):
        log.append("round_end", round=r)
    assert fedmart("audit", "verify", str(path)) == 0
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('"round":4', '"round":5')
    path.write_text("".join(lines))

    assert fedmart("audit", "verify", str(path)) == 1
    assert "line 4" in capsys.readouterr().out


def test_audit_verify_of_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert fedmart("audit", "verify", str(tmp_path / "none.jsonl")) == 2
    assert "no audit log" in capsys.readouterr().err


def test_promote_without_the_signing_key_is_a_one_line_error(world, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("FEDMART_SIGNING_KEY", raising=False)
    v = world.versions[0]

    assert fedmart(*_reg(world, "promote", v)) == 2
    assert "--signing-key" in capsys.readouterr().err

    missing = tmp_path / "keys" / "typo.key"
    assert fedmart(*_reg(world, "promote", v, "--signing-key", str(missing))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmart: error:") and "private key not found" in err and "\n" not in err
    assert not missing.exists(), "a wrong path must never become a new key"
    assert world.registry.promoted() == []


def test_keygen_creates_a_key_once_and_never_replaces_it(tmp_path, capsys):
    key = tmp_path / "keys" / "coordinator.key"

    assert fedmart("registry", "keygen", str(key)) == 0
    assert key.is_file() and key.with_name("coordinator.key.pub").is_file()
    before = key.read_bytes()

    assert fedmart("registry", "keygen", str(key)) == 2
    assert "never replaces" in capsys.readouterr().err
    assert key.read_bytes() == before


def test_registry_verify_fails_on_a_tampered_promotion(world, capsys):
    v = world.versions[0]
    assert fedmart(*_reg(world, "promote", v, "--signing-key", str(world.key))) == 0
    path = world.registry_path / "promotions.jsonl"
    record = json.loads(path.read_text())
    record["counter"] = 7
    path.write_text(json.dumps(record) + "\n")
    capsys.readouterr()

    assert fedmart(*_reg(world, "verify")) == 1
    out = capsys.readouterr().out
    assert "promotions.jsonl line 1" in out and "signature does not verify" in out
