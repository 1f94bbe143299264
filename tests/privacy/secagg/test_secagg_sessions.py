"""Both sides of one session (privacy/secagg/node_session.py, server_session.py): a node refuses what would
leak, survives serialisation between stages, and a corrupted share is caught by the coordinator."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.secagg.graph import SecAggAbort
from privacy.secagg.key_agreement import new_channel_keypair
from privacy.secagg.node_session import NodeSession
from privacy.secagg.server_session import ServerSession
from privacy.secagg.stage_messages import MaskRequest, UnmaskRequest


def _two_sessions() -> tuple[ServerSession, dict[int, NodeSession], dict[int, tuple[bytes, bytes]]]:
    keys = {u: new_channel_keypair() for u in (1, 2, 3)}
    server = ServerSession([1, 2, 3], threshold=2, neighbours=0)
    reqs = server.share_keys_requests({u: k[1] for u, k in keys.items()})
    nodes, replies = {}, {}
    for u, r in reqs.items():
        nodes[u], replies[u] = NodeSession.share_keys(r, keys[u][0])
    server.receive_share_keys(replies)
    return server, nodes, keys


def test_node_answers_unmask_once_and_never_both_secrets() -> None:
    server, nodes, _ = _two_sessions()
    reqs = server.mask_requests()
    for u, node in nodes.items():
        node.mask(reqs[u], np.zeros(4, np.uint32))
    s = server.session

    with pytest.raises(ValueError, match="both a survivor and dropped"):
        nodes[1].unmask(UnmaskRequest(s, survivors=[2, 3], dropped=[2]))
    nodes[1].unmask(UnmaskRequest(s, survivors=[2], dropped=[3]))
    with pytest.raises(ValueError, match="out of order"):
        nodes[1].unmask(UnmaskRequest(s, survivors=[2, 3], dropped=[]))


def test_node_rejects_other_sessions_out_of_order_stages_and_strangers() -> None:
    server, nodes, _ = _two_sessions()
    reqs = server.mask_requests()
    other = MaskRequest(b"\x00" * 16, reqs[1].neighbour_s_pks, reqs[1].ciphertexts)

    with pytest.raises(ValueError, match="another secure-aggregation session"):
        nodes[1].mask(other, np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match="out of order"):
        nodes[1].unmask(UnmaskRequest(server.session, survivors=[2, 3], dropped=[]))
    stranger = MaskRequest(server.session, {9: b"k" * 32}, {9: b"c" * 40})
    with pytest.raises(ValueError, match="not this node's neighbours"):
        nodes[1].mask(stranger, np.zeros(4, np.uint32))
    swapped = MaskRequest(
        server.session, reqs[1].neighbour_s_pks, {2: reqs[1].ciphertexts[3], 3: reqs[1].ciphertexts[2]}
    )
    with pytest.raises(ValueError, match="authentication"):
        nodes[1].mask(swapped, np.zeros(4, np.uint32))  # AAD binds sender and receiver


def test_node_session_survives_serialisation_between_stages() -> None:
    server, nodes, _ = _two_sessions()
    mask_reqs = server.mask_requests()

    def reload(node: NodeSession) -> NodeSession:  # what ctxt.state does between messages
        return NodeSession.from_dict(node.to_dict())

    nodes = {u: reload(n) for u, n in nodes.items()}
    masked = {u: nodes[u].mask(mask_reqs[u], np.full(6, u, np.uint32)) for u in nodes}
    nodes = {u: reload(n) for u, n in nodes.items()}
    server.receive_masked(masked, 6, np.uint32)
    total = server.receive_unmask({u: nodes[u].unmask(r) for u, r in server.unmask_requests().items()})

    assert total.tolist() == [1 + 2 + 3] * 6


def test_corrupted_share_is_detected_by_the_commitment() -> None:
    server, nodes, _ = _two_sessions()
    reqs = server.mask_requests()
    masked = {u: nodes[u].mask(reqs[u], np.ones(3, np.uint32)) for u in nodes}
    server.receive_masked(masked, 3, np.uint32)
    replies = {u: nodes[u].unmask(r) for u, r in server.unmask_requests().items()}
    bad = dict(replies[1].b_shares)
    bad[2] = bad[2][:-1] + bytes([bad[2][-1] ^ 1])
    replies = {2: replies[2], 1: type(replies[1])(b_shares=bad, sk_shares=replies[1].sk_shares)}

    with pytest.raises(SecAggAbort, match="commitment|rebuild"):
        server.receive_unmask(replies)
