"""`fedmart registry publish-catalog` and `registry catalogs` (fedmart/registry_cmds.py), through the CLI's main()."""

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


def test_publish_catalog_signs_a_new_catalog_version_and_records_it_in_the_audit_log(world, capsys, support, tmp_path):
    audit = world.registry_path.parent / "audit.jsonl"
    AuditLog(audit, private_key=world.registry.signing_key).append("run_start", run="test")
    grown = support.edit_catalog(world.catalog, add=(("new-1", "Copper Kettle"),), remove=(world.catalog.item_id[0],))
    path = grown.save(tmp_path / "new.parquet")

    assert fedmart(*_reg(world, "publish-catalog", "--catalog", str(path), "--key", str(world.key), "--by", "ann")) == 0

    newest, refused = world.registry.catalogs.newest()
    assert refused == {} and newest.version == grown.version and newest.metadata["by"] == "ann"
    assert "published catalog" in capsys.readouterr().out
    last = json.loads(audit.read_text().splitlines()[-1])
    assert last["event"] == "catalog_published" and last["catalog_version"] == grown.version
    assert fedmart("audit", "verify", str(audit), "--public-key", str(world.pub)) == 0
    assert fedmart(*_reg(world, "catalogs")) == 0
    assert f"ok  {newest.name}: 40 items (+0 -0 against none)" in capsys.readouterr().out


def test_publish_catalog_without_a_signing_key_is_a_one_line_error(world, capsys, monkeypatch):
    monkeypatch.delenv("FEDMART_SIGNING_KEY", raising=False)

    assert fedmart(*_reg(world, "publish-catalog", "--catalog", str(world.catalog_path))) == 2

    err = capsys.readouterr().err.strip()
    assert err == (
        "fedmart: error: publish-catalog signs the catalog: pass --signing-key KEY (the coordinator's) "
        "or set $FEDMART_SIGNING_KEY"
    )
    assert world.registry.catalogs.names() == []


def test_publish_catalog_of_a_broken_file_is_a_one_line_error(world, capsys, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")

    assert fedmart(*_reg(world, "publish-catalog", "--catalog", str(bad), "--key", str(world.key))) == 2

    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmart: error: ") and "not a readable Parquet catalog" in err and "\n" not in err


def test_registry_verify_checks_catalog_versions_too(world, capsys, support):
    assert fedmart(*_reg(world, "publish-catalog", "--catalog", str(world.catalog_path), "--key", str(world.key))) == 0
    name = world.registry.catalogs.names()[0]
    support.flip_byte(world.registry.catalogs.dir / name / "catalog.parquet", 40)

    assert fedmart(*_reg(world, "verify")) == 1

    assert f"FAILED  catalog {name}" in capsys.readouterr().out
