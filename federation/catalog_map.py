"""Moving a model's item-indexed rows from the catalog it was trained on to another catalog.

The one place where item rows change index. Both users go through :func:`map_item_rows`:

* ``fedmart serve`` (``serving/snapshot.py``) maps a version onto the catalog it serves:
  items present in both keep their rows, new items get ``init_row`` rows (zeros), removed
  items are dropped (so they can never be recommended);
* ``federation.init`` (``federation/init_model.py``) starts a federation from a published
  version: new items get the rows of a freshly built model of the new catalog (for the
  text tower, a zero ID residual, so a new item starts as its text alone).

Items are matched by the platform's ``item_id``, never by position. Row 0 (padding) is
copied. Which parameters are item-indexed is the caller's ``item_keys`` (a model's own,
e.g. :func:`item_keys` of its state dict); every other parameter is copied unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from federation import wire
from federation.catalog import Catalog

__all__ = ["Alignment", "InitRow", "align", "item_keys", "map_item_rows", "rows_from", "zero_rows"]

# (parameter name, new item indices (k,) 1-based in the new catalog, the old array) -> (k, *row shape) rows
InitRow = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Alignment:
    """Where each item of ``new`` was in ``old``.

    ``source[j]`` is the old 1-based index of new item ``j`` (``source[0] == 0``, padding),
    or 0 for an item ``old`` does not have.
    """

    source: np.ndarray  # (n_new + 1,) int64
    old_items: int
    new_items: int

    @property
    def added(self) -> np.ndarray:
        """1-based indices (in the new catalog) of the items the old catalog lacks."""
        return np.flatnonzero(self.source[1:] == 0) + 1

    @property
    def removed(self) -> np.ndarray:
        """1-based indices (in the old catalog) of the items the new catalog lacks."""
        kept = np.zeros(self.old_items + 1, dtype=bool)
        kept[self.source] = True
        return np.flatnonzero(~kept[1:]) + 1

    @property
    def identity(self) -> bool:
        """Same items in the same order: nothing to map."""
        return self.old_items == self.new_items and bool(np.all(self.source == np.arange(self.new_items + 1)))

    def summary(self) -> dict[str, int]:
        return {"items": self.new_items, "added": len(self.added), "removed": len(self.removed)}


def align(old: Catalog, new: Catalog) -> Alignment:
    """Match ``new``'s items to ``old``'s by ``item_id``."""
    source = np.concatenate([[0], old.index_of(new.item_id)]).astype(np.int64)
    return Alignment(source=source, old_items=old.num_items, new_items=new.num_items)


def item_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """The item-indexed parameters among ``keys`` (a state dict's or a weights dict's names).

    The names are ``wire.ITEM_ROW_KEYS``, the holder rule's list, so a model that adds
    item-indexed parameters (the text tower's residual and bias) is mapped as soon as it
    names them there.
    """
    present = set(keys)
    return tuple(k for k in wire.ITEM_ROW_KEYS if k in present)


def zero_rows(key: str, new_items: np.ndarray, old: np.ndarray) -> np.ndarray:
    """New items' rows are zeros (an ID residual or bias that starts at zero; an empty ID row)."""
    return np.zeros((len(new_items), *old.shape[1:]), dtype=old.dtype)


def rows_from(state: Mapping[str, np.ndarray]) -> InitRow:
    """New items take their rows from ``state``, a model built for the *new* catalog (fresh initialisation)."""

    def init(key: str, new_items: np.ndarray, old: np.ndarray) -> np.ndarray:
        return np.asarray(state[key])[new_items].astype(old.dtype, copy=False)

    return init


def map_item_rows(
    state: Mapping[str, np.ndarray],
    old_catalog: Catalog,
    new_catalog: Catalog,
    item_keys: Iterable[str],
    init_row: InitRow = zero_rows,
    *,
    alignment: Alignment | None = None,
) -> dict[str, np.ndarray]:
    """``state`` (trained on ``old_catalog``) with the rows of every ``item_keys`` parameter moved to ``new_catalog``.

    Items in both catalogs keep their rows, new items get ``init_row(key, indices, old)``,
    removed items are dropped; row 0 (padding) is copied; other parameters are copied as they are.
    Raises ``ValueError`` when an item-indexed parameter does not have ``old_catalog``'s rows.
    """
    a = alignment or align(old_catalog, new_catalog)
    out = {k: np.asarray(v) for k, v in state.items()}
    added = a.added
    for key in item_keys:
        if key not in out:
            raise ValueError(f"item-indexed parameter {key!r} is not in the weights")
        old = out[key]
        if old.ndim < 1 or old.shape[0] != a.old_items + 1:
            raise ValueError(
                f"{key!r} has {old.shape[0] if old.ndim else 0} rows, the catalog it was trained on "
                f"{a.old_items} items + padding"
            )
        if a.identity:
            continue
        new = old[a.source].copy()  # (n_new + 1, ...): padding and kept items; added items hold row 0 for now
        if len(added):
            rows = np.asarray(init_row(key, added, old))
            if rows.shape != (len(added), *old.shape[1:]):
                raise ValueError(
                    f"init_row gave {key!r} rows of shape {rows.shape}, expected {(len(added), *old.shape[1:])}"
                )
            new[added] = rows
        out[key] = new
    return out
