"""Ed25519 signatures: small bytes-to-bytes functions and the key files they need.

The private key lives in a PEM file (PKCS#8, unencrypted) readable by its owner
only (0600, in a 0700 directory); its public half is exported beside it as
``<name>.pub`` (SubjectPublicKeyInfo PEM) and is the only thing a verifier needs.
Keys are never written into config files: the config names their *paths*.

What a signature proves: the signed bytes were produced by whoever holds the
private key. It says nothing about whether that holder should be trusted, and
the public key must reach the verifier by a channel an attacker cannot write to
(not the directory that holds the signed files).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KeyFileError",
    "load_keypair",
    "load_or_create_keypair",
    "load_private_key",
    "load_public_key",
    "export_public_key",
    "public_key_path_for",
    "key_fingerprint",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

SIGNATURE_BYTES = 64


class KeyFileError(ValueError):
    """A key file is missing, unreadable, of the wrong type, or too widely readable."""


def public_key_path_for(private_key_path: str | Path) -> Path:
    """Where the public half of ``private_key_path`` is exported: ``<path>.pub``."""
    p = Path(private_key_path)
    return p.with_name(p.name + ".pub")


def load_keypair(private_key_path: str | Path) -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """Load the Ed25519 key at ``private_key_path``; a missing file is a :class:`KeyFileError`, never a new key.

    What the coordinator (``fedmart coordinate``), ``fedmart registry promote`` and a
    deployed ServerApp use: a mistyped path must not start a second signer whose
    versions nobody can verify. The public key is (re)exported to ``<path>.pub`` when
    that file is missing.
    """
    path = Path(private_key_path)
    private = load_private_key(path)
    public = private.public_key()
    pub_path = public_key_path_for(path)
    if not pub_path.exists():
        export_public_key(public, pub_path)
    return private, public


def load_or_create_keypair(private_key_path: str | Path) -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """Load the Ed25519 key at ``private_key_path``, creating it (0600, parent 0700) on first use.

    Only for what may make a key (``fedmart simulate``, a local ``flwr run .``, tests):
    everything else calls :func:`load_keypair`. Creation is exclusive (``O_EXCL``): two
    processes racing to create the key end up sharing the one that won. The public key
    is (re)exported to ``<path>.pub`` when that file is missing.
    """
    path = Path(private_key_path)
    if not path.exists():
        _create_private_key(path)
    return load_keypair(path)


def _create_private_key(path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)  # mkdir's mode is masked by the umask
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process created it first: use theirs
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created Ed25519 signing key %s (public key %s)", path, public_key_path_for(path))


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; refuse one that group or others can read."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{path}: private key not found")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path}: private key is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: is a {type(key).__name__}, an Ed25519 private key is needed")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a PEM (SubjectPublicKeyInfo) Ed25519 public key, e.g. a ``.pub`` file written here."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{path}: public key not found")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: is a {type(key).__name__}, an Ed25519 public key is needed")
    return key


def export_public_key(public_key: Ed25519PublicKey, path: str | Path) -> Path:
    """Write ``public_key`` as PEM to ``path`` (world-readable: it is public)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = public_key.public_bytes(
        encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw 32-byte public key: names the key in metadata."""
    raw = public_key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return private_key.sign(bytes(data))


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is ``public_key``'s valid signature of ``data``; never raises on bad input."""
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        public_key.verify(bytes(signature), bytes(data))
    except InvalidSignature:
        return False
    return True
