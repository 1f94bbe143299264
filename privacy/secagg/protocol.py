"""The SecAgg+ protocol core: node and coordinator state machines with no Flower in sight.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with the sparse neighbour graph of Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead" (CCS 2020). Honest-but-curious coordinator.

Every node has a long-lived X25519 *channel* key pair (advertised once, used only to encrypt
shares) and, per session (one federated round), a fresh *mask* key pair ``(s_sk, s_pk)`` and a
fresh 256-bit self-mask seed ``b``. Nodes are identified by small integer indices ``1..n``
(also their Shamir x-coordinates). With ``N(u)`` the neighbours of ``u`` in the graph:

1. **advertise keys** (only for nodes whose channel key the coordinator does not hold yet):
   the node replies with its channel public key ``c_pk``.
2. **share keys**: the coordinator sends ``u`` the channel keys of ``N(u)``. ``u`` draws
   ``s_sk`` and ``b``, Shamir-shares both among ``{u} + N(u)`` with threshold ``t``, encrypts the
   share pair for each ``v`` with AES-GCM under ``HKDF(X25519(c_sk_u, c_pk_v), session)`` and
   replies ``s_pk``, a commitment ``SHA-256(session || b)`` and the ciphertexts. Responders form
   ``U2`` (nodes whose neighbourhood within U2 falls below ``t - 1`` are pruned).
3. **masked input**: the coordinator forwards to ``u`` the ciphertexts addressed to it and the
   mask keys ``s_pk_v`` of ``v`` in ``N(u) & U2``. ``u`` sends::

       y_u = x_u + PRG(b_u) + sum_{v in N(u) & U2} sign(u, v) PRG(s_uv)    (mod M)

   with ``s_uv = HKDF(X25519(s_sk_u, s_pk_v), session)`` and ``sign = +1 if u < v else -1``, so
   the pairwise masks cancel in the sum. Responders form ``U3``.
4. **unmask**: the coordinator tells ``u in U3`` which neighbours survived (``N(u) & U3``) and
   which dropped (``N(u) & (U2 - U3)``); it need not ask every ``u``, only enough nodes to hold
   ``t`` shares of each secret (:meth:`ServerSession.unmask_cover`), and asks the rest only if
   some of those do not answer. ``u`` returns its shares of ``b_v`` for survivors (and
   itself) and of ``s_sk_v`` for the dropped, never both for the same ``v``. The coordinator
   rebuilds ``b_u`` for every ``u in U3`` and ``s_sk_v`` for every dropped ``v``, and computes::

       sum_{u in U3} x_u = sum y_u - sum PRG(b_u) - sum_{u in U3, v dropped} sign(u, v) PRG(s_uv)

Dropout semantics: a node that leaves before its masked input is excluded from the sum; one
that leaves after it is still included (its self mask is rebuilt from its neighbours' shares).
Fewer than ``t`` survivors at any stage, or fewer than ``t`` shares of a secret that must be
rebuilt, aborts the session with :class:`SecAggAbort` and a reason.

:func:`run_round_locally` drives a whole session in memory (tests and benchmarks).
"""

from __future__ import annotations

import math
import os
import random
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.secagg.crypto import (
    KEY_BYTES,
    SEED_BYTES,
    add_masks,
    aead_decrypt,
    aead_encrypt,
    hkdf_sha256,
    sha256,
    x25519_keypair,
    x25519_public_key,
    x25519_shared_secrets,
)
from privacy.secagg.shamir import combine_shares, share_length, split_secret

__all__ = [
    "SESSION_BYTES",
    "SecAggAbort",
    "resolve_threshold",
    "neighbour_graph",
    "ShareKeysRequest",
    "ShareKeysReply",
    "MaskRequest",
    "UnmaskRequest",
    "UnmaskReply",
    "NodeSession",
    "ServerSession",
    "new_channel_keypair",
    "run_round_locally",
]

SESSION_BYTES = 16
_INFO_CHANNEL = b"fedmart/secagg/v1/share-encryption"
_INFO_PAIR = b"fedmart/secagg/v1/pairwise-mask"
_INFO_COMMIT = b"fedmart/secagg/v1/self-mask-commitment"
_SHARE_BYTES = share_length(KEY_BYTES)  # one Shamir share of a 32-byte secret


