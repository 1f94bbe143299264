"""The catalog as the server looks items up: ids to 1-based indices, the fields a response shows, departments.

One :class:`ItemIndex` per served catalog version, built once and never mutated: a newer
signed catalog gets its own (``serving/catalog_view.py``), swapped in with the model
mapped onto it (``serving/snapshot.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from federation.catalog import Catalog

__all__ = ["ItemIndex"]


class ItemIndex:
    """Lookups over one catalog; index 0 is padding and never an item."""

    def __init__(self, catalog: Catalog, device: torch.device) -> None:
        n = catalog.num_items
        self.catalog = catalog
        self.num_items = n
        self.index_of: dict[str, int] = {iid: i + 1 for i, iid in enumerate(catalog.item_id.tolist())}
        self.titles: list[str] = catalog.title.tolist()
        self.item_ids: list[str] = catalog.item_id.tolist()
        self.item_departments: list[str] = catalog.department.tolist()
        self.departments: dict[str, np.ndarray] = {}  # name -> (n + 1,) bool, index 0 False
        for d in np.unique(catalog.department).tolist():
            mask = np.zeros(n + 1, dtype=bool)
            mask[1:] = catalog.department == d
            self.departments[d] = mask
        # name -> (n + 1,) bool on device: True where an item is *not* in the department (and at index 0)
        self.outside: dict[str, torch.Tensor] = {
            d: torch.from_numpy(~mask).to(device) for d, mask in self.departments.items()
        }

    def resolve(self, history: list[str]) -> tuple[np.ndarray, list[str]]:
        """Known 1-based indices (in order) and the unknown ids (first occurrence, in order)."""
        idx, unknown = [], []
        get = self.index_of.get
        for iid in history:
            i = get(iid)
            if i is None:
                if iid not in unknown:
                    unknown.append(iid)
            else:
                idx.append(i)
        return np.asarray(idx, dtype=np.int64), unknown
