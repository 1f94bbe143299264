"""Signed, counted promotions (federation/promotions.py) and the registry's signing key, never created by mistake."""

from __future__ import annotations

import json

import pytest

from federation.promotions import signed_promotion
from federation.registry import ModelRegistry, RegistryError
from privacy.signing import KeyFileError, load_or_create_keypair


@pytest.fixture
def world(tmp_path, support):
    world = support.make_world(tmp_path, num_items=40, promote=False)
    for seed in (2, 3):
        support.publish(world, seed, promote=False)
    return world


def _lines(world) -> list[dict]:
    return [json.loads(x) for x in (world.registry_path / "promotions.jsonl").read_text().splitlines()]


def _write(world, records: list[dict]) -> None:
    (world.registry_path / "promotions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_each_promotion_is_signed_and_counts_up(world):
    v1, v2, v3 = world.versions
    for v in (v1, v3, v1):  # the last one: a rollback by the key holder, as a new promotion
        world.registry.promote(v, by="alice")

    records = _lines(world)
    assert [r["counter"] for r in records] == [1, 2, 3]
    assert all(r["signature"] and r["key_id"] and r["format"] == "fedmart-promotion-v1" for r in records)
    assert [r["previous"] for r in records] == [None, v1, v3]
    promotions = world.registry.promotions()
    assert promotions.refused == {} and promotions.newest() == (records[-1], None)
    assert world.registry.latest_promoted_verified() == v1


def test_an_edited_counter_is_refused_and_the_signed_newest_stands(world):
    v1, v2, _ = world.versions
    world.registry.promote(v1, by="a")
    world.registry.promote(v2, by="a")
    records = _lines(world)
    records[0]["counter"] = 99  # make the older promotion look newest

    _write(world, records)

    promotions = world.registry.promotions()
    assert "signature does not verify" in promotions.refused[1]
    assert promotions.newest()[0]["version"] == v2


@pytest.mark.parametrize("edit", ["remove", "blank", "other key"])
def test_a_promotion_without_a_valid_signature_is_refused(world, tmp_path, edit):
    v1, v2, _ = world.versions
    world.registry.promote(v1, by="a")
    world.registry.promote(v2, by="a")
    records = _lines(world)
    if edit == "remove":
        del records[1]["signature"]
    elif edit == "blank":
        records[1]["signature"] = ""
    else:  # a promotion properly signed, by someone else's key
        other, _ = load_or_create_keypair(tmp_path / "other" / "k.pem")
        records[1] = signed_promotion(other, {"version": v2, "by": "mallory"}, 2)

    _write(world, records)

    promotions = world.registry.promotions()
    assert list(promotions.refused) == [2]
    assert ("unsigned" if edit == "remove" else "does not verify") in promotions.refused[2]
    assert promotions.newest()[0]["version"] == v1


def test_reordered_lines_change_nothing(world):
    v1, v2, _ = world.versions
    world.registry.promote(v2, by="a")
    world.registry.promote(v1, by="a")  # newest: v1, counter 2

    _write(world, list(reversed(_lines(world))))

    assert world.registry.promotions().newest()[0]["version"] == v1


def test_two_promotions_with_one_counter_serve_neither(world):
    v1, v2, _ = world.versions
    world.registry.promote(v1, by="a")
    first = _lines(world)
    # The file cut, then a new promotion: it gets counter 1 again.
    (world.registry_path / "promotions.jsonl").write_text("")
    world.registry.promote(v2, by="a")

    _write(world, first + _lines(world))

    record, why = world.registry.promotions().newest()
    assert record is None and "same counter 1" in why


def test_promote_needs_the_signing_key(world):
    reader = ModelRegistry(world.registry_path, public_key_path=world.pub)

    with pytest.raises(RegistryError, match="needs the signing key"):
        reader.promote(world.versions[0], by="a")
    assert not (world.registry_path / "promotions.jsonl").exists()


def test_a_missing_signing_key_is_an_error_unless_creation_is_asked_for(tmp_path):
    key = tmp_path / "keys" / "typo.key"

    with pytest.raises(KeyFileError, match="private key not found"):
        ModelRegistry(tmp_path / "registry", private_key_path=key)
    assert not key.exists() and not key.parent.exists()

    ModelRegistry(tmp_path / "registry", private_key_path=key, create_key=True)
    assert key.is_file() and key.with_name("typo.key.pub").is_file()
