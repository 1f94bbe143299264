"""One node's side of one secure-aggregation session (SecAgg+), with no Flower in sight.

The node's protection rests on refusals made here, whatever the coordinator asks: it answers
the unmask stage at most once, never reveals both the self-mask share and the mask-key share
of the same neighbour (either would unmask that neighbour's input, both would unmask a
survivor), and accepts messages only for its current session and stage. Shares it holds for
others arrive encrypted under keys only it and the sender can derive, bound to the session,
the round, the sender and the receiver (:mod:`privacy.secagg.key_agreement`).

In the **active-adversary mode** (``request.adversary == "active"``, with the node's
:class:`~privacy.secagg.identity.NodeIdentity`) it also refuses, before it shares, masks or
reveals anything, what :mod:`privacy.secagg.active_checks` lists: keys not signed by the
roster, a seen session, a threshold or degree below ``floor(2n/3) + 1`` of the roster, and a
survivor set that fewer than ``t`` members signed. The protocol and the argument
are in ``docs/secagg.md``.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.secagg.active_checks import check_session_keys, check_session_start, count_signatures
from privacy.secagg.crypto import SEED_BYTES, add_masks, aead_decrypt, aead_encrypt, x25519_keypair, x25519_public_key
from privacy.secagg.identity import NodeIdentity
from privacy.secagg.key_agreement import (
    SESSION_BYTES,
    SHARE_BYTES,
    channel_keys,
    commitment,
    keys_aad,
    mask_sign,
    pair_seeds,
    share_aad,
)
from privacy.secagg.shamir import split_secret
from privacy.secagg.stage_messages import (
    ConsistencyRequest,
    MaskRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from privacy.secagg.statements import NONCE_BYTES, keys_statement, survivors_statement
from privacy.secagg.wire import ACTIVE, SEMI_HONEST

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
    server_round: int = 0
    adversary: str = SEMI_HONEST
    # active-adversary mode only
    nonce: bytes = b""
    peers: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # neighbour -> (roster fingerprint, c_pk)
    members: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # U2 as shown: index -> (fingerprint, nonce)
    sid: bytes = b""  # the session id every survivor signs under (statements.session_id)
    also_signed: tuple[int, ...] = ()  # the one survivor set besides U2 this node signed, if any
    u2_signature: bytes = field(default=b"", compare=False)  # sent with the masked input; not kept
    _prepared: MaskRequest | None = field(default=None, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return self.adversary == ACTIVE

    # --- stage 2: share keys -------------------------------------------------------------
    @classmethod
    def share_keys(
        cls, request: ShareKeysRequest, c_sk: bytes, identity: NodeIdentity | None = None
    ) -> tuple[NodeSession, ShareKeysReply]:
        """Start a session: draw ``s_sk`` and ``b``, share both, encrypt the shares per neighbour.

        ``identity`` is the node's own roster, key and seen sessions; the active mode needs it,
        and a node whose ``identity.threat_model`` is active refuses a semi-honest session.
        """
        me, t = request.index, request.threshold
        holders = sorted(request.neighbours)
        if len(request.session) != SESSION_BYTES:
            raise ValueError("malformed session id")
        if me < 1 or me in request.neighbours or any(v < 1 for v in holders):
            raise ValueError("node indices must be positive and a node is not its own neighbour")
        fingerprints = check_session_start(request, identity)
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
        r = request.server_round
        commit = commitment(request.session, b)
        nonce, statement = b"", b""
        if request.adversary == ACTIVE:
            assert identity is not None  # check_session_start refused otherwise
            nonce = os.urandom(NONCE_BYTES)
            statement = keys_statement(request.session, r, me, identity.fingerprint, c_pk, s_pk, commit, nonce)

        def aad(v: int) -> bytes:  # active: the shares to v also authenticate this node's keys to v
            return keys_aad(request.session, r, me, v, statement) if statement else share_aad(request.session, r, me, v)

        ciphertexts = {
            v: aead_encrypt(key, b_share + sk_share, aad(v))
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
            server_round=r,
            adversary=request.adversary,
        )
        reply = ShareKeysReply(s_pk=s_pk, commitment=commit, ciphertexts=ciphertexts, nonce=nonce)
        if node.active:
            assert identity is not None
            node.nonce = nonce
            node.peers = {v: (fingerprints[v], request.neighbours[v]) for v in holders}
            identity.seen.add(request.session)  # from now on this session id is refused here
        return node, reply

    # --- stage 3: masked input -----------------------------------------------------------
    def prepare_mask(self, request: MaskRequest, identity: NodeIdentity | None = None) -> None:
        """Check ``request`` and decrypt the shares it carries, before the node trains.

        Everything that could make the node refuse the stage happens here, so a node that
        refuses has not spent a training (nor privacy budget) on it. In the active mode the
        neighbours' keys must carry their roster signatures for this session and round.
        """
        self.expect("shared", request.session)
        peers = sorted(request.neighbour_s_pks)
        if set(request.ciphertexts) != set(peers) or not set(peers) <= set(self.neighbours):
            raise ValueError("mask request names nodes that are not this node's neighbours")
        if len(peers) + 1 < self.threshold:
            raise ValueError(f"only {len(peers)} neighbours left, below threshold {self.threshold} - 1")
        s_pks = [request.neighbour_s_pks[v] for v in peers]
        if len(set(s_pks)) != len(s_pks) or self.s_pk in s_pks:
            raise ValueError("neighbours' mask keys are not distinct")
        statements: dict[int, bytes] = {}
        if self.active:
            self.sid, statements = check_session_keys(
                identity=self._identity(identity),
                session=self.session,
                server_round=self.server_round,
                index=self.index,
                nonce=self.nonce,
                peers=self.peers,
                neighbours=self.neighbours,
                s_pks=request.neighbour_s_pks,
                commitments=request.commitments,
                nonces=request.nonces,
                members=request.members,
            )
        for v in peers:
            plain = self._decrypt_shares(v, request.ciphertexts[v], statements.get(v, b""))
            if len(plain) != 2 * SHARE_BYTES:
                raise ValueError(f"malformed share pair from node {v}")
            self.held_b[v], self.held_sk[v] = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
        self._prepared = request

    def _decrypt_shares(self, v: int, blob: bytes, statement: bytes) -> bytes:
        """Neighbour ``v``'s shares for this node; in the active mode they must authenticate ``statement``."""
        key, r = self.channel_keys[v], self.server_round
        if not statement:
            return aead_decrypt(key, blob, share_aad(self.session, r, v, self.index))
        try:
            return aead_decrypt(key, blob, keys_aad(self.session, r, v, self.index, statement))
        except ValueError as err:
            raise ValueError(
                f"neighbour {v}'s shares do not authenticate the mask key, commitment and nonce this node was "
                "sent for it (substituted or replayed keys or shares)"
            ) from err

    def mask(
        self, request: MaskRequest, x: np.ndarray, *, in_place: bool = False, identity: NodeIdentity | None = None
    ) -> np.ndarray:
        """Return ``x`` masked (in place if ``in_place``), after :meth:`prepare_mask` if not done yet.

        In the active mode the node then signs the U2 it was shown (:attr:`u2_signature`, sent
        with the masked input): while nobody drops, that is its consistency-check signature.
        """
        if self._prepared is not request:
            self.prepare_mask(request, identity)
        if x.ndim != 1 or x.dtype.kind != "u":
            raise ValueError("the encoded input must be a 1-d unsigned integer array")
        peers = sorted(request.neighbour_s_pks)
        s_pks = [request.neighbour_s_pks[v] for v in peers]
        y = x if in_place else x.copy()
        seeds = [self.b, *pair_seeds(self.s_sk, s_pks, self.session)]
        signs = [1] + [mask_sign(self.index, v) for v in peers]
        add_masks(y, seeds, signs)
        self.masked_with = tuple(peers)
        self.stage = "masked"
        self.channel_keys = {}  # no longer needed
        self._prepared = None
        if self.active:
            self.members = dict(request.members)
            self.u2_signature = self._sign(self.members, self._identity(identity))
        return y

    # --- active mode: the consistency check ------------------------------------------------
    def consistency(self, request: ConsistencyRequest, identity: NodeIdentity | None = None) -> bytes:
        """Sign the survivor set U3 (only after a masked-input dropout); at most one set besides U2."""
        self.expect("masked", request.session)
        if not self.active:
            raise ValueError("the consistency stage belongs to the active-adversary mode")
        return self._sign(request.survivors, self._identity(identity))

    def _sign(self, survivors: Collection[int], identity: NodeIdentity) -> bytes:
        x = tuple(sorted(set(survivors)))
        u2 = tuple(sorted(self.members))
        if not set(x) <= set(u2) or self.index not in x:
            raise ValueError("a survivor set must lie within U2 and hold this node")
        mine = len(set(x) & {self.index, *self.masked_with})
        if mine < self.threshold:
            raise ValueError(
                f"the survivor set leaves {mine} of this node's neighbourhood, below threshold {self.threshold}"
            )
        if x != u2:
            if self.also_signed and self.also_signed != x:
                raise ValueError("this node already signed another survivor set in this session")
            self.also_signed = x
        return identity.key.sign(survivors_statement(self.sid, x))

    # --- stage 4: unmask -----------------------------------------------------------------
    def unmask(self, request: UnmaskRequest, identity: NodeIdentity | None = None) -> UnmaskReply:
        """Reveal shares of ``b`` for survivors (and self) and of ``s_sk`` for dropped neighbours, once.

        In the active mode the survivors and the dropped are derived from ``request.u3`` and the U2
        this node masked with, and only if the node signed ``u3`` itself and ``t`` members did.
        """
        self.expect("masked", request.session)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if self.active:
            survivors, dropped = self._checked_survivors(request, self._identity(identity))
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

    def _checked_survivors(self, request: UnmaskRequest, identity: NodeIdentity) -> tuple[set[int], set[int]]:
        x = frozenset(request.u3)
        if tuple(sorted(x)) not in (tuple(sorted(self.members)), self.also_signed):
            raise ValueError("this node reveals shares only for a survivor set it signed itself, not this one")
        fps = {v: fp for v, (fp, _) in self.members.items()}  # bound to their indices by the session id
        valid = count_signatures(
            identity=identity,
            sid=self.sid,
            survivors=x,
            signatures=request.signatures,
            fingerprints=fps,
            enough=self.threshold,
        )
        if valid < self.threshold:
            raise ValueError(
                f"only {valid} valid member signatures on the survivor set, below the threshold {self.threshold}: "
                "nodes may have been shown different survivor sets"
            )
        mine = set(self.masked_with)
        return mine & x, mine - x

    def _identity(self, identity: NodeIdentity | None) -> NodeIdentity:
        if identity is None:
            raise ValueError("the active-adversary mode needs this node's roster and roster key")
        return identity

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
        peers, members = sorted(self.peers), sorted(self.members)
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
            "round": self.server_round,
            "adversary": self.adversary,
            "nonce": self.nonce,
            "peer-src": peers,
            "peer-fps": [self.peers[v][0] for v in peers],
            "peer-cpks": [self.peers[v][1] for v in peers],
            "member-src": members,
            "member-fps": [self.members[v][0] for v in members],
            "member-nonces": [self.members[v][1] for v in members],
            "sid": self.sid,
            "also-signed": list(self.also_signed),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeSession:
        """Inverse of :meth:`to_dict`."""
        held = [int(v) for v in d["held-src"]]

        def pairs(src: str, a: str, b: str) -> dict[int, tuple[Any, Any]]:
            return {int(v): (x, y) for v, x, y in zip(d[src], d[a], d[b], strict=True)}

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
            server_round=int(d["round"]),
            adversary=str(d["adversary"]),
            nonce=bytes(d["nonce"]),
            peers={v: (str(fp), bytes(pk)) for v, (fp, pk) in pairs("peer-src", "peer-fps", "peer-cpks").items()},
            members={
                v: (str(fp), bytes(n)) for v, (fp, n) in pairs("member-src", "member-fps", "member-nonces").items()
            },
            sid=bytes(d["sid"]),
            also_signed=tuple(int(v) for v in d["also-signed"]),
        )
