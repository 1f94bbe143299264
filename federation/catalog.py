"""The public item catalog: the item vocabulary that sizes the global model.

The catalog is platform data (titles, departments, merchants, prices are what any
shopper sees), so it belongs to the federation and is shared with every node.
Item *indices* are 1-based; 0 is the padding index of every sequence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Catalog", "CatalogError"]

_COLUMNS = ("item_id", "title", "department", "merchant", "price")


class CatalogError(ValueError):
    """A catalog file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Catalog:
    """Items with id, title, department, merchant and price.

    Row ``i`` of every column describes the item with model index ``i + 1``.
    """

    item_id: np.ndarray  # (n,) str: the platform's item ids
    title: np.ndarray  # (n,) str
    department: np.ndarray  # (n,) str
    merchant: np.ndarray  # (n,) str
    price: np.ndarray  # (n,) float64

    def __post_init__(self) -> None:
        n = len(self.item_id)
        for name in _COLUMNS[1:]:
            if len(getattr(self, name)) != n:
                raise CatalogError(f"catalog column {name!r} has {len(getattr(self, name))} rows, item_id has {n}")
        if n == 0:
            raise CatalogError("the catalog is empty: it needs at least one item")
        if len(np.unique(self.item_id)) != n:
            raise CatalogError("catalog item_id values are not unique: deduplicate the catalog")

    # -- vocabulary -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.item_id)

    @property
    def num_items(self) -> int:
        """Number of real items; the model's vocabulary is ``num_items + 1`` (padding)."""
        return len(self.item_id)

    def index_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Map platform item ids to 1-based model indices; unknown ids map to 0."""
        keys = np.asarray(item_ids).astype(str)
        order = np.argsort(self.item_id.astype(str))
        sorted_ids = self.item_id.astype(str)[order]
        pos = np.searchsorted(sorted_ids, keys)
        pos_clipped = np.minimum(pos, len(sorted_ids) - 1)
        found = sorted_ids[pos_clipped] == keys
        return np.where(found, order[pos_clipped] + 1, 0).astype(np.int64)

    def departments(self) -> np.ndarray:
        """Sorted distinct departments."""
        return np.unique(self.department)

    # -- identity ---------------------------------------------------------------
    @property
    def version(self) -> str:
        """Content hash (first 16 hex digits of SHA-256 over all columns, in order)."""
        h = hashlib.sha256()
        for name in _COLUMNS:
            col = getattr(self, name)
            h.update(name.encode())
            h.update(json.dumps([str(v) for v in col.tolist()]).encode())
        return h.hexdigest()[:16]

    # -- persistence --------------------------------------------------------------
    def to_table(self) -> pa.Table:
        return pa.table(
            {
                "item_id": pa.array(self.item_id.astype(str)),
                "title": pa.array(self.title.astype(str)),
                "department": pa.array(self.department.astype(str)),
                "merchant": pa.array(self.merchant.astype(str)),
                "price": pa.array(self.price.astype(np.float64)),
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write ``catalog.parquet`` with the version hash in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.to_table().replace_schema_metadata({"fedmart.catalog.version": self.version})
        pq.write_table(table, path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, hint: str = "pass the path of an existing catalog.parquet") -> Catalog:
        """Read a catalog written by :meth:`save` and check its version hash.

        ``hint`` is the fix for a missing file that works for the calling command (its own flag).
        """
        path = Path(path)
        if not path.is_file():
            raise CatalogError(f"{path}: catalog file not found; {hint}")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise CatalogError(f"{path}: not a readable Parquet catalog ({exc}); regenerate it") from exc
        missing = [c for c in _COLUMNS if c not in table.column_names]
        if missing:
            raise CatalogError(f"{path}: catalog lacks columns {missing}; it needs {list(_COLUMNS)}")
        cat = cls(
            item_id=np.asarray(table["item_id"].to_pylist(), dtype=object).astype(str),
            title=np.asarray(table["title"].to_pylist(), dtype=object).astype(str),
            department=np.asarray(table["department"].to_pylist(), dtype=object).astype(str),
            merchant=np.asarray(table["merchant"].to_pylist(), dtype=object).astype(str),
            price=table["price"].to_numpy().astype(np.float64),
        )
        stored = (table.schema.metadata or {}).get(b"fedmart.catalog.version")
        if stored is not None and stored.decode() != cat.version:
            raise CatalogError(
                f"{path}: catalog content does not match its recorded version "
                f"{stored.decode()} (now {cat.version}); the file was edited, regenerate it"
            )
        return cat
