"""Signed catalog versions (federation/catalogs.py): signed by the coordinator's key, counted, tamper refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from federation.catalog import Catalog
from federation.catalogs import CatalogStore, CatalogStoreError
from privacy.signing import load_or_create_keypair


def _with_item(catalog: Catalog, item_id: str, title: str) -> Catalog:
    return Catalog(
        item_id=np.append(catalog.item_id, item_id),
        title=np.append(catalog.title, title),
        department=np.append(catalog.department, catalog.department[0]),
        merchant=np.append(catalog.merchant, catalog.merchant[0]),
        price=np.append(catalog.price, 1.0),
    )


@pytest.fixture
def store(tmp_path):
    private, _ = load_or_create_keypair(tmp_path / "keys" / "k.pem")
    return CatalogStore(tmp_path / "registry", private_key=private)


def test_a_published_catalog_is_signed_counted_and_loads_verified(store, tiny_catalog):
    first = store.publish(tiny_catalog, by="alice")
    bigger = _with_item(tiny_catalog, "i7", "Copper Kettle")
    second = store.publish(bigger, by="alice")

    assert (first.counter, second.counter) == (1, 2)
    assert second.metadata["parent"] == tiny_catalog.version and second.metadata["parent_counter"] == 1
    assert (second.metadata["items_added"], second.metadata["items_removed"]) == (1, 0)
    assert second.version == bigger.version and second.name == f"c0002-{bigger.version}"
    newest, refused = store.newest()
    assert newest.name == second.name and refused == {}
    assert newest.catalog.item_id.tolist() == bigger.item_id.tolist()
    assert store.find(tiny_catalog.version).name == first.name


def test_if_new_does_not_publish_the_newest_catalog_again(store, tiny_catalog):
    store.publish(tiny_catalog, by="run")

    again = store.publish(tiny_catalog, by="run", if_new=True)

    assert again.counter == 1 and store.names() == [again.name]


@pytest.mark.parametrize("target", ["catalog.parquet", "metadata.json", "signature"])
def test_a_tampered_catalog_version_is_refused(store, tiny_catalog, support, target):
    v = store.publish(tiny_catalog, by="alice")
    path = store.dir / v.name / target
    if target == "metadata.json":
        meta = json.loads(path.read_text())
        meta["items"] = 999
        path.write_text(json.dumps(meta))
    else:
        support.flip_byte(path, 30 if target == "catalog.parquet" else 5)

    ok, reason = store.verify(v.name)

    assert not ok
    assert any(s in reason for s in ("signature", "sha256", "not base64"))
    assert store.newest()[0] is None


def test_a_tampered_newest_catalog_is_never_replaced_by_an_older_one(store, tiny_catalog, support):
    store.publish(tiny_catalog, by="alice")
    v2 = store.publish(_with_item(tiny_catalog, "i7", "Copper Kettle"), by="alice")
    support.flip_byte(store.dir / v2.name / "catalog.parquet", 30)

    newest, refused = store.newest()

    assert newest is None and "sha256" in refused[v2.name]


def test_a_catalog_signed_by_another_key_is_passed_over(store, tiny_catalog, tmp_path):
    store.publish(tiny_catalog, by="alice")
    other, _ = load_or_create_keypair(tmp_path / "keys" / "other.pem")
    forged = CatalogStore(store.root, private_key=other).publish(
        _with_item(tiny_catalog, "i7", "Forged Kettle"), by="mallory"
    )

    newest, refused = store.newest()

    assert newest.counter == 1 and "signature does not verify" in refused[forged.name]


def test_publishing_needs_the_signing_key(tmp_path, tiny_catalog):
    _, public = load_or_create_keypair(tmp_path / "k.pem")

    with pytest.raises(CatalogStoreError, match="signing key"):
        CatalogStore(tmp_path / "registry", public_key=public).publish(tiny_catalog, by="x")


def test_a_renamed_catalog_directory_is_refused(store, tiny_catalog):
    v = store.publish(tiny_catalog, by="alice")
    (store.dir / v.name).rename(store.dir / f"c0009-{tiny_catalog.version}")

    ok, reason = store.verify(f"c0009-{tiny_catalog.version}")

    assert not ok and "renamed" in reason
