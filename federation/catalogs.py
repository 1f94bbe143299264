"""Signed catalog versions in the registry: which items exist, signed by the coordinator's key.

Layout under the registry's ``root``::

    catalogs/
        c0002-3fa2c9d04b1e7a66/
            catalog.parquet   the catalog (federation/catalog.py), as Catalog.save writes it
            metadata.json     format, counter, catalog_version (= Catalog.version, the content digest),
                              parent (the catalog version it replaces), items, items added and removed
                              against the parent, by, created_at, the file's sha256, key_id
            signature         base64 Ed25519 signature of the metadata digest

The scheme is the registry's (``federation/registry.py``, ``federation/promotions.py``): the
signature covers ``b"fedmart-catalog-v1\\n" + sha256(canonical_json(metadata))``, the metadata
holds the sha256 of the file and the directory's own name, so a flipped byte anywhere, an
edited counter or a renamed directory fails :meth:`CatalogStore.verify`; loading also checks
that the Parquet's content digest is the signed ``catalog_version``. ``counter`` is one more
than the highest counter so far (under the registry's lock): the catalog to serve is the
valid one with the **highest counter**, and ``fedmart serve`` never goes back to a lower one
(a removed newest directory is a rollback it refuses, ``serving/catalog_view.py``). Whoever
holds the key goes back by publishing the older catalog again: a new, higher counter.

There is no unsigned way in: a catalog that is not published here (``fedmart registry
publish-catalog``, or a federated run, which publishes its own) is never served by a
catalog swap.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.catalog import Catalog, CatalogError
from privacy.audit import canonical_json
from privacy.signing import key_fingerprint, sign, verify

__all__ = ["CATALOG_FORMAT", "CatalogStore", "CatalogStoreError", "CatalogVersion", "catalog_signing_message"]

log = logging.getLogger(__name__)

CATALOG_FORMAT = "fedmart-catalog-v1"
CATALOGS = "catalogs"
CATALOG_FILE = "catalog.parquet"
METADATA = "metadata.json"
SIGNATURE = "signature"
_DIR_RE = re.compile(r"^c(\d{4,})-([0-9a-f]{16})$")


class CatalogStoreError(ValueError):
    """A catalog version is missing, unsigned, tampered with, or cannot be published."""


@dataclass(frozen=True)
class CatalogVersion:
    """A verified catalog version: its directory name, its signed metadata and the catalog."""

    name: str  # c<counter>-<catalog_version>
    metadata: dict[str, Any]
    catalog: Catalog

    @property
    def counter(self) -> int:
        return int(self.metadata["counter"])

    @property
    def version(self) -> str:
        """The content digest (``Catalog.version``)."""
        return str(self.metadata["catalog_version"])


def catalog_signing_message(metadata: dict[str, Any]) -> bytes:
    """The bytes a catalog version's signature covers: a domain tag and the metadata digest."""
    return f"{CATALOG_FORMAT}\n".encode() + hashlib.sha256(canonical_json(metadata).encode()).hexdigest().encode()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


