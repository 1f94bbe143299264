"""A coordinator that cheats at secure aggregation, written with fedmart's own protocol code.

The helpers here are the attacks: they drive real :class:`~privacy.secagg.node_session.NodeSession`
objects (the nodes, honest) with messages a dishonest coordinator builds from a real
:class:`~privacy.secagg.server_session.ServerSession` and then alters. Tests run with
``--import-mode=importlib``, so the ``attack`` fixture hands the helpers over.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from privacy.secagg.crypto import add_masks
from privacy.secagg.identity import NodeIdentity, in_memory_identities
from privacy.secagg.key_agreement import mask_sign, new_channel_keypair, pair_seeds
from privacy.secagg.node_session import NodeSession
from privacy.secagg.server_session import ServerSession
from privacy.secagg.shamir import combine_shares
from privacy.secagg.stage_messages import ConsistencyRequest, UnmaskReply, UnmaskRequest
from privacy.secagg.wire import ACTIVE

D = 16  # length of every node's input vector


@dataclass
class Federation:
    """n honest nodes with their channel keys, roster identities (active mode) and secret inputs."""

    n: int
    adversary: str
    inputs: dict[int, np.ndarray]
    channel: dict[int, tuple[bytes, bytes]]
    ids: dict[int, NodeIdentity | None]
    nodes: dict[int, NodeSession] = field(default_factory=dict)
    refusals: dict[int, list[str]] = field(default_factory=dict)

    def certs(self) -> dict:
        return {u: i.channel_cert(self.channel[u][1]) for u, i in self.ids.items() if i is not None}

    def roster_size(self) -> int:
        first = next(iter(self.ids.values()))
        return len(first.roster) if first is not None else 0

    def answer(self, u: int, call, *args, **kwargs):
        """Node ``u`` answers ``call``, or refuses: its reasons are kept in :attr:`refusals`."""
        try:
            return call(*args, **kwargs)
        except ValueError as err:
            self.refusals.setdefault(u, []).append(str(err))
            return None


def federation(n: int, adversary: str, seed: int = 0) -> Federation:
    rng = np.random.default_rng(seed)
    inputs = {u: rng.integers(0, 2**32, size=D, dtype=np.uint32) for u in range(1, n + 1)}
    ids = in_memory_identities(list(inputs)) if adversary == ACTIVE else dict.fromkeys(inputs)
    return Federation(n, adversary, inputs, {u: new_channel_keypair() for u in inputs}, ids)


def honest_until_masked(fed: Federation, *, threshold: int | float, server_round: int = 1) -> ServerSession:
    """Run the share-keys and masked-input stages as written; the coordinator cheats only afterwards."""
    server = ServerSession(
        list(fed.inputs),
        threshold=threshold,
        neighbours=0,
        server_round=server_round,
        adversary=fed.adversary,
        roster_size=fed.roster_size(),
    )
    requests = server.share_keys_requests({u: kp[1] for u, kp in fed.channel.items()}, fed.certs())
    replies = {}
    for u, req in requests.items():
        out = fed.answer(u, NodeSession.share_keys, req, fed.channel[u][0], fed.ids[u])
        if out is not None:
            fed.nodes[u], replies[u] = out
    if fed.refusals:
        return server
    server.receive_share_keys(replies)
    masked, sigs = {}, {}
    for u, mreq in server.mask_requests().items():
        masked[u] = fed.nodes[u].mask(mreq, fed.inputs[u], identity=fed.ids[u])
        sigs[u] = fed.nodes[u].u2_signature
    server.receive_masked(masked, D, np.uint32, sigs)
    return server


def partition_attack(
    fed: Federation, server: ServerSession, rng: random.Random
) -> tuple[dict[int, np.ndarray], list[frozenset[int]]]:
    """Tell half A that half B dropped and B that A dropped; combine A's self-mask shares with B's key shares.

    Returns every input the coordinator recovered (node -> x_u) and the two halves. In the active mode it also
    plays the consistency stage its way: A signs "U3 = A", B signs "U3 = B"; each node is
    shown its own half's signatures.
    """
    order = sorted(fed.inputs)
    rng.shuffle(order)
    cut = rng.randint(2, fed.n - 2)
    halves = [frozenset(order[:cut]), frozenset(order[cut:])]
    replies: dict[int, UnmaskReply] = {}
    for mine in halves:
        others = frozenset(fed.inputs) - mine
        signatures: dict[int, bytes] = {}
        if fed.adversary == ACTIVE:
            for u in mine:
                sig = fed.answer(
                    u, fed.nodes[u].consistency, ConsistencyRequest(server.session, sorted(mine)), fed.ids[u]
                )
                if sig is not None:
                    signatures[u] = sig
        for u in mine:
            request = UnmaskRequest(
                server.session, sorted(mine - {u}), sorted(others), u3=sorted(mine), signatures=signatures
            )
            reply = fed.answer(u, fed.nodes[u].unmask, request, fed.ids[u])
            if reply is not None:
                replies[u] = reply
    return recover_inputs(fed, server, replies), halves


def recover_inputs(fed: Federation, server: ServerSession, replies: Mapping[int, UnmaskReply]) -> dict[int, np.ndarray]:
    """Every x_u for which the revealed shares hold both b_u and s_sk_u (t shares each)."""
    t = server.threshold
    s_pks = {u: server._share_replies[u].s_pk for u in fed.nodes}
    out = {}
    for u in fed.nodes:
        b = {h: r.b_shares[u] for h, r in replies.items() if u in r.b_shares}
        sk = {h: r.sk_shares[u] for h, r in replies.items() if u in r.sk_shares}
        if len(b) < t or len(sk) < t:
            continue
        b_u, s_sk_u = combine_shares(b, t), combine_shares(sk, t)
        peers = [v for v in fed.nodes if v != u]
        y = server._masked[u].copy()  # the masked input the coordinator received
        seeds = [b_u, *pair_seeds(s_sk_u, [s_pks[v] for v in peers], server.session)]
        add_masks(y, seeds, [-1] + [-mask_sign(u, v) for v in peers])
        out[u] = y
    return out


def replace(obj, **changes):
    return dataclasses.replace(obj, **changes)


@pytest.fixture(scope="session")
def attack() -> SimpleNamespace:
    """The cheating coordinator's tools (see the module docstring)."""
    return SimpleNamespace(
        federation=federation,
        honest_until_masked=honest_until_masked,
        partition_attack=partition_attack,
        recover_inputs=recover_inputs,
        replace=replace,
        D=D,
    )
