"""federation.init (federation/init_model.py, federation/server.py): start from a signed version, fine-tune.

Unit level on purpose: the init path is load_init (verify, shape, map) -> the first global
arrays -> the signed trail (begin_trail: the registry's metadata and the audit log). Nothing
in it depends on the rounds, so no federation is started here; the launching command's
refusal is checked through `fedmart simulate`, which refuses before it prepares any data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conf.settings import RunSettings
from federation.init_model import InitError, load_init
from federation.outputs import RunDir, from_arrays
from federation.registry import ModelRegistry
from federation.server import begin_trail, initial_arrays
from fedmart.cli import main
from privacy.audit import verify_audit
from privacy.signing import key_fingerprint, load_or_create_keypair, load_public_key

# conftest's TINY model (the signed world's): a run must ask for the same shape
SAME_SHAPE = {"hidden": 16, "layers": 1, "heads": 1, "dropout": 0.0, "attn_dropout": 0.0}


@pytest.fixture
def pretrained(tmp_path, support):
    """A registry with one signed version (40 items) and its catalog as a signed catalog version."""
    world = support.make_world(tmp_path / "pre", num_items=40, promote=False)
    world.registry.catalogs.publish(world.catalog, by="pytest")
    return world


def _settings(world, tmp_path, **federation) -> RunSettings:
    fed = {"init": str(world.registry_path / world.versions[0]), "init_public_key": str(world.pub), **federation}
    return RunSettings.from_dict(
        {
            "model": SAME_SHAPE,
            "data": {"max_len": 12},
            "federation": fed,
            "registry": {"signing_key": str(tmp_path / "keys" / "run.key")},
            "audit": {"path": None},
        }
    )


def test_items_keep_their_rows_by_id_new_items_start_fresh_removed_items_are_dropped(pretrained, tmp_path, support):
    removed = tuple(pretrained.catalog.item_id[[0, 7]].tolist())
    catalog = support.edit_catalog(pretrained.catalog, add=(("n1", "New Kettle"),), remove=removed)
    old, _ = pretrained.registry.load(pretrained.versions[0])

    init = load_init(_settings(pretrained, tmp_path), catalog)

    w = init.weights
    assert w["item_emb.weight"].shape == (40 - 2 + 1 + 1, 16)
    for key in ("item_emb.weight", "head.weight", "head.bias"):
        for i, item in enumerate(catalog.item_id[:-1], start=1):  # the kept items, by id
            j = int(pretrained.catalog.index_of(np.array([item]))[0])
            assert np.array_equal(w[key][i], old[key][j])
    assert not np.array_equal(w["item_emb.weight"][-1], 0.0)  # fresh (normal init), not a copy of anything
    assert np.array_equal(w["encoder.encoder.layer.0.attention.self.query.weight"],
                          old["encoder.encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    assert init.origin["version"] == pretrained.versions[0]
    assert init.origin["registry"] == str(pretrained.registry_path.resolve())
    assert init.origin["key_id"] == key_fingerprint(load_public_key(pretrained.pub))
    assert init.origin["catalog_map"] == {"items": 39, "added": 1, "removed": 2}


@pytest.mark.parametrize("target", ["weights.safetensors", "metadata.json"])
def test_a_tampered_version_is_refused_before_anything_is_read(pretrained, tmp_path, support, target):
    support.flip_byte(pretrained.registry_path / pretrained.versions[0] / target, 60)

    with pytest.raises(InitError, match=f"refused {pretrained.versions[0]}: .*(sha256|signature)") as exc:
        load_init(_settings(pretrained, tmp_path), pretrained.catalog)
    assert "\n" not in str(exc.value)


def test_a_version_signed_by_another_key_is_refused(pretrained, tmp_path):
    _, other = load_or_create_keypair(tmp_path / "keys" / "other.key")

    settings = _settings(pretrained, tmp_path, init_public_key=str(tmp_path / "keys" / "other.key.pub"))

    with pytest.raises(InitError, match="signature does not verify"):
        load_init(settings, pretrained.catalog)


@pytest.mark.parametrize(
    ("override", "named"),
    [({"model": {**SAME_SHAPE, "hidden": 32, "heads": 1}}, "hidden 16 there, 32 here (model.hidden)"),
     ({"data": {"max_len": 20}}, "max_len 12 there, 20 here (data.max_len)"),
     ({"model": {**SAME_SHAPE, "text": True}}, "text False there, True here (model.text)")],
)  # fmt: skip
def test_another_model_shape_is_refused_naming_the_setting(pretrained, tmp_path, override, named):
    values = {
        "model": SAME_SHAPE,
        "data": {"max_len": 12},
        "federation": {"init": str(pretrained.registry_path), "init_public_key": str(pretrained.pub)},
        **override,
    }

    with pytest.raises(InitError, match="has another model shape") as exc:
        load_init(RunSettings.from_dict(values), pretrained.catalog)
    assert named in str(exc.value)


def test_a_version_whose_catalog_is_not_signed_anywhere_is_refused(tmp_path, support):
    world = support.make_world(tmp_path / "pre", num_items=40, promote=False)  # no signed catalog
    other = support.edit_catalog(world.catalog, add=(("n1", "x"),))

    with pytest.raises(InitError, match="trained on catalog .* publish it there"):
        load_init(_settings(world, tmp_path), other)


def test_the_run_records_its_origin_in_every_version_and_in_the_signed_audit_log(pretrained, tmp_path, support):
    catalog = support.edit_catalog(pretrained.catalog, add=(("n1", "New Kettle"),))
    settings = _settings(pretrained, tmp_path)
    run = RunDir(tmp_path / "run")

    arrays, origin = initial_arrays(settings, catalog)
    audit, publisher = begin_trail(run, settings, catalog, {}, start=0, origin=origin)
    registry = ModelRegistry(run.root / "registry", private_key_path=tmp_path / "keys" / "run.key", create_key=True)
    weights = from_arrays(arrays)
    version = registry.publish(
        weights,
        run="run",
        round=1,
        config_hash="c",
        catalog_version=catalog.version,
        model_config={},
        metrics={},
        privacy={},
        parent=None,
        origin=publisher.origin,
    )
    resumed = begin_trail(run, settings, catalog, {}, start=1, origin=None)[1]  # a resumed run: from its versions

    assert registry.verify(version)[0] and registry.show(version)["origin"] == origin
    assert resumed.origin == origin
    entries = [json.loads(line) for line in (run.root / "audit.jsonl").read_text().splitlines()]
    assert entries[0]["event"] == "run_start" and entries[0]["init"] == origin
    assert entries[1]["event"] == "run_resume" and entries[1]["init"] == origin
    assert verify_audit(run.root / "audit.jsonl", public_key=registry.public_key).ok
    assert registry.catalogs.newest()[0].version == catalog.version  # the run signs its catalog
    assert origin["version"] == pretrained.versions[0] and weights["head.bias"].shape == (42,)


def test_without_init_the_run_starts_from_random_weights_and_records_no_origin(tmp_path, tiny_catalog):
    arrays, origin = initial_arrays(RunSettings.from_dict({"model": SAME_SHAPE}), tiny_catalog)

    assert origin is None and from_arrays(arrays)["head.bias"].shape == (7,)


def test_simulate_refuses_a_tampered_init_with_one_line_before_preparing_data(pretrained, tmp_path, support, capsys):
    support.flip_byte(pretrained.registry_path / pretrained.versions[0] / "weights.safetensors", 60)
    run_dir = tmp_path / "run"

    with pytest.raises(SystemExit) as exc:
        main(["simulate", f"federation.init={pretrained.registry_path / pretrained.versions[0]}",
              f"federation.init_public_key={pretrained.pub}", "model.hidden=16", "model.layers=1",
              "model.heads=1", "data.max_len=12", f"hydra.run.dir={run_dir}"])  # fmt: skip

    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err[-1].startswith("fedmart: error: federation.init=") and "does not match its recorded sha256" in err[-1]
    assert not (run_dir / "catalog.parquet").exists()  # refused before the data was prepared
