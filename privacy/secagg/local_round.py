"""A whole secure-aggregation session in memory, node and coordinator sides together (tests and benchmarks).

No Flower and no network: it calls :class:`~privacy.secagg.node_session.NodeSession` and
:class:`~privacy.secagg.server_session.ServerSession` as the mod and the strategy would,
including the unmask stage's first wave (a cover) and second wave.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from privacy.secagg.key_agreement import new_channel_keypair
from privacy.secagg.node_session import NodeSession
from privacy.secagg.server_session import ServerSession
from privacy.secagg.stage_messages import UnmaskReply

__all__ = ["run_round_locally"]


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
