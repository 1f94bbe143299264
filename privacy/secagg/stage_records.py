"""The coordinator's side of the secagg records: stage requests as ConfigRecord values, replies parsed back.

Keys are those of :mod:`privacy.secagg.wire`; the node's side is :mod:`privacy.secagg.mod`.
What the records carry is exactly the protocol's messages (:mod:`privacy.secagg.stage_messages`):
public keys, encrypted shares and the shares a node agrees to reveal, never an update.
A parse that fails raises ``KeyError``, ``ValueError`` or ``TypeError``; the caller treats
that node as silent for the stage.
"""

from __future__ import annotations

from typing import Any, cast

from flwr.app import ConfigRecord

from privacy.secagg import wire
from privacy.secagg.encoding import EncodingParams
from privacy.secagg.stage_messages import (
    ConsistencyRequest,
    MaskRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)

__all__ = [
    "share_keys_record",
    "masked_input_record",
    "consistency_record",
    "unmask_record",
    "parse_share_keys_reply",
    "parse_signature",
    "parse_unmask_reply",
]


def share_keys_record(request: ShareKeysRequest, *, server_round: int, channel_pk: bytes) -> dict[str, Any]:
    """The share-keys stage for one node: its index, the threshold and its neighbours' channel keys.

    ``channel_pk`` is the node's own channel key as the coordinator holds it (a node that
    lost it refuses the stage); ``server_round`` lets the node refuse a stale message.
    """
    peers = sorted(request.neighbours)
    out: dict[str, Any] = {
        wire.STAGE: wire.SHARE_KEYS,
        wire.ADVERSARY: request.adversary,
        wire.SESSION: request.session,
        wire.ROUND: server_round,
        wire.INDEX: request.index,
        wire.THRESHOLD: request.threshold,
        wire.CHANNEL_PK: channel_pk,
        wire.NEIGHBOURS: peers,
        wire.CHANNEL_PKS: [request.neighbours[v] for v in peers],
    }
    if request.certs:  # active: who signed each neighbour's channel key
        out[wire.MEMBERS] = [request.certs[v].fingerprint for v in peers]
        out[wire.CHANNEL_SIGS] = [request.certs[v].signature for v in peers]
    return out


def masked_input_record(
    request: MaskRequest, *, params: EncodingParams, weight_key: str, arrays_key: str
) -> dict[str, Any]:
    """The masked-input stage, added to a node's TRAIN message: mask keys, its ciphertexts, the encoding."""
    sources = sorted(request.neighbour_s_pks)
    u2 = sorted(request.members)
    active = (
        {
            wire.COMMITMENTS: [request.commitments[v] for v in sources],
            wire.NONCES: [request.nonces[v] for v in sources],
            wire.U2_INDICES: u2,
            wire.U2_MEMBERS: [request.members[v][0] for v in u2],
            wire.U2_NONCES: [request.members[v][1] for v in u2],
        }
        if request.members
        else {}
    )
    return {
        **active,
        wire.STAGE: wire.MASKED_INPUT,
        wire.SESSION: request.session,
        wire.SOURCES: sources,
        wire.MASK_PKS: [request.neighbour_s_pks[v] for v in sources],
        wire.CIPHERTEXTS: [request.ciphertexts[v] for v in sources],
        wire.CLIP_RANGE: params.clip_range,
        wire.BITS: params.bits,
        wire.MAX_WEIGHT: params.max_weight,
        wire.MAX_NODES: params.max_nodes,
        wire.WEIGHT_KEY: weight_key,
        wire.ARRAYS_KEY: arrays_key,
    }


def consistency_record(request: ConsistencyRequest) -> dict[str, Any]:
    """The consistency stage (active mode, after a masked-input dropout): the survivor set to sign."""
    return {wire.STAGE: wire.CONSISTENCY, wire.SESSION: request.session, wire.U3_INDICES: list(request.survivors)}


def unmask_record(request: UnmaskRequest) -> dict[str, Any]:
    """The unmask stage for one survivor: which of its neighbours survived and which dropped.

    In the active mode also the survivor set U3 and the members' signatures on it.
    """
    signers = sorted(request.signatures)
    active = {
        wire.U3_INDICES: list(request.u3),
        wire.SIGNERS: signers,
        wire.SIGNATURES: [request.signatures[v] for v in signers],
    }
    return {
        **(active if request.u3 else {}),
        wire.STAGE: wire.UNMASK,
        wire.SESSION: request.session,
        wire.SURVIVORS: list(request.survivors),
        wire.DROPPED: list(request.dropped),
    }


def parse_share_keys_reply(record: ConfigRecord) -> ShareKeysReply:
    """A node's share-keys answer: its mask public key, commitment and encrypted shares per neighbour."""
    return ShareKeysReply(
        s_pk=cast(bytes, record[wire.MASK_PK]),
        commitment=cast(bytes, record[wire.COMMITMENT]),
        ciphertexts=dict(
            zip(cast(list[int], record[wire.DESTINATIONS]), cast(list[bytes], record[wire.CIPHERTEXTS]), strict=True)
        ),
        nonce=cast(bytes, record.get(wire.NONCE, b"")),
    )


def parse_signature(record: ConfigRecord) -> bytes:
    """A node's roster signature on the survivor set (masked-input or consistency reply); b"" if none."""
    sig = record.get(wire.SIGNATURE, b"")
    if not isinstance(sig, bytes):
        raise TypeError("a signature must be bytes")
    return sig


def parse_unmask_reply(record: ConfigRecord) -> UnmaskReply:
    """A node's unmask answer: its shares of survivors' self masks and of dropped nodes' mask keys."""
    return UnmaskReply(
        b_shares=dict(
            zip(cast(list[int], record[wire.B_SOURCES]), cast(list[bytes], record[wire.B_SHARES]), strict=True)
        ),
        sk_shares=dict(
            zip(cast(list[int], record[wire.SK_SOURCES]), cast(list[bytes], record[wire.SK_SHARES]), strict=True)
        ),
    )