class CatalogStore:
    """The signed catalog versions of the registry at ``root`` (under ``root/catalogs``).

    ``private_key`` signs :meth:`publish`; ``public_key`` is what :meth:`verify`, :meth:`load`
    and :meth:`newest` check against (the public half of ``private_key`` when not given).
    """

    def __init__(
        self,
        root: Path,
        *,
        private_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
    ) -> None:
        self.root = Path(root)
        self.dir = self.root / CATALOGS
        self._private_key = private_key
        self._public_key = public_key or (private_key.public_key() if private_key else None)

    # -- writing ----------------------------------------------------------------------------
    def publish(self, catalog: Catalog, *, by: str, if_new: bool = False) -> CatalogVersion:
        """Sign and store ``catalog`` as the newest catalog version; returns it.

        With ``if_new``, a catalog whose content is already the newest valid version is not
        published again (what a federated run does at its start); otherwise every call makes
        a new version with a higher counter (publishing an older catalog again is how the key
        holder goes back to it).
        """
        if self._private_key is None:
            raise CatalogStoreError("publishing a catalog needs the coordinator's signing key")
        if not by or not isinstance(by, str):
            raise ValueError("publish needs `by`: who publishes (a user or service name)")
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            newest = self._newest_valid()
            if if_new and newest is not None and newest.version == catalog.version:
                return newest
            counter = max((_counter_of(n) for n in self._dirs()), default=0) + 1
            name = f"c{counter:04d}-{catalog.version}"
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir))
            try:
                catalog.save(tmp / CATALOG_FILE)
                data = (tmp / CATALOG_FILE).read_bytes()
                added = removed = None
                if newest is not None:
                    old, new = set(newest.catalog.item_id.tolist()), set(catalog.item_id.tolist())
                    added, removed = len(new - old), len(old - new)
                metadata = json.loads(
                    canonical_json(
                        {
                            "format": CATALOG_FORMAT,
                            "name": name,
                            "counter": counter,
                            "catalog_version": catalog.version,
                            "parent": newest.version if newest is not None else None,
                            "parent_counter": newest.counter if newest is not None else None,
                            "items": catalog.num_items,
                            "items_added": added,
                            "items_removed": removed,
                            "by": by,
                            "created_at": _now(),
                            "files": {CATALOG_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
                            "key_id": key_fingerprint(self._private_key.public_key()),
                        }
                    )
                )
                signature = sign(self._private_key, catalog_signing_message(metadata))
                _write_synced(tmp / METADATA, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
                _write_synced(tmp / SIGNATURE, base64.b64encode(signature) + b"\n")
                os.chmod(tmp, 0o755)
                os.rename(tmp, self.dir / name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("published catalog %s (#%d, %d items) in %s", catalog.version, counter, catalog.num_items, self.dir)
        return CatalogVersion(name, metadata, catalog)

    # -- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Catalog version directories, lowest counter first (not verified)."""
        return sorted(self._dirs(), key=_counter_of)

    def show(self, name: str) -> dict[str, Any]:
        """A catalog version's metadata as stored (not verified)."""
        path = self._dir(name) / METADATA
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CatalogStoreError(f"catalog {name}: no {METADATA}") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise CatalogStoreError(f"catalog {name}: {METADATA} is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise CatalogStoreError(f"catalog {name}: {METADATA} is not a JSON object")
        return meta

    def load(self, name: str, public_key: Ed25519PublicKey | None = None) -> CatalogVersion:
        """The verified catalog version ``name``; :class:`CatalogStoreError` says why not."""
        meta = self._signed_metadata(name, public_key)
        d = self._dir(name)
        data = (d / CATALOG_FILE).read_bytes() if (d / CATALOG_FILE).is_file() else None
        if data is None:
            raise CatalogStoreError(f"catalog {name}: {CATALOG_FILE} is missing")
        recorded = ((meta.get("files") or {}).get(CATALOG_FILE) or {}).get("sha256")
        if hashlib.sha256(data).hexdigest() != recorded:
            raise CatalogStoreError(f"catalog {name}: {CATALOG_FILE} does not match its recorded sha256 (modified)")
        try:
            catalog = Catalog.load(d / CATALOG_FILE)
        except CatalogError as exc:
            raise CatalogStoreError(f"catalog {name}: {exc}") from exc
        if catalog.version != meta.get("catalog_version"):
            raise CatalogStoreError(f"catalog {name}: content digest {catalog.version} is not the signed one")
        return CatalogVersion(name, meta, catalog)

    def _signed_metadata(self, name: str, public_key: Ed25519PublicKey | None) -> dict[str, Any]:
        """``name``'s metadata if its signature verifies and it names its own directory."""
        key = public_key or self._public_key
        if key is None:
            raise CatalogStoreError("no public key to verify catalogs with: pass --public-key (the signer's .pub)")
        d = self._dir(name)
        meta = self.show(name)
        try:
            sig = base64.b64decode((d / SIGNATURE).read_bytes().strip(), validate=True)
        except FileNotFoundError as exc:
            raise CatalogStoreError(f"catalog {name}: unsigned (no {SIGNATURE} file)") from exc
        except ValueError as exc:
            raise CatalogStoreError(f"catalog {name}: {SIGNATURE} is not base64") from exc
        if not verify(key, catalog_signing_message(meta), sig):
            raise CatalogStoreError(
                f"catalog {name}: signature does not verify: metadata edited or signed by another key"
            )
        if meta.get("format") != CATALOG_FORMAT or meta.get("name") != name:
            raise CatalogStoreError(f"catalog {name}: metadata names {meta.get('name')!r} (directory renamed?)")
        counter = meta.get("counter")
        if isinstance(counter, bool) or not isinstance(counter, int) or counter != _counter_of(name):
            raise CatalogStoreError(f"catalog {name}: counter {counter!r} does not match the directory name")
        return meta

    def verify(self, name: str, public_key: Ed25519PublicKey | None = None) -> tuple[bool, str]:
        """(True, "...") iff ``name`` verifies (signature, file digest, content digest)."""
        try:
            self.load(name, public_key)
        except CatalogStoreError as exc:
            return False, str(exc)
        return True, "signature valid, file and content digests match"

    def newest(self, public_key: Ed25519PublicKey | None = None) -> tuple[CatalogVersion | None, dict[str, str]]:
        """(the catalog version to serve, or None; {name: why refused}).

        The candidate is the directory with the highest counter whose signed metadata verifies
        (directories whose signature fails are refused and passed over, as unsigned promotion
        records are). If the candidate's file then fails its digests, there is no catalog to
        serve: an older one is never taken instead, since that would be a rollback by whoever
        can break a file.
        """
        refused: dict[str, str] = {}
        for name in reversed(self.names()):
            try:
                self._signed_metadata(name, public_key)
            except CatalogStoreError as exc:
                refused[name] = str(exc).removeprefix(f"catalog {name}: ")
                continue
            try:
                return self.load(name, public_key), refused
            except CatalogStoreError as exc:
                refused[name] = str(exc).removeprefix(f"catalog {name}: ")
                return None, refused
        return None, refused

    def find(self, catalog_version: str, public_key: Ed25519PublicKey | None = None) -> CatalogVersion | None:
        """The newest valid version whose content digest is ``catalog_version``, or None."""
        for name in reversed(self.names()):
            if name.endswith(f"-{catalog_version}"):
                try:
                    return self.load(name, public_key)
                except CatalogStoreError as exc:
                    log.warning("catalog %s: %s", name, exc)
        return None

    # -- internals ----------------------------------------------------------------------------
    def _newest_valid(self) -> CatalogVersion | None:
        return self.newest()[0] if self._public_key is not None else None

    def _dir(self, name: str) -> Path:
        if not isinstance(name, str) or not _DIR_RE.match(name):
            raise CatalogStoreError(f"{name!r} is not a catalog version name (like c0001-3fa2c9d04b1e7a66)")
        d = self.dir / name
        if not d.is_dir():
            raise CatalogStoreError(f"catalog {name}: no such catalog version in {self.dir}")
        return d

    def _dirs(self) -> Iterator[str]:
        if not self.dir.is_dir():
            return iter(())
        return (p.name for p in self.dir.iterdir() if p.is_dir() and _DIR_RE.match(p.name))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_WRONLY | os.O_CREAT, 0o644)  # the registry's own lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _counter_of(name: str) -> int:
    m = _DIR_RE.match(name)
    return int(m.group(1)) if m else -1


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
