"""The protocol's messages, as plain data with no Flower: what the coordinator and a node send each other.

``privacy/secagg/strategy.py`` and ``privacy/secagg/mod.py`` carry them in Flower ConfigRecords
(keys in :mod:`privacy.secagg.wire`); :func:`privacy.secagg.local_round.run_round_locally`
passes them in memory. Only public keys, encrypted shares and the shares a node agrees to
reveal ever appear in them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from privacy.secagg.wire import SEMI_HONEST

__all__ = [
    "ChannelCert",
    "ShareKeysRequest",
    "ShareKeysReply",
    "MaskRequest",
    "ConsistencyRequest",
    "UnmaskRequest",
    "UnmaskReply",
]


@dataclass(frozen=True)
class ChannelCert:
    """A member's signature on its channel key (active mode): who the key belongs to, and the proof."""

    fingerprint: str
    signature: bytes


@dataclass(frozen=True)
class ShareKeysRequest:
    """Coordinator -> node ``index``: start a session; ``neighbours`` maps index -> channel key.

    In the active mode ``certs`` maps each neighbour to the roster member that signed its channel key.
    """

    session: bytes
    index: int
    threshold: int
    neighbours: Mapping[int, bytes]
    server_round: int = 0
    adversary: str = SEMI_HONEST
    certs: Mapping[int, ChannelCert] = field(default_factory=dict)


@dataclass(frozen=True)
class ShareKeysReply:
    """Node -> coordinator: mask public key, self-mask commitment, encrypted shares per neighbour.

    In the active mode also the node's nonce. Its session keys are authenticated to each
    neighbour by the shares it sends that neighbour (their AEAD's associated data is the keys
    statement, :func:`privacy.secagg.key_agreement.keys_aad`), not by a roster signature.
    """

    s_pk: bytes
    commitment: bytes
    ciphertexts: Mapping[int, bytes]
    nonce: bytes = b""


@dataclass(frozen=True)
class MaskRequest:
    """Coordinator -> node: mask keys of the neighbours still in, and their ciphertexts for it.

    In the active mode also each neighbour's commitment and nonce (which its ciphertext
    authenticates), and ``members``: every node of U2 as index -> (roster fingerprint, nonce),
    which the session id hashes.
    """

    session: bytes
    neighbour_s_pks: Mapping[int, bytes]
    ciphertexts: Mapping[int, bytes]
    commitments: Mapping[int, bytes] = field(default_factory=dict)
    nonces: Mapping[int, bytes] = field(default_factory=dict)
    members: Mapping[int, tuple[str, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class ConsistencyRequest:
    """Coordinator -> node (active mode, only after a masked-input dropout): sign this survivor set U3."""

    session: bytes
    survivors: Sequence[int]


@dataclass(frozen=True)
class UnmaskRequest:
    """Coordinator -> node: which of its neighbours survived and which dropped.

    In the active mode the node ignores ``survivors`` and ``dropped`` and derives both from ``u3``
    (the whole survivor set) and the U2 it was shown; ``signatures`` are survivors' signatures on
    ``u3`` (index -> signature), of which the node needs ``t`` from its own neighbourhood.
    """

    session: bytes
    survivors: Sequence[int]
    dropped: Sequence[int]
    u3: Sequence[int] = ()
    signatures: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskReply:
    """Node -> coordinator: shares of ``b`` for survivors (and itself), of ``s_sk`` for the dropped."""

    b_shares: Mapping[int, bytes]
    sk_shares: Mapping[int, bytes]
