"""The signed model registry (federation/registry.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from federation.registry import ModelRegistry, RegistryError
from privacy.signing import load_or_create_keypair


@pytest.fixture
def world(tmp_path, support):
    return support.make_world(tmp_path, num_items=50, promote=False)


def test_publish_writes_a_signed_sortable_version(world):
    v = world.versions[0]
    d = world.registry_path / v

    assert v.startswith("v0001-r1-")
    assert {p.name for p in d.iterdir()} == {"weights.safetensors", "metadata.json", "signature", "popularity.npy"}
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["version"] == v
    assert meta["catalog_version"] == world.catalog.version
    assert len(meta["weights_sha256"]) == 64
    assert meta["created_at"]
    assert world.registry.verify(v) == (True, "signature valid, files match their recorded sha256")


def test_versions_sort_by_sequence_and_list_shows_them(world, support):
    for seed in range(2, 12):
        support.publish(world, seed, promote=False)

    rows = world.registry.list()

    assert [r.version for r in rows] == world.versions
    assert [r.seq for r in rows] == list(range(1, 12))
    assert rows[1].parent == rows[0].version
    assert rows[0].metrics == {"ndcg@10": 0.1}


def test_load_returns_the_published_weights_and_popularity(world, support):
    weights, _ = support.random_weights(world.catalog, seed=1)

    loaded, meta = world.registry.load(world.versions[0])

    assert set(loaded) == set(weights)
    for k in weights:
        np.testing.assert_array_equal(loaded[k], weights[k])
    np.testing.assert_array_equal(world.registry.load_popularity(world.versions[0]), world.popularity)
    assert meta["privacy"] == {"epsilon": 2.0, "delta": 1e-5}


@pytest.mark.parametrize("name", ["weights.safetensors", "metadata.json", "signature", "popularity.npy"])
@pytest.mark.parametrize("offset", [0, 40, -2])
def test_one_flipped_byte_anywhere_fails_verification(world, name, offset, support):
    v = world.versions[0]

    support.flip_byte(world.registry_path / v / name, offset)
    ok, reason = world.registry.verify(v)

    assert not ok
    assert v in reason
    with pytest.raises(RegistryError):
        world.registry.load(v)


def test_a_renamed_version_directory_fails_verification(world, support):
    support.publish(world, 2, promote=False)
    old, new = world.versions
    (world.registry_path / new).rename(world.registry_path / "v0009-r9-00000000")
    (world.registry_path / old).rename(world.registry_path / new)

    ok, reason = world.registry.verify(new)

    assert not ok
    assert "renamed" in reason


def test_a_missing_signature_is_unsigned(world):
    v = world.versions[0]
    (world.registry_path / v / "signature").unlink()

    assert world.registry.verify(v) == (False, f"{v}: unsigned (no signature file)")


def test_another_key_does_not_verify(world, tmp_path):
    _, other = load_or_create_keypair(tmp_path / "other" / "k.pem")

    ok, reason = world.registry.verify(world.versions[0], public_key=other)

    assert not ok
    assert "another key" in reason


def test_a_verifier_needs_only_the_public_key(world):
    reader = ModelRegistry(world.registry_path, public_key_path=world.pub)

    assert reader.verify(world.versions[0])[0]
    with pytest.raises(RegistryError, match="signing key"):
        reader.publish({"w": np.zeros(1)}, **_publish_kwargs(world))


def test_without_any_key_verification_says_what_to_pass(world):
    ok, reason = ModelRegistry(world.registry_path).verify(world.versions[0])

    assert not ok
    assert "--public-key" in reason


def test_mismatched_key_pair_is_refused(world, tmp_path):
    other_key = tmp_path / "other" / "k.pem"
    load_or_create_keypair(other_key)

    with pytest.raises(RegistryError, match="not the public half"):
        ModelRegistry(
            world.registry_path, private_key_path=world.key, public_key_path=other_key.with_suffix(".pem.pub")
        )


def _publish_kwargs(world, **kw):
    base = dict(
        run="r",
        round=1,
        config_hash="c",
        catalog_version=world.catalog.version,
        model_config={},
        metrics={},
        privacy={},
        parent=None,
    )
    base.update(kw)
    return base


def test_an_unknown_parent_is_refused(world):
    with pytest.raises(RegistryError, match="parent"):
        world.registry.publish({"w": np.zeros(1)}, **_publish_kwargs(world, parent="v0099-r1-deadbeef"))


def test_negative_popularity_is_refused(world):
    with pytest.raises(ValueError, match="popularity"):
        world.registry.publish({"w": np.zeros(1)}, **_publish_kwargs(world), popularity=np.array([1.0, -1.0]))


def test_promote_records_and_returns_the_promotion(world):
    v = world.versions[0]

    record = world.registry.promote(v, by="alice")

    assert record["version"] == v and record["by"] == "alice" and record["previous"] is None
    assert world.registry.promoted() == [record]
    assert [r.promoted for r in world.registry.list()] == [True]
    lines = (world.registry_path / "promotions.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == record


def test_promote_refuses_an_unverifiable_version(world, support):
    v = world.versions[0]
    support.flip_byte(world.registry_path / v / "weights.safetensors")

    with pytest.raises(RegistryError, match="refusing to promote"):
        world.registry.promote(v, by="alice")
    assert world.registry.promoted() == []


def test_a_tampered_newest_promotion_is_refused_not_replaced_by_an_older_one(world, caplog, support):
    v1 = world.versions[0]
    world.registry.promote(v1, by="a")
    v2 = support.publish(world, 2)  # promoted
    assert world.registry.latest_promoted_verified() == v2

    support.flip_byte(world.registry_path / v2 / "metadata.json", 20)
    with caplog.at_level(logging.WARNING, logger="federation.registry"):
        chosen = world.registry.latest_promoted_verified(world.registry.public_key)

    # Falling back to v1 would let whoever can break a file roll the served model back.
    assert chosen is None
    assert f"promoted version {v2} refused" in caplog.text


def test_promoting_an_older_version_is_a_rollback(world, support):
    v1 = world.versions[0]
    world.registry.promote(v1, by="a")
    support.publish(world, 2)

    world.registry.promote(v1, by="a")

    assert world.registry.latest_promoted_verified() == v1


def test_no_promotion_means_nothing_to_serve(world):
    assert world.registry.latest_promoted_verified() is None


def test_unknown_or_malformed_version_ids_are_errors(world):
    with pytest.raises(RegistryError, match="not a version id"):
        world.registry.show("../etc")
    with pytest.raises(RegistryError, match="no such version"):
        world.registry.show("v0042-r1-deadbeef")
    assert world.registry.verify("nonsense")[0] is False
