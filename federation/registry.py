"""The model registry: signed, immutable model versions and explicit promotions.

Layout under ``root``::

    v0001-r1-3fa2c9d0/
        weights.safetensors   the global model's weights
        popularity.npy        optional: (num_items + 1,) item counts for the cold-start fallback
        metadata.json         run, round, config and catalog hashes, model config, metrics,
                              privacy report, parent, created_at, sha256 of every file above
        signature             base64 Ed25519 signature of the metadata digest
    promotions.jsonl          one signed line per `promote`, with a counter (federation/promotions.py)
    catalogs/                 signed catalog versions, with a counter (federation/catalogs.py)

A version id is ``v<seq>-r<round>-<first 8 hex of the weights' sha256>``; ``seq``
(at least four digits) orders versions and :meth:`ModelRegistry.list` sorts by it
numerically. A version directory is written under a temporary name and renamed
into place, so a reader never sees half a version.

What is signed: ``b"fedmart-model-v1\\n" + sha256(canonical_json(metadata))``. The
metadata holds the sha256 of each file and the version id itself, so one flipped
byte in a file, the metadata, or a renamed directory fails :meth:`verify`.
Promotions are signed by the same key and carry a monotonic counter
(:mod:`federation.promotions`): an edited, unsigned or reordered record changes
nothing, and a cut-off newest record leaves a counter that goes backwards.

The signing key is loaded, never created, unless ``create_key=True`` (what only
``fedmart simulate`` and a local ``flwr run .`` ask for): a wrong path is an error.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from federation.catalogs import CatalogStore
from federation.promotions import Promotions, read_promotions, signed_promotion
from privacy.audit import canonical_json
from privacy.signing import key_fingerprint, load_keypair, load_or_create_keypair, load_public_key, sign, verify

__all__ = ["ModelRegistry", "RegistryError", "VersionInfo", "signing_message", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = "fedmart-model-v1"
WEIGHTS = "weights.safetensors"
POPULARITY = "popularity.npy"
METADATA = "metadata.json"
SIGNATURE = "signature"
PROMOTIONS = "promotions.jsonl"
_VERSION_RE = re.compile(r"^v(\d{4,})-r(\d+)-([0-9a-f]{8})$")


class RegistryError(ValueError):
    """A version is missing, unverifiable, or an operation on the registry is not possible."""


@dataclass(frozen=True)
class VersionInfo:
    """One row of :meth:`ModelRegistry.list` (read from metadata, not verified)."""

    version: str
    seq: int
    run: str
    round: int
    created_at: str
    parent: str | None
    catalog_version: str
    metrics: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False


def signing_message(metadata: dict[str, Any]) -> bytes:
    """The bytes a version's signature covers: a domain tag and the metadata digest."""
    return f"{FORMAT}\n".encode() + hashlib.sha256(canonical_json(metadata).encode()).hexdigest().encode()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


