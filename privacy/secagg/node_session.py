"""One node's side of one secure-aggregation session (SecAgg+), with no Flower in sight.

The node's protection rests on three refusals made here, whatever the coordinator asks: it
answers the unmask stage at most once, never reveals both the self-mask share and the
mask-key share of the same neighbour (either would unmask that neighbour's input, both
would unmask a survivor), and accepts messages only for its current session and stage.
Shares it holds for others arrive encrypted under keys only it and the sender can derive
(:mod:`privacy.secagg.key_agreement`). The protocol is described in ``docs/secagg.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.secagg.crypto import SEED_BYTES, add_masks, aead_decrypt, aead_encrypt, x25519_keypair, x25519_public_key
from privacy.secagg.key_agreement import (
    SESSION_BYTES,
    SHARE_BYTES,
    channel_keys,
    commitment,
    mask_sign,
    pair_seeds,
    share_aad,
)
from privacy.secagg.shamir import split_secret
from privacy.secagg.stage_messages import MaskRequest, ShareKeysReply, ShareKeysRequest, UnmaskReply, UnmaskRequest

__all__ = ["NodeSession"]


@dataclass
class NodeSession:
    """One node's side of one session. Serialisable with :meth:`to_dict` (for ``ctxt.state``)."""

    session: bytes
    index: int
    threshold: int
    s_sk: bytes
    s_pk: bytes
    b: bytes
    neighbours: tuple[int, ...]
    stage: str = "shared"  # shared -> masked -> done
    channel_keys: dict[int, bytes] = field(default_factory=dict)  # neighbour -> AES-GCM key of this session
    held_b: dict[int, bytes] = field(default_factory=dict)  # holder of these shares: src -> share
    held_sk: dict[int, bytes] = field(default_factory=dict)
    masked_with: tuple[int, ...] = ()

    # --- stage 2: share keys -------------------------------------------------------------
    @classmethod
    def share_keys(cls, request: ShareKeysRequest, c_sk: bytes) -> tuple[NodeSession, ShareKeysReply]:
        """Start a session: draw ``s_sk`` and ``b``, share both, encrypt the shares per neighbour."""
        me, t = request.index, request.threshold
        holders = sorted(request.neighbours)
        if len(request.session) != SESSION_BYTES:
            raise ValueError("malformed session id")
        if me < 1 or me in request.neighbours or any(v < 1 for v in holders):
            raise ValueError("node indices must be positive and a node is not its own neighbour")
        if not 2 <= t <= len(holders) + 1:
            raise ValueError(f"threshold {t} must lie in 2..{len(holders) + 1} (neighbours + self)")
        pks = list(request.neighbours.values())
        c_pk = x25519_public_key(c_sk)
        if len(set(pks)) != len(pks) or c_pk in pks:
            raise ValueError("neighbours' channel keys are not distinct")
        s_sk, s_pk = x25519_keypair()
        b = os.urandom(SEED_BYTES)
        xs = [me, *holders]
        b_shares = split_secret(b, t, xs)
        sk_shares = split_secret(s_sk, t, xs)
        keys = channel_keys(c_sk, [request.neighbours[v] for v in holders], request.session)
        ciphertexts = {
            v: aead_encrypt(key, b_share + sk_share, share_aad(request.session, me, v))
            for v, key, b_share, sk_share in zip(holders, keys, b_shares[1:], sk_shares[1:], strict=True)
        }
        node = cls(
            session=request.session,
            index=me,
            threshold=t,
            s_sk=s_sk,
            s_pk=s_pk,
            b=b,
            neighbours=tuple(holders),
            channel_keys=dict(zip(holders, keys, strict=True)),
            held_b={me: b_shares[0]},
            held_sk={me: sk_shares[0]},
        )
        return node, ShareKeysReply(s_pk=s_pk, commitment=commitment(request.session, b), ciphertexts=ciphertexts)

    # --- stage 3: masked input -----------------------------------------------------------
    def mask(self, request: MaskRequest, x: np.ndarray, *, in_place: bool = False) -> np.ndarray:
        """Decrypt the shares this node holds and return ``x`` masked (masked in place if ``in_place``)."""
        self.expect("shared", request.session)
        peers = sorted(request.neighbour_s_pks)
        if set(request.ciphertexts) != set(peers) or not set(peers) <= set(self.neighbours):
            raise ValueError("mask request names nodes that are not this node's neighbours")
        if len(peers) + 1 < self.threshold:
            raise ValueError(f"only {len(peers)} neighbours left, below threshold {self.threshold} - 1")
        s_pks = [request.neighbour_s_pks[v] for v in peers]
        if len(set(s_pks)) != len(s_pks) or self.s_pk in s_pks:
            raise ValueError("neighbours' mask keys are not distinct")
        for v in peers:
            aad = share_aad(self.session, v, self.index)
            plain = aead_decrypt(self.channel_keys[v], request.ciphertexts[v], aad)
            if len(plain) != 2 * SHARE_BYTES:
                raise ValueError(f"malformed share pair from node {v}")
            self.held_b[v], self.held_sk[v] = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
        if x.ndim != 1 or x.dtype.kind != "u":
            raise ValueError("the encoded input must be a 1-d unsigned integer array")
        y = x if in_place else x.copy()
        seeds = [self.b, *pair_seeds(self.s_sk, s_pks, self.session)]
        signs = [1] + [mask_sign(self.index, v) for v in peers]
        add_masks(y, seeds, signs)
        self.masked_with = tuple(peers)
        self.stage = "masked"
        self.channel_keys = {}  # no longer needed
        return y

    # --- stage 4: unmask ------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Reveal shares of ``b`` for survivors (and self) and of ``s_sk`` for dropped neighbours, once."""
        self.expect("masked", request.session)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ValueError("a node cannot be both a survivor and dropped")
        if not (survivors | dropped) <= set(self.masked_with):
            raise ValueError("unmask request names nodes this node did not mask with")
        if len(survivors) + 1 < self.threshold:
            raise ValueError(
                f"only {len(survivors) + 1} survivors in the neighbourhood, below threshold {self.threshold}"
            )
        self.stage = "done"  # never answer twice: two answers could reveal both secrets of a node
        return UnmaskReply(
            b_shares={v: self.held_b[v] for v in sorted(survivors | {self.index})},
            sk_shares={v: self.held_sk[v] for v in sorted(dropped)},
        )

    def expect(self, stage: str, session: bytes) -> None:
        """Raise ``ValueError`` unless this session is ``session`` and sits at ``stage``."""
        if session != self.session:
            raise ValueError("message belongs to another secure-aggregation session")
        if self.stage != stage:
            raise ValueError(f"secure aggregation out of order: node is at stage '{self.stage}', expected '{stage}'")

    # --- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat dict of ints, strs, bytes and lists of them (fits a Flower ConfigRecord)."""
        held = sorted(self.held_b)
        return {
            "session": self.session,
            "index": self.index,
            "threshold": self.threshold,
            "s-sk": self.s_sk,
            "s-pk": self.s_pk,
            "b": self.b,
            "neighbours": list(self.neighbours),
            "stage": self.stage,
            "channel-src": list(self.channel_keys),
            "channel-keys": list(self.channel_keys.values()),
            "held-src": held,
            "held-b": [self.held_b[v] for v in held],
            "held-sk": [self.held_sk[v] for v in held],
            "masked-with": list(self.masked_with),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeSession:
        """Inverse of :meth:`to_dict`."""
        held = [int(v) for v in d["held-src"]]
        return cls(
            session=bytes(d["session"]),
            index=int(d["index"]),
            threshold=int(d["threshold"]),
            s_sk=bytes(d["s-sk"]),
            s_pk=bytes(d["s-pk"]),
            b=bytes(d["b"]),
            neighbours=tuple(int(v) for v in d["neighbours"]),
            stage=str(d["stage"]),
            channel_keys=dict(
                zip((int(v) for v in d["channel-src"]), (bytes(k) for k in d["channel-keys"]), strict=True)
            ),
            held_b=dict(zip(held, (bytes(s) for s in d["held-b"]), strict=True)),
            held_sk=dict(zip(held, (bytes(s) for s in d["held-sk"]), strict=True)),
            masked_with=tuple(int(v) for v in d["masked-with"]),
        )
