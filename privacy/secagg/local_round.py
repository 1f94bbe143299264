"""A whole secure-aggregation session in memory, node and coordinator sides together (tests and benchmarks).

No Flower and no network: it calls :class:`~privacy.secagg.node_session.NodeSession` and
:class:`~privacy.secagg.server_session.ServerSession` as the mod and the strategy would,
including the unmask stage's first wave (a cover) and second wave, and in the active mode the
roster signatures and, after a masked-input dropout, the consistency stage.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from privacy.secagg.identity import NodeIdentity, in_memory_identities
from privacy.secagg.key_agreement import new_channel_keypair
from privacy.secagg.node_session import NodeSession
from privacy.secagg.server_session import ServerSession
from privacy.secagg.stage_messages import UnmaskReply
from privacy.secagg.wire import ACTIVE, SEMI_HONEST

__all__ = ["run_round_locally"]


def run_round_locally(
    inputs: Mapping[int, np.ndarray],
    *,
    threshold: int | float,
    neighbours: int = 0,
    drop: Mapping[str, Collection[int]] | None = None,
    transcript: list[tuple[str, int, Any]] | None = None,
    spare: int | None = None,
    adversary: str = SEMI_HONEST,
    identities: Mapping[int, NodeIdentity] | None = None,
    server_round: int = 1,
    channel: Mapping[int, tuple[bytes, bytes]] | None = None,
) -> tuple[np.ndarray, frozenset[int]]:
    """Run one session in memory: ``inputs`` maps node index -> encoded unsigned vector.

    ``drop`` maps a stage (``"advertise"``, ``"share-keys"``, ``"masked-input"``,
    ``"consistency"``, ``"unmask"``) to the nodes that do not answer it. If ``transcript`` is
    given, every message the coordinator *receives* is appended as ``(stage, sender, payload)``.
    ``spare=None`` asks every survivor to unmask; an int asks :meth:`ServerSession.unmask_cover`
    first and the rest only if the first wave's answers cannot rebuild every secret (as the
    strategy does). ``adversary="active"`` runs the active-adversary mode with ``identities``
    (node index -> its roster identity; a fresh in-memory roster of the inputs' nodes if None).
    ``channel`` maps a node to its long-lived channel key pair ``(c_sk, c_pk)``, as a running node
    keeps it across rounds (fresh pairs if None).

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
    active = adversary == ACTIVE
    ids: Mapping[int, NodeIdentity | None] = (
        (identities if identities is not None else in_memory_identities(sorted(inputs)))
        if active
        else dict.fromkeys(inputs)
    )
    channel = channel if channel is not None else {u: new_channel_keypair() for u in inputs}
    known = [u for u in inputs if u not in drop.get("advertise", ())]
    certs = {}
    for u in known:
        record.append(("advertise", u, channel[u][1]))
        if active:
            certs[u] = ids[u].channel_cert(channel[u][1])  # type: ignore[union-attr]
    roster_size = len(next(iter(ids.values())).roster) if active else 0  # type: ignore[union-attr]
    server = ServerSession(
        known,
        threshold=threshold,
        neighbours=neighbours,
        server_round=server_round,
        adversary=adversary,
        roster_size=roster_size,
    )
    requests = server.share_keys_requests({u: channel[u][1] for u in known}, certs)
    nodes, replies = {}, {}
    for u, req in requests.items():
        if u in drop.get("share-keys", ()):
            continue
        nodes[u], replies[u] = NodeSession.share_keys(req, channel[u][0], ids[u])
        record.append(("share-keys", u, replies[u]))
    server.receive_share_keys(replies)
    masked, signatures = {}, {}
    for u, mreq in server.mask_requests().items():
        if u in drop.get("masked-input", ()):
            continue
        masked[u] = nodes[u].mask(mreq, inputs[u], identity=ids[u])
        signatures[u] = nodes[u].u2_signature
        record.append(("masked-input", u, masked[u]))
    sample = next(iter(inputs.values()))
    server.receive_masked(masked, sample.size, sample.dtype, signatures)
    if server.needs_consistency:
        signed = {
            u: nodes[u].consistency(req, ids[u])
            for u, req in server.consistency_requests().items()
            if u not in drop.get("consistency", ())
        }
        record.extend(("consistency", u, s) for u, s in signed.items())
        server.receive_consistency(signed)
    requests = server.unmask_requests()
    first = list(requests) if spare is None else server.unmask_cover(spare)
    unmask_replies: dict[int, UnmaskReply] = {}
    for wave in (first, [u for u in requests if u not in first]):
        for u in wave:
            if u in drop.get("unmask", ()):
                continue
            unmask_replies[u] = nodes[u].unmask(requests[u], ids[u])
            record.append(("unmask", u, unmask_replies[u]))
        if server.can_rebuild(unmask_replies):
            break
    return server.receive_unmask(unmask_replies), server.u3
