from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from federation.catalog import Catalog, CatalogError


def test_roundtrip_and_version(tmp_path, tiny_catalog):
    path = tiny_catalog.save(tmp_path / "c.parquet")
    loaded = Catalog.load(path)
    assert loaded.version == tiny_catalog.version
    assert loaded.num_items == 6
    assert loaded.index_of(np.array(["i3", "zzz", "i1"])).tolist() == [3, 0, 1]


def test_edited_catalog_is_detected(tmp_path, tiny_catalog):
    path = tiny_catalog.save(tmp_path / "c.parquet")
    table = pq.read_table(path)
    titles = table.column("title").to_pylist()
    titles[0] = "Edited"
    import pyarrow as pa

    table = table.set_column(table.column_names.index("title"), "title", pa.array(titles))
    pq.write_table(table, path)
    with pytest.raises(CatalogError, match="does not match"):
        Catalog.load(path)


def test_duplicate_ids_rejected():
    with pytest.raises(CatalogError, match="unique"):
        Catalog(
            item_id=np.array(["a", "a"]),
            title=np.array(["x", "y"]),
            department=np.array(["d", "d"]),
            merchant=np.array(["m", "m"]),
            price=np.zeros(2),
        )
