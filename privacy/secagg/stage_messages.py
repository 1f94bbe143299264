"""The protocol's messages, as plain data with no Flower: what the coordinator and a node send each other.

``privacy/secagg/strategy.py`` and ``privacy/secagg/mod.py`` carry them in Flower ConfigRecords
(keys in :mod:`privacy.secagg.wire`); :func:`privacy.secagg.local_round.run_round_locally`
passes them in memory. Only public keys, encrypted shares and the shares a node agrees to
reveal ever appear in them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ShareKeysRequest", "ShareKeysReply", "MaskRequest", "UnmaskRequest", "UnmaskReply"]


@dataclass(frozen=True)
class ShareKeysRequest:
    """Coordinator -> node ``index``: start a session; ``neighbours`` maps index -> channel key."""

    session: bytes
    index: int
    threshold: int
    neighbours: Mapping[int, bytes]


@dataclass(frozen=True)
class ShareKeysReply:
    """Node -> coordinator: mask public key, self-mask commitment, encrypted shares per neighbour."""

    s_pk: bytes
    commitment: bytes
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskRequest:
    """Coordinator -> node: mask keys of the neighbours still in, and their ciphertexts for it."""

    session: bytes
    neighbour_s_pks: Mapping[int, bytes]
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class UnmaskRequest:
    """Coordinator -> node: which of its neighbours survived and which dropped."""

    session: bytes
    survivors: Sequence[int]
    dropped: Sequence[int]


@dataclass(frozen=True)
class UnmaskReply:
    """Node -> coordinator: shares of ``b`` for survivors (and itself), of ``s_sk`` for the dropped."""

    b_shares: Mapping[int, bytes]
    sk_shares: Mapping[int, bytes]