class ModelRegistry:
    """Signed model versions under ``root``.

    ``private_key_path`` (or an already loaded ``private_key``): needed to :meth:`publish`
    and :meth:`promote`; a missing file is a :class:`~privacy.signing.KeyFileError` unless
    ``create_key`` (then it is created, see :func:`privacy.signing.load_or_create_keypair`).
    ``public_key_path``: the key :meth:`verify` checks against; without it, the public half
    of the private key.
    """

    def __init__(
        self,
        root: Path,
        *,
        private_key_path: Path | None = None,
        public_key_path: Path | None = None,
        private_key: Ed25519PrivateKey | None = None,
        create_key: bool = False,
    ) -> None:
        self.root = Path(root)
        self._private_key: Ed25519PrivateKey | None = private_key
        self._public_key: Ed25519PublicKey | None = private_key.public_key() if private_key else None
        if private_key_path is not None:
            load = load_or_create_keypair if create_key else load_keypair
            self._private_key, self._public_key = load(private_key_path)
        if public_key_path is not None:
            public = load_public_key(public_key_path)
            if self._public_key is not None and key_fingerprint(public) != key_fingerprint(self._public_key):
                raise RegistryError(
                    f"{public_key_path} is not the public half of {private_key_path}: pass the matching pair"
                )
            self._public_key = public

    @property
    def public_key(self) -> Ed25519PublicKey | None:
        return self._public_key

    @property
    def catalogs(self) -> CatalogStore:
        """The registry's signed catalog versions (``federation/catalogs.py``), under the same keys."""
        return CatalogStore(self.root, private_key=self._private_key, public_key=self._public_key)

    @property
    def signing_key(self) -> Ed25519PrivateKey | None:
        """The private key this registry publishes and promotes with (also signs the audit entry of a promotion)."""
        return self._private_key

    # -- writing ----------------------------------------------------------------------------
    def publish(
        self,
        weights: dict[str, np.ndarray],
        *,
        run: str,
        round: int,
        config_hash: str,
        catalog_version: str,
        model_config: dict,
        metrics: dict,
        privacy: dict,
        parent: str | None,
        popularity: np.ndarray | None = None,
        audit_head: tuple[int, str] | None = None,
        origin: dict[str, Any] | None = None,
    ) -> str:
        """Store, sign and return a new version id.

        ``popularity``: optional (num_items + 1,) or (num_items,) non-negative counts
        for the cold-start fallback of ``fedmart serve`` (it must itself be private
        enough to publish, e.g. DP-noised). ``audit_head``: ``AuditLog.head`` at
        publish time, anchoring the audit log in the signed metadata. ``origin``: where the
        run's starting model came from (``federation.init``: the version, its registry and key
        fingerprint, ``federation/init_model.py``), signed into the metadata when given.
        """
        if self._private_key is None:
            raise RegistryError("publishing needs a signing key: ModelRegistry(root, private_key_path=...)")
        if not weights:
            raise ValueError("weights is empty")
        if int(round) < 0:
            raise ValueError(f"round must be >= 0, not {round}")
        if parent is not None and not (self.root / parent).is_dir():
            raise RegistryError(f"parent version {parent!r} is not in {self.root}")
        blob = save_safetensors_bytes({k: np.ascontiguousarray(v) for k, v in weights.items()})
        files = {WEIGHTS: blob}
        if popularity is not None:
            pop = np.asarray(popularity, dtype=np.float64)
            if pop.ndim != 1 or not np.all(np.isfinite(pop)) or np.any(pop < 0):
                raise ValueError("popularity must be a 1-d array of finite non-negative counts")
            buf = io.BytesIO()
            np.save(buf, pop, allow_pickle=False)
            files[POPULARITY] = buf.getvalue()
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            seq = max((_seq_of(v) for v in self._version_dirs()), default=0) + 1
            version = f"v{seq:04d}-r{int(round)}-{digests[WEIGHTS][:8]}"
            metadata: dict[str, Any] = {
                "format": FORMAT,
                "version": version,
                "seq": seq,
                "run": str(run),
                "round": int(round),
                "created_at": _now(),
                "parent": parent,
                "config_hash": str(config_hash),
                "catalog_version": str(catalog_version),
                "model_config": model_config,
                "metrics": metrics,
                "privacy": privacy,
                "weights_sha256": digests[WEIGHTS],
                "files": {name: {"sha256": d, "bytes": len(files[name])} for name, d in digests.items()},
                "key_id": key_fingerprint(self._private_key.public_key()),
                "audit_head": {"seq": audit_head[0], "hash": audit_head[1]} if audit_head else None,
            }
            if origin is not None:
                metadata["origin"] = origin
            metadata = json.loads(canonical_json(metadata))  # strict JSON: what is signed is what is read back
            signature = sign(self._private_key, signing_message(metadata))
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                for name, data in files.items():
                    _write_synced(tmp / name, data)
                _write_synced(tmp / METADATA, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
                _write_synced(tmp / SIGNATURE, base64.b64encode(signature) + b"\n")
                os.chmod(tmp, 0o755)
                os.rename(tmp, self.root / version)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("published %s (run %s, round %d) in %s", version, run, int(round), self.root)
        return version

    def promote(self, version: str, by: str) -> dict[str, Any]:
        """Mark ``version`` for serving; refuse one that does not verify. Returns the signed record written.

        Its counter is one more than the highest valid counter so far (under the registry's lock).
        """
        if not by or not isinstance(by, str):
            raise ValueError("promote needs `by`: who promotes (a user or service name)")
        if self._private_key is None:
            raise RegistryError("promoting needs the signing key: pass --signing-key (the coordinator's private key)")
        ok, reason = self.verify(version)
        if not ok:
            raise RegistryError(f"refusing to promote {version}: {reason}")
        meta = self.show(version)
        with self._locked():
            so_far = self.promotions()
            current, _ = so_far.newest()
            fields = {
                "version": version,
                "by": by,
                "at": _now(),
                "weights_sha256": meta["weights_sha256"],
                "round": meta["round"],
                "run": meta["run"],
                "previous": current["version"] if current else None,
            }
            record = signed_promotion(self._private_key, fields, so_far.highest_counter + 1)
            fd = os.open(self.root / PROMOTIONS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (canonical_json(record) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        log.info("promoted %s (by %s)", version, by)
        return record

    # -- reading ----------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Version ids, oldest first."""
        return sorted(self._version_dirs(), key=_seq_of)

    def list(self) -> list[VersionInfo]:
        """Every version's summary, oldest first (metadata as stored; see :meth:`verify`)."""
        promoted = {r["version"] for r in self.promoted()}
        out = []
        for v in self.versions():
            try:
                m = self.show(v)
            except RegistryError as exc:
                log.warning("skipping %s: %s", v, exc)
                continue
            out.append(
                VersionInfo(
                    version=v,
                    seq=int(m.get("seq", _seq_of(v))),
                    run=str(m.get("run", "")),
                    round=int(m.get("round", -1)),
                    created_at=str(m.get("created_at", "")),
                    parent=m.get("parent"),
                    catalog_version=str(m.get("catalog_version", "")),
                    metrics=dict(m.get("metrics") or {}),
                    promoted=v in promoted,
                )
            )
        return out

    def show(self, version: str) -> dict[str, Any]:
        """A version's metadata as stored (not verified)."""
        path = self._dir(version) / METADATA
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise RegistryError(f"{version}: no {METADATA}") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{version}: {METADATA} is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise RegistryError(f"{version}: {METADATA} is not a JSON object")
        return meta

    def verify(self, version: str, public_key: Ed25519PublicKey | None = None) -> tuple[bool, str]:
        """(True, "...") iff the version's files match its metadata and the signature verifies."""
        try:
            self._verified(version, public_key, read_files=False)
        except RegistryError as exc:
            return False, str(exc)
        return True, "signature valid, files match their recorded sha256"

    def promoted(self) -> list[dict[str, Any]]:
        """Promotion records as written, oldest first, signatures unchecked (for listings; see :meth:`promotions`)."""
        return read_promotions(self.root / PROMOTIONS, None).valid

    def promotions(self, public_key: Ed25519PublicKey | None = None) -> Promotions:
        """Promotion records whose signature verifies with ``public_key`` (default: the registry's key)."""
        key = public_key or self._public_key
        if key is None:
            raise RegistryError("no public key to verify promotions with: pass --public-key (the signer's .pub file)")
        return read_promotions(self.root / PROMOTIONS, key)

    def latest_promoted_verified(self, public_key: Ed25519PublicKey | None = None) -> str | None:
        """The version of the newest signed promotion (highest counter), if it verifies; else None, with a warning.

        "Newest" is by promotion, not by version number: promoting an older version is a
        rollback by the key holder. A newest promotion that fails is never replaced by an
        older one: that would be a rollback by whoever can break a file.
        """
        record, why = self.promotions(public_key).newest()
        if record is None:
            if why:
                log.warning("nothing promoted to serve: %s", why)
            return None
        ok, reason = self.verify(record["version"], public_key)
        if ok:
            return str(record["version"])
        log.warning("promoted version %s refused: %s", record["version"], reason)
        return None

    def load(
        self, version: str, public_key: Ed25519PublicKey | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Verified weights and metadata. The bytes checked are the bytes loaded (no re-read)."""
        files, meta = self._verified(version, public_key, read_files=True)
        weights = load_safetensors_bytes(files[WEIGHTS])
        return weights, meta

    def load_popularity(self, version: str, public_key: Ed25519PublicKey | None = None) -> np.ndarray | None:
        """The verified popularity counts of ``version``, or None if it was published without them."""
        files, _ = self._verified(version, public_key, read_files=True, only=(POPULARITY,))
        if POPULARITY not in files:
            return None
        return np.load(io.BytesIO(files[POPULARITY]), allow_pickle=False)

    # -- internals ----------------------------------------------------------------------------
    def _verified(
        self,
        version: str,
        public_key: Ed25519PublicKey | None,
        *,
        read_files: bool,
        only: tuple[str, ...] | None = None,
    ) -> tuple[dict[str, bytes], dict[str, Any]]:
        key = public_key or self._public_key
        if key is None:
            raise RegistryError("no public key to verify with: pass --public-key (the signer's .pub file)")
        d = self._dir(version)
        meta = self.show(version)
        try:
            sig = base64.b64decode((d / SIGNATURE).read_bytes().strip(), validate=True)
        except FileNotFoundError as exc:
            raise RegistryError(f"{version}: unsigned (no {SIGNATURE} file)") from exc
        except ValueError as exc:
            raise RegistryError(f"{version}: {SIGNATURE} is not base64") from exc
        if not verify(key, signing_message(meta), sig):
            raise RegistryError(f"{version}: signature does not verify: metadata edited or signed by another key")
        if meta.get("format") != FORMAT or meta.get("version") != version:
            raise RegistryError(f"{version}: metadata names version {meta.get('version')!r} (directory renamed?)")
        recorded = meta.get("files") or {}
        if WEIGHTS not in recorded or recorded[WEIGHTS].get("sha256") != meta.get("weights_sha256"):
            raise RegistryError(f"{version}: metadata records no weights digest")
        out: dict[str, bytes] = {}
        for name, info in recorded.items():
            path = d / name
            if not path.is_file():
                raise RegistryError(f"{version}: {name} is missing")
            if read_files and (only is None or name in only):
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                out[name] = data
            else:
                digest = _sha256_file(path)
            if digest != info.get("sha256"):
                raise RegistryError(f"{version}: {name} does not match its recorded sha256 (file modified)")
        return out, meta

    def _dir(self, version: str) -> Path:
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise RegistryError(f"{version!r} is not a version id (like v0001-r3-1a2b3c4d)")
        d = self.root / version
        if not d.is_dir():
            raise RegistryError(f"{version}: no such version in {self.root}")
        return d

    def _version_dirs(self) -> Iterator[str]:
        if not self.root.is_dir():
            return iter(())
        return (p.name for p in self.root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _seq_of(version: str) -> int:
    m = _VERSION_RE.match(version)
    return int(m.group(1)) if m else -1


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
