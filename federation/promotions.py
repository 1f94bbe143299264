"""Signed, counted promotions: which model version to serve, and proof that nobody rolled it back.

Each line of ``promotions.jsonl`` is one record::

    {"event": "promotion", "format": "fedmart-promotion-v1", "counter": 3, "version": "v0007-r7-…",
     "by": "alice", "at": "…", "weights_sha256": "…", "round": 7, "run": "…", "previous": "v0005-r5-…",
     "key_id": "…", "signature": "<base64 Ed25519>"}

``signature`` covers ``b"fedmart-promotion-v1\\n" + sha256(canonical_json(record without signature))``,
so an edited counter, version or signer fails; ``counter`` is one more than the highest
valid counter before it. The promotion that counts is the valid one with the **highest
counter**, not the last line: reordering lines changes nothing, and removing the newest
lines (a rollback) leaves a counter lower than one a server has already served, which
``fedmart serve`` refuses (``serving/policy.py``). Whoever holds the signing key rolls
back by promoting the older version again: a new record with a higher counter.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.audit import canonical_json
from privacy.signing import key_fingerprint, sign, verify

__all__ = ["PROMOTION_FORMAT", "Promotions", "promotion_message", "read_promotions", "signed_promotion"]

log = logging.getLogger(__name__)

PROMOTION_FORMAT = "fedmart-promotion-v1"
SIGNATURE_FIELD = "signature"


def promotion_message(record: dict[str, Any]) -> bytes:
    """The bytes a promotion's signature covers: a domain tag and the digest of the record without it."""
    body = {k: v for k, v in record.items() if k != SIGNATURE_FIELD}
    return f"{PROMOTION_FORMAT}\n".encode() + hashlib.sha256(canonical_json(body).encode()).hexdigest().encode()


def signed_promotion(private_key: Ed25519PrivateKey, fields: dict[str, Any], counter: int) -> dict[str, Any]:
    """``fields`` (version, by, at, ...) as a record with ``counter``, the signer's key id and a signature."""
    record = json.loads(
        canonical_json(
            {
                "event": "promotion",
                **fields,
                "format": PROMOTION_FORMAT,
                "counter": int(counter),
                "key_id": key_fingerprint(private_key.public_key()),
            }
        )
    )
    record[SIGNATURE_FIELD] = base64.b64encode(sign(private_key, promotion_message(record))).decode()
    return record


def _check(record: dict[str, Any], public_key: Ed25519PublicKey) -> str | None:
    """Why ``record`` is not a valid promotion by ``public_key``'s holder, or None."""
    if SIGNATURE_FIELD not in record:
        return "unsigned promotion (no signature): not written by `fedmart registry promote`"
    try:
        sig = base64.b64decode(str(record[SIGNATURE_FIELD]), validate=True)
    except ValueError:
        sig = b""
    if not verify(public_key, promotion_message(record), sig):
        return "promotion signature does not verify: the record was edited or signed by another key"
    if record.get("format") != PROMOTION_FORMAT:
        return f"promotion format {record.get('format')!r}, expected {PROMOTION_FORMAT!r}"
    counter = record.get("counter")
    if isinstance(counter, bool) or not isinstance(counter, int) or counter < 1:
        return f"promotion counter {counter!r} is not a positive integer"
    if not isinstance(record.get("version"), str):
        return "promotion names no version"
    return None


@dataclass(frozen=True)
class Promotions:
    """``promotions.jsonl`` read against one public key: the valid records and the refused lines."""

    valid: list[dict[str, Any]] = field(default_factory=list)  # file order
    refused: dict[int, str] = field(default_factory=dict)  # 1-based line -> reason

    @property
    def highest_counter(self) -> int:
        return max((int(r.get("counter") or 0) for r in self.valid), default=0)

    def newest(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the valid record with the highest counter, None), or (None, why there is none to serve)."""
        if not self.valid:
            return None, ("no signed promotion" if not self.refused else "no promotion with a valid signature")
        top = self.highest_counter
        at_top = [r for r in self.valid if int(r.get("counter") or 0) == top]
        if len({r["version"] for r in at_top}) > 1:
            names = ", ".join(sorted({r["version"] for r in at_top}))
            return None, f"promotions {names} carry the same counter {top}: promotions.jsonl was cut and re-promoted"
        return at_top[-1], None


def read_promotions(path: Path, public_key: Ed25519PublicKey | None) -> Promotions:
    """Parse ``path``; with ``public_key``, keep only records whose signature verifies (others in ``refused``).

    Without a key every parseable record is returned unchecked (for listings only).
    """
    out = Promotions()
    if not path.is_file():
        return out
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("version"), str):
                raise ValueError("no version")
        except ValueError as exc:
            out.refused[n] = f"not a promotion record ({exc})"
            log.warning("%s line %d is not a promotion record (%s); ignored", path, n, exc)
            continue
        reason = _check(rec, public_key) if public_key is not None else None
        if reason:
            out.refused[n] = f"{rec['version']}: {reason}"
            continue
        out.valid.append(rec)
    return out
