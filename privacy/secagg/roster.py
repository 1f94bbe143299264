"""The roster: the federation's members and their Ed25519 keys, a trust anchor the coordinator cannot forge.

Every department makes its own Ed25519 key pair (``fedmart roster key``) and sends only the
public half to whoever assembles the roster (``fedmart roster make``); the roster file is then
handed to every node **out of band**, as the CA certificate is, and each node checks its
SHA-256 digest against the one its operators agreed on. A node reads the roster from its own
configuration (``fedmart node --roster``; in simulation, from ``fedmart simulate``, which makes a
fresh roster and keys per run), never from a message: so the coordinator can neither add a
member nor swap a member's key without every node noticing (a signature under an unknown or
swapped key does not verify against the node's copy).

What a roster proves: a statement signed under a member's key was made by whoever holds that
member's private key. It does not prove the member is honest: the active-adversary guarantee
assumes fewer than a third of the members collude with the coordinator (docs/secagg.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.signing import key_fingerprint, load_private_key, sign, verify

__all__ = ["RosterMember", "Roster", "RosterKey", "RosterError", "make_roster"]

ROSTER_VERSION = 1


class RosterError(ValueError):
    """A roster file or a roster key is missing, malformed, or does not belong together."""


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class RosterMember:
    """One member: its name, its raw 32-byte Ed25519 public key and that key's fingerprint."""

    name: str
    public_key: bytes
    fingerprint: str

    def __post_init__(self) -> None:
        if len(self.public_key) != 32:
            raise RosterError(f"roster member {self.name!r}: an Ed25519 public key has 32 bytes")
        expected = key_fingerprint(Ed25519PublicKey.from_public_bytes(self.public_key))
        if self.fingerprint != expected:
            raise RosterError(
                f"roster member {self.name!r}: fingerprint {self.fingerprint} is not its key's {expected}"
            )


@dataclass(frozen=True)
class Roster:
    """The members, by fingerprint. ``digest`` names this exact roster (compare it out of band)."""

    members: tuple[RosterMember, ...]

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise RosterError("a roster needs at least 2 members")
        fps = [m.fingerprint for m in self.members]
        names = [m.name for m in self.members]
        if len(set(fps)) != len(fps) or len(set(names)) != len(names):
            raise RosterError("roster members must have distinct names and keys")

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._keys()

    def member(self, fingerprint: str) -> RosterMember:
        """The member with this key fingerprint; ``RosterError`` if there is none."""
        for m in self.members:
            if m.fingerprint == fingerprint:
                return m
        raise RosterError(f"key {fingerprint} is not in the roster")

    def verify(self, fingerprint: str, data: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is the roster member ``fingerprint``'s signature of ``data``."""
        key = self._keys().get(fingerprint)
        return key is not None and verify(key, data, signature)

    def _keys(self) -> dict[str, Ed25519PublicKey]:
        keys = self.__dict__.get("_key_cache")
        if keys is None:  # loaded once: a frozen dataclass may still cache in its __dict__
            keys = {m.fingerprint: Ed25519PublicKey.from_public_bytes(m.public_key) for m in self.members}
            object.__setattr__(self, "_key_cache", keys)
        return keys

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON (hex): what operators compare out of band."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        members = sorted(self.members, key=lambda m: m.name)
        body = {
            "version": ROSTER_VERSION,
            "members": [
                {"name": m.name, "public_key": m.public_key.hex(), "fingerprint": m.fingerprint} for m in members
            ],
        }
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write atomically, world-readable (it holds public keys only)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(self.to_json())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_mapping(cls, values: Mapping) -> Roster:
        if values.get("version") != ROSTER_VERSION or not isinstance(values.get("members"), list):
            raise RosterError(f"not a version-{ROSTER_VERSION} fedmart roster")
        try:
            members = tuple(
                RosterMember(str(m["name"]), bytes.fromhex(m["public_key"]), str(m["fingerprint"]))
                for m in values["members"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RosterError(f"malformed roster member ({exc})") from exc
        return cls(members)

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        """Read a roster file; ``RosterError`` names the file when it cannot."""
        p = Path(path)
        try:
            return cls.from_mapping(json.loads(p.read_text()))
        except OSError as exc:
            raise RosterError(f"roster {p}: cannot be read ({exc.strerror})") from exc
        except (json.JSONDecodeError, RosterError) as exc:
            raise RosterError(f"roster {p}: {exc}") from exc


def make_roster(members: Iterable[tuple[str, Ed25519PublicKey]]) -> Roster:
    """A roster of ``(name, public key)`` pairs."""
    return Roster(tuple(RosterMember(n, _raw(k), key_fingerprint(k)) for n, k in members))


@dataclass(frozen=True)
class RosterKey:
    """A node's own roster key: what it signs its secure-aggregation keys and survivor sets with."""

    private_key: Ed25519PrivateKey

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.private_key.public_key())

    def sign(self, data: bytes) -> bytes:
        return sign(self.private_key, data)

    @classmethod
    def load(cls, path: str | Path, roster: Roster) -> RosterKey:
        """The node's private key (0600 PEM), which must be a member of ``roster`` (checked at join)."""
        try:
            key = cls(load_private_key(path))
        except ValueError as exc:
            raise RosterError(str(exc)) from exc
        if key.fingerprint not in roster:
            raise RosterError(
                f"{path}: this node's roster key {key.fingerprint} is not in the roster (digest {roster.digest[:16]}); "
                "send its .pub to whoever assembles the roster"
            )
        return key
