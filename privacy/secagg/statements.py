"""What a node vouches for in the active-adversary mode: three statements, as canonical bytes.

* **channel key** (advertise): ``member fingerprint, c_pk``. A long-lived binding, like a
  certificate: a peer encrypts shares to ``c_pk`` only once the roster key of the member the
  coordinator names has signed it, so the coordinator cannot put its own channel key there.
* **session keys** (share-keys reply): ``session, round, index, member, c_pk, s_pk,
  commitment, nonce``. Binds the per-session mask key and the self-mask commitment to one
  member, one index, one session and one round: a key from another session, round or member
  does not verify. ``nonce`` is 16 random bytes of the node's own. Not signed: its hash is
  the associated data of every share the node encrypts to a neighbour
  (:func:`privacy.secagg.key_agreement.keys_aad`), which authenticates it to that neighbour
  alone, the only party that needs it, for an AES-GCM tag instead of an Ed25519 verification.
* **survivors** (masked-input reply and, after a dropout, the consistency stage):
  ``session id, survivor set``. The session id is :func:`session_id`, a hash of the
  coordinator's session, the round and **every member's nonce** in U2, so a signature on it
  was made after the signer saw the verifier's own nonce: a statement from an earlier session
  cannot be replayed into this one, even at a node that never saw that session.

Every field is length-prefixed, and each statement starts with its own label, so no statement
of one kind parses as another, and no other fedmart signature (registry, audit) is one of these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from privacy.secagg.crypto import sha256

__all__ = ["NONCE_BYTES", "channel_statement", "keys_statement", "session_id", "survivors_statement"]

NONCE_BYTES = 16
_PREFIX = b"fedmart/secagg/v1/"


def _encode(label: str, *fields: bytes | str | int) -> bytes:
    out = bytearray(_PREFIX + label.encode() + b"\0")
    for f in fields:
        raw = f.encode() if isinstance(f, str) else f.to_bytes(8, "big") if isinstance(f, int) else bytes(f)
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def channel_statement(fingerprint: str, c_pk: bytes) -> bytes:
    """A member's long-lived channel key (signed once, at advertise)."""
    return _encode("channel-key", fingerprint, c_pk)


def keys_statement(
    session: bytes,
    server_round: int,
    index: int,
    fingerprint: str,
    c_pk: bytes,
    s_pk: bytes,
    commitment: bytes,
    nonce: bytes,
) -> bytes:
    """A member's keys for one session and round (signed in its share-keys reply)."""
    return _encode("session-keys", session, server_round, index, fingerprint, c_pk, s_pk, commitment, nonce)


def session_id(session: bytes, server_round: int, members: Mapping[int, tuple[str, bytes]]) -> bytes:
    """The session id every survivor signs under: the coordinator's id, the round and all of U2's nonces.

    ``members`` maps index -> (member fingerprint, nonce) for every node of U2 as the signer was
    shown it; two nodes shown different U2 compute different ids, so their signatures never count
    for each other.
    """
    parts: list[bytes | str | int] = [session, server_round]
    for i in sorted(members):
        fp, nonce = members[i]
        parts += [i, fp, nonce]
    return sha256(_encode("session-id", *parts))


def survivors_statement(sid: bytes, survivors: Iterable[int]) -> bytes:
    """ "The nodes whose masked inputs are in this session's sum are exactly ``survivors``"."""
    return _encode("survivors", sid, *sorted(set(survivors)))