class SecAggAbort(RuntimeError):
    """The session cannot complete; ``reason`` says why (the model must stay unchanged)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_channel_keypair() -> tuple[bytes, bytes]:
    """A node's long-lived channel key pair ``(c_sk, c_pk)``."""
    return x25519_keypair()


def resolve_threshold(spec: int | float, share_count: int) -> int:
    """The reconstruction threshold ``t`` for secrets shared among ``share_count`` holders.

    A float in ``(0, 1]`` is a fraction of the holders (at least 2); an int is a count.

    Raises
    ------
    SecAggAbort
        If ``t`` exceeds the number of holders or fewer than 2 holders exist.
    """
    if share_count < 2:
        raise SecAggAbort(f"secure aggregation needs at least 2 nodes, got {share_count}")
    t = max(2, math.ceil(spec * share_count - 1e-9)) if isinstance(spec, float) else int(spec)
    if t > share_count:
        raise SecAggAbort(f"threshold {t} exceeds the {share_count} holders of each secret")
    return t


def neighbour_graph(indices: Sequence[int], k: int, rng: random.Random | None = None) -> dict[int, tuple[int, ...]]:
    """SecAgg+ communication graph: a Harary graph H(k, n) over a random permutation.

    Every node is joined to the ``k / 2`` nodes on each side of it in a random ring, so each
    has exactly ``min(k, n - 1)`` neighbours. ``k = 0`` or ``k >= n - 1`` gives the complete
    graph (plain SecAgg). ``k`` must be even.
    """
    if k < 0 or k % 2:
        raise ValueError(f"neighbours must be 0 or an even number >= 2, got {k}")
    nodes = list(indices)
    n = len(nodes)
    if k == 0 or k >= n - 1:
        return {u: tuple(v for v in nodes if v != u) for u in nodes}
    order = nodes[:]
    (rng or secrets.SystemRandom()).shuffle(order)
    graph: dict[int, tuple[int, ...]] = {}
    for p, u in enumerate(order):
        graph[u] = tuple(sorted(order[(p + o) % n] for o in range(-k // 2, k // 2 + 1) if o != 0))
    return graph


def _channel_keys(c_sk: bytes, peer_c_pks: Sequence[bytes], session: bytes) -> list[bytes]:
    """AES-GCM keys shared with each peer for this session."""
    return [hkdf_sha256(z, salt=session, info=_INFO_CHANNEL) for z in x25519_shared_secrets(c_sk, peer_c_pks)]


def _pair_seeds(s_sk: bytes, peer_s_pks: Sequence[bytes], session: bytes) -> list[bytes]:
    """Pairwise mask seeds (256 bits) with each peer for this session."""
    return [
        hkdf_sha256(z, salt=session, info=_INFO_PAIR, length=SEED_BYTES)
        for z in x25519_shared_secrets(s_sk, peer_s_pks)
    ]


def _commitment(session: bytes, b: bytes) -> bytes:
    return sha256(_INFO_COMMIT + session + b)


def _share_aad(session: bytes, src: int, dst: int) -> bytes:
    return session + src.to_bytes(4, "big") + dst.to_bytes(4, "big")


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


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
        keys = _channel_keys(c_sk, [request.neighbours[v] for v in holders], request.session)
        ciphertexts = {
            v: aead_encrypt(key, b_share + sk_share, _share_aad(request.session, me, v))
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
        return node, ShareKeysReply(s_pk=s_pk, commitment=_commitment(request.session, b), ciphertexts=ciphertexts)

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
            aad = _share_aad(self.session, v, self.index)
            plain = aead_decrypt(self.channel_keys[v], request.ciphertexts[v], aad)
            if len(plain) != 2 * _SHARE_BYTES:
                raise ValueError(f"malformed share pair from node {v}")
            self.held_b[v], self.held_sk[v] = plain[:_SHARE_BYTES], plain[_SHARE_BYTES:]
        if x.ndim != 1 or x.dtype.kind != "u":
            raise ValueError("the encoded input must be a 1-d unsigned integer array")
        y = x if in_place else x.copy()
        seeds = [self.b, *_pair_seeds(self.s_sk, s_pks, self.session)]
        signs = [1] + [_sign(self.index, v) for v in peers]
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
    """

    def __init__(
        self,
        indices: Sequence[int],
        *,
        threshold: int | float,
        neighbours: int,
        session: bytes | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if len(set(indices)) != len(indices) or any(i < 1 for i in indices):
            raise ValueError("node indices must be distinct positive integers")
        self.session = session if session is not None else os.urandom(SESSION_BYTES)
        self.graph = neighbour_graph(indices, neighbours, rng)
        share_count = 1 + min((len(n) for n in self.graph.values()), default=0)
        self.threshold = resolve_threshold(threshold, share_count)
        self.u1: frozenset[int] = frozenset(indices)
        self.u2: frozenset[int] = frozenset()
        self.u3: frozenset[int] = frozenset()
        self._share_replies: dict[int, ShareKeysReply] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._unmask_cache: tuple[dict[int, UnmaskRequest], dict[tuple[str, int], frozenset[int]]] | None = None

    def _need(self, survivors: Collection[int], stage: str) -> None:
        if len(survivors) < self.threshold:
            raise SecAggAbort(f"{stage}: only {len(survivors)} nodes left, below the threshold of {self.threshold}")

    # --- stage 2 ------------------------------------------------------------------------------
    def share_keys_requests(self, channel_pks: Mapping[int, bytes]) -> dict[int, ShareKeysRequest]:
        """One request per participant, carrying its neighbours' channel keys."""
        missing = self.u1 - set(channel_pks)
        if missing:
            raise ValueError(f"no channel key for nodes {sorted(missing)}")
        return {
            u: ShareKeysRequest(self.session, u, self.threshold, {v: channel_pks[v] for v in self.graph[u]})
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
        for u in sorted(self.u2):
            peers = [v for v in self.graph[u] if v in self.u2]
            out[u] = MaskRequest(
                session=self.session,
                neighbour_s_pks={v: self._share_replies[v].s_pk for v in peers},
                ciphertexts={v: self._share_replies[v].ciphertexts[u] for v in peers},
            )
        return out

    def receive_masked(self, vectors: Mapping[int, np.ndarray], length: int, dtype: np.dtype) -> frozenset[int]:
        """Keep masked vectors of the right shape from nodes in U2; returns U3."""
        dtype = np.dtype(dtype)
        self._masked = {u: y for u, y in vectors.items() if u in self.u2 and y.shape == (length,) and y.dtype == dtype}
        self._need(self._masked, "masked input")
        self.u3 = frozenset(self._masked)
        self._unmask_cache = None
        return self.u3

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
        return {
            u: UnmaskRequest(
                session=self.session,
                survivors=[v for v in self.graph[u] if v in self.u3],
                dropped=[v for v in self.graph[u] if v in dropped],
            )
            for u in sorted(self.u3)
        }

    def secrets_to_rebuild(self) -> dict[tuple[str, int], frozenset[int]]:
        """Each secret the unmask stage must rebuild, mapped to the nodes of U3 holding a share.

        ``("b", u)`` for every ``u`` in U3 (held by ``u`` and its neighbours in U3) and
        ``("sk", v)`` for every dropped ``v`` with a neighbour in U3 (held by those neighbours).
        """
        return dict(self._unmask_plan()[1])

    def _build_secrets(self) -> dict[tuple[str, int], frozenset[int]]:
        out: dict[tuple[str, int], frozenset[int]] = {}
        for u in sorted(self.u3):
            out[("b", u)] = frozenset({u, *self.graph[u]} & self.u3)
        for v in sorted(self.u2 - self.u3):
            partners = frozenset(self.graph[v]) & self.u3
            if partners:
                out[("sk", v)] = partners
        return out

    def unmask_cover(self, spare: int = 0, order: Sequence[int] | None = None) -> list[int]:
        """Nodes of U3 to ask first: together they hold ``t + spare`` shares of every secret.

        Rebuilding needs only ``t`` shares of each secret, so the unmask stage need not ask
        every survivor: with the complete graph any ``t + spare`` of them will do. Greedy set
        multicover: repeatedly take the node that holds shares of the most secrets still short
        (ties go to the earlier node in ``order``, default ascending). A secret with fewer
        holders than ``t + spare`` gets all of them. Asking fewer nodes reveals fewer shares and
        lets the stage finish without waiting for stragglers; the ``spare`` holders absorb
        nodes that drop during the stage without a second wave.
        """
        if spare < 0:
            raise ValueError(f"spare must be >= 0, got {spare}")
        holders = self.secrets_to_rebuild()
        need = {s: min(self.threshold + spare, len(h)) for s, h in holders.items()}
        held_by: dict[int, list[tuple[str, int]]] = {u: [] for u in self.u3}
        for s, hs in holders.items():
            for h in hs:
                held_by[h].append(s)
        candidates = list(order) if order is not None else sorted(self.u3)
        if set(candidates) != set(self.u3) or len(candidates) != len(self.u3):
            raise ValueError("order must list every node of U3 once")
        chosen: list[int] = []
        while candidates and any(n > 0 for n in need.values()):
            gain, best = max((sum(need[s] > 0 for s in held_by[h]), -i) for i, h in enumerate(candidates))
            if gain == 0:
                break
            h = candidates[-best]
            chosen.append(h)
            candidates.remove(h)
            for s in held_by[h]:
                need[s] -= 1
        return chosen

    def _valid_unmask(self, replies: Mapping[int, UnmaskReply]) -> dict[int, UnmaskReply]:
        """The replies that answer exactly what their node was asked."""
        requests = self._unmask_plan()[0]
        return {
            h: r
            for h, r in replies.items()
            if h in self.u3
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
            if _commitment(self.session, b) != self._share_replies[u].commitment:
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
            seeds += _pair_seeds(s_sk, [self._share_replies[u].s_pk for u in partners], self.session)
            signs += [-_sign(u, v) for u in partners]
        add_masks(total, seeds, signs)
        return total

    def _combine(self, shares: Mapping[int, bytes], what: str) -> bytes:
        try:
            return combine_shares(shares, self.threshold)
        except ValueError as err:
            raise SecAggAbort(f"unmask: cannot rebuild {what}: {err}") from err


def run_round_locally(
    inputs: Mapping[int, np.ndarray],
    *,
    threshold: int | float,
    neighbours: int = 0,
    drop: Mapping[str, Collection[int]] | None = None,
    transcript: list[tuple[str, int, Any]] | None = None,
    spare: int | None = None,
) -> tuple[np.ndarray, frozenset[int]]:
    """Run one session in memory: ``inputs`` maps node index -> encoded unsigned vector.

    ``drop`` maps a stage (``"advertise"``, ``"share-keys"``, ``"masked-input"``, ``"unmask"``)
    to the nodes that do not answer it. If ``transcript`` is given, every message the
    coordinator *receives* is appended as ``(stage, sender, payload)``. ``spare=None`` asks
    every survivor to unmask; an int asks :meth:`ServerSession.unmask_cover` first and the rest
    only if the first wave's answers cannot rebuild every secret (as the strategy does).

    Returns
    -------
    tuple[np.ndarray, frozenset[int]]
        The unmasked sum and the nodes whose inputs it contains.

    Raises
    ------
    SecAggAbort
        When the session cannot complete.
    """
    drop = drop or {}
    record = transcript if transcript is not None else []
    channel = {u: new_channel_keypair() for u in inputs}
    known = [u for u in inputs if u not in drop.get("advertise", ())]
    for u in known:
        record.append(("advertise", u, channel[u][1]))
    server = ServerSession(known, threshold=threshold, neighbours=neighbours)
    requests = server.share_keys_requests({u: channel[u][1] for u in known})
    nodes, replies = {}, {}
    for u, req in requests.items():
        if u in drop.get("share-keys", ()):
            continue
        nodes[u], replies[u] = NodeSession.share_keys(req, channel[u][0])
        record.append(("share-keys", u, replies[u]))
    server.receive_share_keys(replies)
    masked = {}
    for u, mreq in server.mask_requests().items():
        if u in drop.get("masked-input", ()):
            continue
        masked[u] = nodes[u].mask(mreq, inputs[u])
        record.append(("masked-input", u, masked[u]))
    sample = next(iter(inputs.values()))
    server.receive_masked(masked, sample.size, sample.dtype)
    requests = server.unmask_requests()
    first = list(requests) if spare is None else server.unmask_cover(spare)
    unmask_replies: dict[int, UnmaskReply] = {}
    for wave in (first, [u for u in requests if u not in first]):
        for u in wave:
            if u in drop.get("unmask", ()):
                continue
            unmask_replies[u] = nodes[u].unmask(requests[u])
            record.append(("unmask", u, unmask_replies[u]))
        if server.can_rebuild(unmask_replies):
            break
    return server.receive_unmask(unmask_replies), server.u3
