"""An append-only, hash-chained JSONL audit log.

Every line is one entry, a JSON object in canonical form (sorted keys, no
whitespace) with

* ``seq``: 1, 2, 3, ... (line ``n`` holds ``seq == n``),
* ``ts``: UTC time of the append, ISO 8601 with microseconds,
* ``event``: what happened (``run_start``, ``round_end``, ``promotion``, ...),
* the event's own fields,
* ``prev``: the ``hash`` of the previous entry (:data:`GENESIS` for the first),
* ``hash``: SHA-256 over the canonical JSON of the entry without ``hash``.

So an edited entry fails its own hash; a removed, inserted or reordered entry
breaks the ``prev`` link or the ``seq`` count of the line after it. What a bare
hash chain cannot show: someone who rewrites the file and recomputes every hash
after the edit, or who cuts entries off the end. Against the first, pass a
private key: each entry then also carries an Ed25519 ``sig`` over its hash,
checked with the public key. Against the second, anchor the head
elsewhere: pass :attr:`AuditLog.head` to ``ModelRegistry.publish(audit_head=...)``
and each signed model version records it.

Appends are serialised with a process lock and an ``flock`` on the file, and each
line is ``fsync``-ed before :meth:`AuditLog.append` returns. Reopening a log
continues its chain (after checking it).
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.signing import sign, verify

__all__ = [
    "AuditLog",
    "AuditError",
    "AuditVerification",
    "verify_audit",
    "GENESIS",
    "KNOWN_EVENTS",
    "canonical_json",
]

log = logging.getLogger(__name__)

GENESIS = hashlib.sha256(b"fedmart audit log v1 genesis").hexdigest()
# The events a federated run logs (not enforced: any name of letters, digits, '_', '.' is accepted).
KNOWN_EVENTS = (
    "run_start",
    "run_end",
    "round_start",
    "round_end",
    "nodes_sampled",
    "node_replied",
    "node_declined",
    "node_dropped",
    "node_rejected",
    "node_epsilon",
    "model_published",
    "promotion",
)
_RESERVED = frozenset({"seq", "ts", "event", "prev", "hash", "sig"})


class AuditError(RuntimeError):
    """The audit log cannot be appended to (broken chain, incomplete last line, bad event)."""


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept, non-finite floats as strings: one text per value."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _plain(obj: Any) -> Any:
    """Make ``obj`` strict JSON: numpy scalars/arrays to Python, inf/nan to strings, paths to str."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)  # "inf", "-inf", "nan"
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return _plain(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"audit fields must be JSON values, got {type(obj).__name__}")


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of :func:`verify_audit`; ``bad_line`` is 1-based, ``None`` when ``ok``."""

    ok: bool
    entries: int
    bad_line: int | None
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class AuditLog:
    """Append-only hash-chained JSONL log at ``path`` (created on first append).

    ``private_key``: sign every entry's hash (``sig``), so a rewrite with
    recomputed hashes is caught by ``verify_audit(path, public_key=...)``.
    Opening an existing log checks its whole chain and refuses to extend a broken one.
    """

    def __init__(self, path: str | Path, *, private_key: Ed25519PrivateKey | None = None) -> None:
        self.path = Path(path)
        self._private_key = private_key
        self._lock = threading.Lock()
        self._seq, self._head = 0, GENESIS
        if self.path.exists():
            self._seq, self._head = self._tail()

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry; (0, GENESIS) for an empty log."""
        return self._seq, self._head

    def _tail(self) -> tuple[int, str]:
        result = verify_audit(self.path)
        if not result.ok:
            raise AuditError(
                f"{self.path}: audit log is broken at line {result.bad_line} ({result.reason}); "
                "it will not be extended: keep it as evidence and start a new log"
            )
        if result.entries == 0:
            return 0, GENESIS
        last = _last_line(self.path)
        entry = json.loads(last)
        return int(entry["seq"]), str(entry["hash"])

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry and return it (with ``seq``, ``ts``, ``prev``, ``hash``)."""
        if not isinstance(event, str) or not event or not event.replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"event must be a non-empty name of letters, digits, '_' or '.', not {event!r}")
        clash = _RESERVED & fields.keys()
        if clash:
            raise ValueError(f"audit fields {sorted(clash)} are reserved; rename them")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._catch_up()
                entry = {
                    **{k: _plain(v) for k, v in fields.items()},
                    "seq": self._seq + 1,
                    "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
                    "event": event,
                    "prev": self._head,
                }
                entry["hash"] = _entry_hash(entry)
                if self._private_key is not None:
                    entry["sig"] = base64.b64encode(sign(self._private_key, entry["hash"].encode())).decode()
                line = (canonical_json(entry) + "\n").encode()
                os.write(fd, line)
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            self._seq, self._head = entry["seq"], entry["hash"]
        return entry

    def _catch_up(self) -> None:
        """Another writer (process) may have appended since we last looked: continue after its entry."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        last = _last_line(self.path)
        try:
            entry = json.loads(last)
            seq, head = int(entry["seq"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"{self.path}: last line is not an audit entry ({exc}); run `fedmart audit verify`"
            ) from exc
        self._seq, self._head = seq, head


def _last_line(path: Path) -> str:
    """The last line of ``path`` (read from the end); raises if the file does not end in a newline."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        block, data = 4096, b""
        while size > 0:
            step = min(block, size)
            size -= step
            f.seek(size)
            data = f.read(step) + data
            if data.count(b"\n") >= 2 or size == 0:
                break
    if not data.endswith(b"\n"):
        raise AuditError(f"{path}: the last line is incomplete (a crash during a write?); run `fedmart audit verify`")
    return data.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode()


def verify_audit(path: str | Path, *, public_key: Ed25519PublicKey | None = None) -> AuditVerification:
    """Check every entry's hash, its link to the one before, and its ``seq``.

    With ``public_key`` every entry must also carry a valid signature of its hash.
    Reports the first bad line (1-based) and why.
    """
    path = Path(path)
    if not path.is_file():
        return AuditVerification(False, 0, None, f"{path}: no audit log there")
    prev, n = GENESIS, 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            entry, reason = _check_line(raw, n + 1, prev, public_key)
            if reason:
                return AuditVerification(False, n, lineno, reason)
            prev, n = entry["hash"], n + 1
    return AuditVerification(True, n, None, f"{n} entries, chain intact")


def _check_line(
    raw: bytes, seq: int, prev: str, public_key: Ed25519PublicKey | None
) -> tuple[dict[str, Any], str | None]:
    """(entry, None) if ``raw`` is a sound entry number ``seq`` chaining to ``prev``, else (_, reason)."""
    if not raw.endswith(b"\n"):
        return {}, "incomplete last line (no newline): the write was cut off or the file was edited"
    try:
        text = raw[:-1].decode("utf-8")
        entry = json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        return {}, f"not a JSON line ({exc})"
    if not isinstance(entry, dict):
        return {}, "not a JSON object"
    missing = [k for k in ("seq", "ts", "event", "prev", "hash") if k not in entry]
    if missing:
        return entry, f"missing {missing}"
    if canonical_json(entry) != text:
        return entry, "not in canonical form: the line was edited by hand"
    if entry["hash"] != _entry_hash(entry):
        return entry, "entry hash mismatch: the entry was edited"
    if entry["seq"] != seq:
        return entry, f"seq is {entry['seq']}, expected {seq}: an entry was removed, inserted or reordered"
    if entry["prev"] != prev:
        return entry, "does not chain to the previous entry: an entry was removed, inserted or reordered"
    if public_key is not None:
        try:
            sig = base64.b64decode(entry.get("sig", ""), validate=True)
        except (ValueError, TypeError):
            sig = b""
        if not verify(public_key, entry["hash"].encode(), sig):
            return entry, "missing or invalid signature: the log was rewritten or signed with another key"
    return entry, None
