"""A node's private interactions in columnar form, and reading them from files.

Three sources sit behind this one type: the fedmart schema (Parquet or CSV with
``user_id, item_id, timestamp`` and optional ``event``), MovieLens-100K
(:mod:`clients.movielens`) and the synthetic generator (:mod:`clients.synthetic`).
Everything downstream (validation, sequences, partitioning, training) works on
:class:`Interactions`: NumPy columns, never lists of dicts, so 10^7 rows fit.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

__all__ = ["DataError", "Interactions", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "read_table"]

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
OPTIONAL_COLUMNS = ("event",)


class DataError(ValueError):
    """Fatal problem with a data file; the message is one line naming the file and the fix."""


@dataclass
class Interactions:
    """Interaction events, one row per event.

    Attributes
    ----------
    user : (n,) int64
        User code, an index into ``user_ids``.
    item : (n,) int64
        1-based model index of the item in the catalog (0 is padding, never stored).
    timestamp : (n,) int64
        Seconds since the epoch.
    user_ids : (u,) str
        Original user id of each user code.
    event : (n,) str or None
        Optional event type (view, cart, purchase, rating, ...).
    user_attrs : dict of (u,) arrays
        Per-user attributes that silo schemes may use (e.g. MovieLens occupation).
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    user_ids: np.ndarray
    event: np.ndarray | None = None
    user_attrs: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def take(self, rows: np.ndarray) -> Interactions:
        """Subset of rows; user codes are re-densified so no user is left empty."""
        rows = np.asarray(rows)
        kept_users, new_codes = np.unique(self.user[rows], return_inverse=True)
        return Interactions(
            user=new_codes.astype(np.int64),
            item=self.item[rows],
            timestamp=self.timestamp[rows],
            user_ids=self.user_ids[kept_users],
            event=None if self.event is None else self.event[rows],
            user_attrs={k: v[kept_users] for k, v in self.user_attrs.items()},
        )

    def save(self, path: str | Path) -> Path:
        """Write as ``.npz`` (fast, columnar) for a node's data directory."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "user": self.user,
            "item": self.item,
            "timestamp": self.timestamp,
            "user_ids": self.user_ids.astype(str),
        }
        if self.event is not None:
            arrays["event"] = self.event.astype(str)
        for k, v in self.user_attrs.items():
            arrays[f"attr__{k}"] = v
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Interactions:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: interactions file not found; check the node's data directory")
        with np.load(path, allow_pickle=False) as z:
            attrs = {k[len("attr__") :]: z[k] for k in z.files if k.startswith("attr__")}
            return cls(
                user=z["user"],
                item=z["item"],
                timestamp=z["timestamp"],
                user_ids=z["user_ids"],
                event=z["event"] if "event" in z.files else None,
                user_attrs=attrs,
            )


def read_table(path: str | Path) -> pa.Table:
    """Read a fedmart-schema file (``.parquet``, ``.csv`` or ``.tsv``) as an Arrow table.

    CSV columns are read as strings, so a malformed value becomes a quarantined row
    in validation instead of a failed read. Raises :class:`DataError` for an
    unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; pass the path of a Parquet or CSV interactions file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            # Read the header first so every column can be forced to string.
            delimiter = "\t" if suffix == ".tsv" else ","
            # csv.reader, not str.split: exporters (pyarrow, Excel) quote header names.
            with path.open("r", encoding="utf-8", errors="replace", newline="") as f:
                header = next(csv.reader(f, delimiter=delimiter), [])
            return pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in header},
                    strings_can_be_null=True,
                ),
            )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: unreadable {suffix[1:]} file ({str(exc).splitlines()[0]}); fix or re-export it"
        ) from exc
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .parquet or .csv")
