"""The coordinator's side of one secure-aggregation session (SecAgg+), with no Flower in sight.

Written as an honest coordinator runs it, in either mode; the nodes' own checks
(:mod:`privacy.secagg.node_session`) are what protects them when it is not. It only ever
holds masked vectors, public keys, encrypted shares and the shares nodes reveal in the unmask
stage, and learns ``sum_{u in U3} x_u`` (mod M) and nothing else about any single input,
provided fewer than ``t`` holders of a node's shares collude with it. Each rebuilt secret is
checked (a self-mask seed against its commitment, a dropped node's mask key against its public
key) before it is used, so a wrong share aborts the session rather than corrupting the sum. The protocol is described in
``docs/secagg.md``; the unmask stage asks only a covering subset of U3
(:func:`privacy.secagg.unmask_cover.unmask_cover`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from privacy.secagg.crypto import KEY_BYTES, add_masks, x25519_public_key
from privacy.secagg.graph import SecAggAbort, active_threshold, minimum_degree, neighbour_graph, resolve_threshold
from privacy.secagg.key_agreement import SESSION_BYTES, commitment, mask_sign, pair_seeds
from privacy.secagg.shamir import combine_shares
from privacy.secagg.stage_messages import (
    ChannelCert,
    ConsistencyRequest,
    MaskRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from privacy.secagg.statements import NONCE_BYTES
from privacy.secagg.unmask_cover import unmask_cover
from privacy.secagg.wire import ACTIVE, ADVERSARIES, SEMI_HONEST

__all__ = ["ServerSession"]


class ServerSession:
    """The coordinator's side of one session; it only ever holds masked data, keys and shares.

    Parameters
    ----------
    indices : Sequence[int]
        Positive node indices of the participants (those with a known channel key).
    threshold : int | float
        Count, or fraction of each secret's holders (see :func:`resolve_threshold`).
    neighbours : int
        Degree of the neighbour graph (0 = complete graph).
    session : bytes, optional
        16-byte session id; random by default.
    rng : random.Random, optional
        Source for the graph's permutation; a CSPRNG by default.
    server_round : int
        The round, bound into the shares' associated data (and, active, their keys statement).
    adversary : {"semi-honest", "active"}
        The active mode raises the threshold to ``floor(2n/3) + 1`` of the ``roster_size``
        members and a sparse graph's degree to the matching minimum (what the nodes enforce),
        forwards the roster signatures, and checks survivor sets before the unmask stage.
    roster_size : int
        Members in the nodes' roster (the active mode only).
    """

    def __init__(
        self,
        indices: Sequence[int],
        *,
        threshold: int | float,
        neighbours: int,
        session: bytes | None = None,
        rng: random.Random | None = None,
        server_round: int = 0,
        adversary: str = SEMI_HONEST,
        roster_size: int = 0,
    ) -> None:
        if len(set(indices)) != len(indices) or any(i < 1 for i in indices):
            raise ValueError("node indices must be distinct positive integers")
        if adversary not in ADVERSARIES:
            raise ValueError(f"adversary must be one of {ADVERSARIES}, got {adversary!r}")
        self.session = session if session is not None else os.urandom(SESSION_BYTES)
        self.server_round = int(server_round)
        self.adversary = adversary
        t_min = 2
        if adversary == ACTIVE:
            if len(indices) > roster_size:
                raise SecAggAbort(f"{len(indices)} nodes in a session, but the nodes' roster has {roster_size} members")
            t_min = active_threshold(roster_size)
            if neighbours:  # the degree every node demands, rounded up to the even degree of a Harary graph
                neighbours = max(neighbours, minimum_degree(roster_size) + minimum_degree(roster_size) % 2)
        self.graph = neighbour_graph(indices, neighbours, rng)
        share_count = 1 + min((len(n) for n in self.graph.values()), default=0)
        self.threshold = max(resolve_threshold(threshold, share_count), t_min)
        if self.threshold > share_count:
            raise SecAggAbort(
                f"{share_count} holders per secret, below the active-adversary threshold floor(2n/3) + 1 = "
                f"{self.threshold} of the {roster_size} roster members"
            )
        self.u1: frozenset[int] = frozenset(indices)
        self.u2: frozenset[int] = frozenset()
        self.u3: frozenset[int] = frozenset()
        self._share_replies: dict[int, ShareKeysReply] = {}
        self._certs: dict[int, ChannelCert] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._signatures: dict[int, bytes] = {}  # active: survivors' signatures on U3 (U2's, if nobody dropped)
        self._unmask_cache: tuple[dict[int, UnmaskRequest], dict[tuple[str, int], frozenset[int]]] | None = None

    def _need(self, survivors: Collection[int], stage: str) -> None:
        if len(survivors) < self.threshold:
            raise SecAggAbort(f"{stage}: only {len(survivors)} nodes left, below the threshold of {self.threshold}")

    # --- stage 2 ------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.adversary == ACTIVE

    def share_keys_requests(
        self, channel_pks: Mapping[int, bytes], certs: Mapping[int, ChannelCert] | None = None
    ) -> dict[int, ShareKeysRequest]:
        """One request per participant, carrying its neighbours' channel keys (and, active, their certificates)."""
        missing = self.u1 - set(channel_pks)
        if self.active:
            self._certs = dict(certs or {})
            missing |= self.u1 - set(self._certs)
        if missing:
            raise ValueError(f"no channel key for nodes {sorted(missing)}")
        return {
            u: ShareKeysRequest(
                self.session,
                u,
                self.threshold,
                {v: channel_pks[v] for v in self.graph[u]},
                server_round=self.server_round,
                adversary=self.adversary,
                certs={v: self._certs[v] for v in self.graph[u]} if self.active else {},
            )
            for u in sorted(self.u1)
        }

    def receive_share_keys(self, replies: Mapping[int, ShareKeysReply]) -> frozenset[int]:
        """Keep well-formed replies, prune nodes whose neighbourhood is too small; returns U2."""
        ok: dict[int, ShareKeysReply] = {}
        seen: set[bytes] = set()
        for u, r in sorted(replies.items()):
            if (
                u in self.u1
                and set(r.ciphertexts) == set(self.graph[u])
                and len(r.s_pk) == KEY_BYTES
                and len(r.commitment) == 32
                and r.s_pk not in seen
                and (not self.active or len(r.nonce) == NONCE_BYTES)
            ):
                ok[u] = r
                seen.add(r.s_pk)
        u2 = set(ok)
        while True:  # a node needs t - 1 neighbours in U2 to hold its shares
            weak = {u for u in u2 if len(u2.intersection(self.graph[u])) + 1 < self.threshold}
            if not weak:
                break
            u2 -= weak
        self._need(u2, "share keys")
        self.u2 = frozenset(u2)
        self._share_replies = {u: ok[u] for u in u2}
        return self.u2

    # --- stage 3 ------------------------------------------------------------------------------
    def mask_requests(self) -> dict[int, MaskRequest]:
        """Forward to each node in U2 its neighbours' mask keys and the ciphertexts addressed to it."""
        out = {}
        r = self._share_replies
        members = {v: (self._certs[v].fingerprint, r[v].nonce) for v in sorted(self.u2)} if self.active else {}
        for u in sorted(self.u2):
            peers = [v for v in self.graph[u] if v in self.u2]
            out[u] = MaskRequest(
                session=self.session,
                neighbour_s_pks={v: r[v].s_pk for v in peers},
                ciphertexts={v: r[v].ciphertexts[u] for v in peers},
                commitments={v: r[v].commitment for v in peers} if self.active else {},
                nonces={v: r[v].nonce for v in peers} if self.active else {},
                members=members,
            )
        return out

    def receive_masked(
        self,
        vectors: Mapping[int, np.ndarray],
        length: int,
        dtype: np.dtype,
        signatures: Mapping[int, bytes] | None = None,
    ) -> frozenset[int]:
        """Keep masked vectors of the right shape from nodes in U2; returns U3.

        In the active mode a masked input counts only with its node's signature on U2, which
        stands for the survivor set while nobody has dropped (no consistency stage then).
        """
        dtype = np.dtype(dtype)
        sigs = signatures or {}
        self._masked = {
            u: y
            for u, y in vectors.items()
            if u in self.u2
            and y.shape == (length,)
            and y.dtype == dtype
            and (not self.active or len(sigs.get(u, b"")) == 64)
        }
        self._need(self._masked, "masked input")
        self.u3 = frozenset(self._masked)
        self._signatures = {u: sigs[u] for u in self.u3} if self.active and self.u3 == self.u2 else {}
        self._unmask_cache = None
        return self.u3

    # --- active mode: consistency -------------------------------------------------------------
    @property
    def needs_consistency(self) -> bool:
        """Active mode after a masked-input dropout: U2's signatures do not name U3, so survivors sign U3."""
        return self.active and self.u3 != self.u2

    def consistency_requests(self) -> dict[int, ConsistencyRequest]:
        """Ask every survivor that still has ``t`` survivors in its neighbourhood (no other would sign) to sign U3."""
        return {
            u: ConsistencyRequest(self.session, sorted(self.u3))
            for u in sorted(self.u3)
            if len({u, *self.graph[u]} & self.u3) >= self.threshold
        }

    def receive_consistency(self, signatures: Mapping[int, bytes]) -> frozenset[int]:
        """Keep the survivors' signatures on U3; returns the survivors that can be asked to unmask.

        A node reveals its shares only for a U3 it signed itself and ``t`` members signed.
        """
        self._signatures = {u: s for u, s in signatures.items() if u in self.u3 and len(s) == 64}
        self._unmask_cache = None
        eligible = self._eligible()
        self._need(eligible, "consistency")
        return eligible

    def _eligible(self) -> frozenset[int]:
        if not self.active:
            return self.u3
        # a node reveals only for a set it signed itself, once t members signed it, with t survivors around it
        signed = self._signatures.keys()
        if len(signed) < self.threshold:
            return frozenset()
        return frozenset(u for u in signed if len({u, *self.graph[u]} & self.u3) >= self.threshold)

    # --- stage 4 ------------------------------------------------------------------------------
    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Tell each node in U3 which of its neighbours survived and which dropped."""
        return dict(self._unmask_plan()[0])

    def _unmask_plan(self) -> tuple[dict[int, UnmaskRequest], dict[tuple[str, int], frozenset[int]]]:
        # fixed once U3 is: cached, because the strategy checks partial answers on every poll
        if self._unmask_cache is None:
            self._unmask_cache = (self._build_unmask_requests(), self._build_secrets())
        return self._unmask_cache

    def _build_unmask_requests(self) -> dict[int, UnmaskRequest]:
        dropped = self.u2 - self.u3
        u3 = sorted(self.u3) if self.active else []
        return {
            u: UnmaskRequest(
                session=self.session,
                survivors=[v for v in self.graph[u] if v in self.u3],
                dropped=[v for v in self.graph[u] if v in dropped],
                u3=u3,
                signatures=dict(sorted(self._signatures.items())),
            )
            for u in sorted(self._eligible())
        }

    def secrets_to_rebuild(self) -> dict[tuple[str, int], frozenset[int]]:
        """Each secret the unmask stage must rebuild, mapped to the nodes of U3 holding a share.

        ``("b", u)`` for every ``u`` in U3 (held by ``u`` and its neighbours in U3) and
        ``("sk", v)`` for every dropped ``v`` with a neighbour in U3 (held by those neighbours).
        """
        return dict(self._unmask_plan()[1])

    def _build_secrets(self) -> dict[tuple[str, int], frozenset[int]]:
        out: dict[tuple[str, int], frozenset[int]] = {}
        askable = self._eligible()
        for u in sorted(self.u3):
            out[("b", u)] = frozenset({u, *self.graph[u]} & askable)
        for v in sorted(self.u2 - self.u3):
            partners = frozenset(self.graph[v]) & askable
            if partners:
                out[("sk", v)] = partners
        return out

    def unmask_cover(self, spare: int = 0, order: Sequence[int] | None = None) -> list[int]:
        """Nodes of U3 to ask first: together they hold ``t + spare`` shares of every secret.

        :func:`privacy.secagg.unmask_cover.unmask_cover` over :meth:`secrets_to_rebuild`;
        ``order`` (default ascending) breaks ties and must list every node that may be asked
        once (U3; in the active mode those whose neighbourhood signed U3 ``t`` times).
        """
        return unmask_cover(
            self.secrets_to_rebuild(), self._eligible(), threshold=self.threshold, spare=spare, order=order
        )

    def _valid_unmask(self, replies: Mapping[int, UnmaskReply]) -> dict[int, UnmaskReply]:
        """The replies that answer exactly what their node was asked."""
        requests = self._unmask_plan()[0]
        return {
            h: r
            for h, r in replies.items()
            if h in requests
            and set(r.b_shares) == {*requests[h].survivors, h}
            and set(r.sk_shares) == set(requests[h].dropped)
        }

    def can_rebuild(self, replies: Mapping[int, UnmaskReply]) -> bool:
        """Whether ``replies`` hold ``t`` shares of every secret (the unmask stage may stop)."""
        valid = self._valid_unmask(replies)
        return all(len(hs & valid.keys()) >= self.threshold for hs in self._unmask_plan()[1].values())

    def receive_unmask(self, replies: Mapping[int, UnmaskReply]) -> np.ndarray:
        """Rebuild the secrets and return ``sum_{u in U3} x_u`` modulo M.

        ``replies`` may come from any subset of U3 (see :meth:`unmask_cover`).

        Raises
        ------
        SecAggAbort
            If fewer than ``t`` nodes replied or a secret lacks ``t`` shares.
        """
        valid = self._valid_unmask(replies)
        self._need(valid, "unmask")
        t = self.threshold
        total = np.zeros_like(next(iter(self._masked.values())))
        for y in self._masked.values():
            np.add(total, y, out=total)
        seeds, signs = [], []
        for u in sorted(self.u3):
            shares = {h: r.b_shares[u] for h, r in valid.items() if u in r.b_shares}
            if len(shares) < t:
                raise SecAggAbort(f"unmask: {len(shares)} shares of node {u}'s self mask, below the threshold of {t}")
            b = self._combine(shares, f"the self mask of node {u}")
            if commitment(self.session, b) != self._share_replies[u].commitment:
                raise SecAggAbort(f"unmask: the rebuilt self mask of node {u} does not match its commitment")
            seeds.append(b)
            signs.append(-1)
        for v in sorted(self.u2 - self.u3):
            partners = [u for u in self.graph[v] if u in self.u3]
            if not partners:
                continue
            shares = {h: r.sk_shares[v] for h, r in valid.items() if v in r.sk_shares}
            if len(shares) < t:
                raise SecAggAbort(
                    f"unmask: {len(shares)} shares of dropped node {v}'s mask key, below the threshold of {t}"
                )
            s_sk = self._combine(shares, f"the mask key of dropped node {v}")
            if x25519_public_key(s_sk) != self._share_replies[v].s_pk:
                raise SecAggAbort(f"unmask: the rebuilt mask key of dropped node {v} does not match its public key")
            # each partner u added sign(u, v) * PRG(s_uv); take it out
            seeds += pair_seeds(s_sk, [self._share_replies[u].s_pk for u in partners], self.session)
            signs += [-mask_sign(u, v) for u in partners]
        add_masks(total, seeds, signs)
        return total

    def _combine(self, shares: Mapping[int, bytes], what: str) -> bytes:
        try:
            return combine_shares(shares, self.threshold)
        except ValueError as err:
            raise SecAggAbort(f"unmask: cannot rebuild {what}: {err}") from err
