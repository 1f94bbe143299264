"""Key agreement for one secure-aggregation session: the few derivations both sides must agree on.

Every secret a session uses is derived here from X25519 agreements and the session id, so a
node and the coordinator compute the same values without sending them: the AES-GCM key that
encrypts the shares ``u`` sends ``v`` (from the long-lived channel keys), the pairwise mask
seed ``s_uv`` (from the per-session mask keys), the commitment to a node's self-mask seed, the
AAD that binds a share to its sender and receiver, and the sign of a pairwise mask.

Assumptions the protection rests on: X25519 and HKDF-SHA256 are secure, a node draws a fresh
mask key pair and self-mask seed per session, and the 16-byte session id is never reused
(it salts every derivation, so keys of two sessions are unrelated). The round is in the shares'
associated data too, so ciphertexts of one round do not decrypt in another.
"""

from __future__ import annotations

from collections.abc import Sequence

from privacy.secagg.crypto import KEY_BYTES, SEED_BYTES, hkdf_sha256, sha256, x25519_keypair, x25519_shared_secrets
from privacy.secagg.shamir import share_length

__all__ = [
    "SESSION_BYTES",
    "SHARE_BYTES",
    "new_channel_keypair",
    "channel_keys",
    "pair_seeds",
    "commitment",
    "keys_aad",
    "share_aad",
    "mask_sign",
]

SESSION_BYTES = 16
INFO_CHANNEL = b"fedmart/secagg/v1/share-encryption"
INFO_PAIR = b"fedmart/secagg/v1/pairwise-mask"
INFO_COMMIT = b"fedmart/secagg/v1/self-mask-commitment"
SHARE_BYTES = share_length(KEY_BYTES)  # one Shamir share of a 32-byte secret


def new_channel_keypair() -> tuple[bytes, bytes]:
    """A node's long-lived channel key pair ``(c_sk, c_pk)``."""
    return x25519_keypair()


def channel_keys(c_sk: bytes, peer_c_pks: Sequence[bytes], session: bytes) -> list[bytes]:
    """AES-GCM keys shared with each peer for this session."""
    return [hkdf_sha256(z, salt=session, info=INFO_CHANNEL) for z in x25519_shared_secrets(c_sk, peer_c_pks)]


def pair_seeds(s_sk: bytes, peer_s_pks: Sequence[bytes], session: bytes) -> list[bytes]:
    """Pairwise mask seeds (256 bits) with each peer for this session."""
    return [
        hkdf_sha256(z, salt=session, info=INFO_PAIR, length=SEED_BYTES) for z in x25519_shared_secrets(s_sk, peer_s_pks)
    ]


def commitment(session: bytes, b: bytes) -> bytes:
    """A node's commitment to its self-mask seed ``b``: lets the coordinator check a rebuilt ``b``."""
    return sha256(INFO_COMMIT + session + b)


def share_aad(session: bytes, server_round: int, src: int, dst: int) -> bytes:
    """AES-GCM associated data of the shares ``src`` sends ``dst`` in ``server_round``.

    A share cannot be replayed to another node, into another session, or into another round.
    """
    return session + server_round.to_bytes(8, "big") + src.to_bytes(4, "big") + dst.to_bytes(4, "big")


def keys_aad(session: bytes, server_round: int, src: int, dst: int, keys: bytes) -> bytes:
    """Associated data of the shares ``src`` sends ``dst`` in the active mode: :func:`share_aad` + H(keys).

    ``keys`` is ``src``'s keys statement (:func:`privacy.secagg.statements.keys_statement`: its
    member fingerprint, channel key, mask key, commitment and nonce for this session and round).
    Only ``src`` and ``dst`` hold the channel key (both channel keys are roster-certified), so a
    share that decrypts at ``dst`` proves that ``src`` sent exactly these keys to ``dst``: the
    coordinator cannot substitute them, and no roster signature is needed for it.
    """
    return share_aad(session, server_round, src, dst) + sha256(keys)


def mask_sign(u: int, v: int) -> int:
    """``+1`` if ``u < v`` else ``-1``: the pairwise masks of ``u`` and ``v`` cancel in the sum."""
    return 1 if u < v else -1
