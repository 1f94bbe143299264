"""`fedmart train-central registry.root=...`: the best model signed as a starting version for federation.init."""

from __future__ import annotations

import pytest

from conf.settings import RunSettings
from federation.catalog import Catalog
from federation.init_model import load_init
from federation.registry import ModelRegistry
from fedmart.cli import main
from privacy.signing import key_fingerprint, load_public_key

TINY = (
    "data.synthetic.num_users=150",
    "data.synthetic.num_items=40",
    "data.synthetic.num_departments=2",
    "data.synthetic.num_merchants=2",
    "data.max_len=8",
    "model.hidden=16",
    "model.heads=1",
    "model.layers=1",
    "max_epochs=1",
    "train.batch_size=64",
)


def test_train_central_publishes_a_signed_version_a_federation_can_start_from(tmp_path):
    out, registry, key = tmp_path / "central", tmp_path / "pre", tmp_path / "keys" / "central.key"

    try:
        main(["train-central", *TINY, f"registry.root={registry}", f"registry.signing_key={key}",
              f"hydra.run.dir={out}"])  # fmt: skip
    except SystemExit as exc:  # Hydra may exit after the job
        assert exc.code in (0, None)

    pub = key.with_name("central.key.pub")
    reg = ModelRegistry(registry, public_key_path=pub)
    (version,) = reg.versions()
    meta = reg.show(version)
    assert reg.verify(version)[0] and meta["key_id"] == key_fingerprint(load_public_key(pub))
    assert meta["privacy"]["mode"] == "off" and meta["metrics"]["central"]["seed"] == 0
    catalog = Catalog.load(out / "catalog.parquet")
    assert reg.catalogs.newest()[0].version == catalog.version == meta["catalog_version"]
    settings = RunSettings.from_dict(
        {
            "model": {"hidden": 16, "heads": 1, "layers": 1},
            "data": {"max_len": 8},
            "federation": {"init": str(registry / version), "init_public_key": str(pub)},
        }
    )
    init = load_init(settings, catalog)
    assert init.origin["version"] == version and init.origin["catalog_map"]["added"] == 0


def test_a_missing_signing_key_is_a_one_line_error_before_training(tmp_path, capsys):
    key = tmp_path / "keys" / "nope.key"

    with pytest.raises(SystemExit) as exc:
        main(["train-central", *TINY, f"registry.root={tmp_path / 'pre'}", f"registry.signing_key={key}",
              "registry.create_key=false", f"hydra.run.dir={tmp_path / 'central'}"])  # fmt: skip

    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(
        f"fedmart: error: registry.signing_key: {key}: private key not found"
    )
    assert not (tmp_path / "central" / "catalog.parquet").exists()
