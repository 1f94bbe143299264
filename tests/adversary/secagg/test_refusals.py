"""Each way a coordinator can cheat the active mode, and the node's refusal (fedmart's own protocol code).

Every test builds the honest messages with ServerSession, alters them as an attacker would, and
asserts the node's reason: substituted channel or mask keys, a non-member, a replayed session
(also after a restart), a replayed round's ciphertexts, a threshold or a degree below what the
roster demands, a semi-honest session under an active policy, forged or replayed survivor
signatures, a second survivor set, and a survivor set the node never signed.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.secagg.crypto import aead_decrypt
from privacy.secagg.graph import active_threshold, minimum_degree
from privacy.secagg.key_agreement import channel_keys, keys_aad, new_channel_keypair
from privacy.secagg.node_session import NodeSession
from privacy.secagg.roster import RosterKey
from privacy.secagg.seen_sessions import SeenSessions
from privacy.secagg.server_session import ServerSession
from privacy.secagg.stage_messages import ChannelCert, ConsistencyRequest, UnmaskRequest
from privacy.secagg.statements import keys_statement, survivors_statement


def _share_keys(attack, fed, server, alter=lambda u, req: req):
    """Every node answers its (altered) share-keys request; returns the replies of those that agreed."""
    replies = {}
    for u, req in server.share_keys_requests({u: kp[1] for u, kp in fed.channel.items()}, fed.certs()).items():
        out = fed.answer(u, NodeSession.share_keys, alter(u, req), fed.channel[u][0], fed.ids[u])
        if out is not None:
            fed.nodes[u], replies[u] = out
    return replies


def _server(fed, n: int | None = None, **kwargs) -> ServerSession:
    kwargs = {"threshold": 0.5, "neighbours": 0, "adversary": "active", "roster_size": fed.roster_size(), **kwargs}
    return ServerSession(list(fed.inputs)[:n], **kwargs)


def test_a_substituted_channel_key_is_refused(attack) -> None:
    fed = attack.federation(5, "active")
    server = _server(fed)
    _, evil_pk = new_channel_keypair()  # the coordinator's own key, in place of node 2's

    def swap(u, req):
        return attack.replace(req, neighbours={**req.neighbours, 2: evil_pk}) if 2 in req.neighbours else req

    _share_keys(attack, fed, server, swap)

    assert set(fed.refusals) == {1, 3, 4, 5}
    assert all("neighbour 2's channel key is not signed by roster member" in r[0] for r in fed.refusals.values())


def test_a_non_member_is_refused(attack) -> None:
    fed = attack.federation(5, "active")
    server = _server(fed)
    forged = Ed25519PrivateKey.generate()  # a Sybil: the coordinator's own key, not in the nodes' roster
    fp = RosterKey(forged).fingerprint

    def forge(u, req):
        if 2 not in req.neighbours:
            return req
        return attack.replace(req, certs={**req.certs, 2: ChannelCert(fp, forged.sign(b"anything"))})

    _share_keys(attack, fed, server, forge)

    assert all("neighbour 2 is not a roster member" in r[0] for r in fed.refusals.values())


def test_a_substituted_mask_key_is_refused(attack) -> None:
    fed = attack.federation(5, "active")
    server = _server(fed)
    server.receive_share_keys(_share_keys(attack, fed, server))
    _, evil_s_pk = new_channel_keypair()
    request = server.mask_requests()[1]
    swapped = attack.replace(request, neighbour_s_pks={**request.neighbour_s_pks, 3: evil_s_pk})

    fed.answer(1, fed.nodes[1].mask, swapped, fed.inputs[1], identity=fed.ids[1])

    assert "neighbour 3's shares do not authenticate the mask key" in fed.refusals[1][0]
    assert fed.nodes[1].stage == "shared"  # nothing was masked, nothing sent


def test_a_replayed_session_is_refused_even_after_a_restart(attack, tmp_path) -> None:
    fed = attack.federation(4, "active")
    fed.ids = {u: attack.replace(i, seen=SeenSessions(tmp_path / str(u))) for u, i in fed.ids.items()}
    server = _server(fed)
    requests = server.share_keys_requests({u: kp[1] for u, kp in fed.channel.items()}, fed.certs())
    NodeSession.share_keys(requests[1], fed.channel[1][0], fed.ids[1])
    restarted = attack.replace(fed.ids[1], seen=SeenSessions(tmp_path / "1"))  # a new process, same state dir

    with pytest.raises(ValueError, match="was seen before by this node: a replayed session"):
        NodeSession.share_keys(requests[1], fed.channel[1][0], restarted)
    assert (tmp_path / "1" / "secagg-seen.json").is_file()


def test_a_replayed_rounds_ciphertexts_and_keys_are_refused(attack) -> None:
    fed = attack.federation(4, "active")
    old = _server(fed, server_round=1)
    old.receive_share_keys(_share_keys(attack, fed, old))
    old_mask = old.mask_requests()[1]
    new = _server(fed, server_round=2)
    new.receive_share_keys(_share_keys(attack, fed, new))
    request = new.mask_requests()[1]

    # round 1's keys, commitments and nonces (and their shares) replayed into round 2
    fed.answer(1, fed.nodes[1].mask, attack.replace(old_mask, session=new.session), fed.inputs[1], identity=fed.ids[1])
    # only the ciphertexts replayed: the keys are round 2's, but round 1's shares authenticate round 1's
    replayed = attack.replace(request, ciphertexts=old_mask.ciphertexts)
    fed.answer(1, fed.nodes[1].mask, replayed, fed.inputs[1], identity=fed.ids[1])
    # only the mask keys and commitments replayed (round 1's nonces would contradict U2 first):
    # round 2's shares do not authenticate them
    old_keys = {k: getattr(old_mask, k) for k in ("neighbour_s_pks", "commitments")}
    fed.answer(1, fed.nodes[1].mask, attack.replace(request, **old_keys), fed.inputs[1], identity=fed.ids[1])

    whole, shares, keys = fed.refusals[1]
    assert "the U2 this node is shown does not hold its own nonce: not this session" in whole
    reason = "do not authenticate the mask key, commitment and nonce this node was sent"
    assert reason in shares and reason in keys
    assert fed.nodes[1].stage == "shared"


def test_the_round_is_in_the_shares_associated_data(attack) -> None:
    # Even where a session id is reused (semi-honest nodes keep no record), round 1's
    # ciphertexts do not decrypt in round 2.
    fed = attack.federation(3, "semi-honest")
    session = b"s" * 16
    old = ServerSession(list(fed.inputs), threshold=2, neighbours=0, session=session, server_round=1)
    old.receive_share_keys(_share_keys(attack, fed, old))
    old_ct = old.mask_requests()[1].ciphertexts
    new = ServerSession(list(fed.inputs), threshold=2, neighbours=0, session=session, server_round=2)
    new.receive_share_keys(_share_keys(attack, fed, new))

    with pytest.raises(ValueError, match="ciphertext failed authentication"):
        fed.nodes[1].mask(attack.replace(new.mask_requests()[1], ciphertexts=old_ct), fed.inputs[1])


@pytest.mark.parametrize("n", [4, 6, 9, 12])
def test_a_threshold_below_two_thirds_of_the_roster_is_refused(attack, n: int) -> None:
    fed = attack.federation(n, "active")
    server = _server(fed)
    low = active_threshold(n) - 1

    _share_keys(attack, fed, server, lambda u, req: attack.replace(req, threshold=low))

    assert set(fed.refusals) == set(fed.inputs)
    want = f"threshold {low} is below floor(2n/3) + 1 = {active_threshold(n)} for a roster of {n} members"
    assert all(want in r[0] for r in fed.refusals.values())


def test_a_degree_below_the_minimum_is_refused(attack) -> None:
    fed = attack.federation(50, "active")
    server = _server(fed, neighbours=2, threshold=0.5)  # the honest code raises the degree to the minimum
    weak = ServerSession(list(fed.inputs), threshold=2, neighbours=2)  # k = 2 at 50 nodes, as in issue 14
    certs = fed.certs()
    requests = weak.share_keys_requests({u: kp[1] for u, kp in fed.channel.items()})
    for u in (1, 2, 3):
        req = attack.replace(
            requests[u], adversary="active", certs={v: certs[v] for v in requests[u].neighbours}, threshold=3
        )
        fed.answer(u, NodeSession.share_keys, req, fed.channel[u][0], fed.ids[u])

    assert min(len(v) for v in server.graph.values()) >= minimum_degree(50) == 33
    assert set(fed.refusals) == {1, 2, 3}
    assert all("degree 2 is below the minimum 33 for a roster of 50 members" in r[0] for r in fed.refusals.values())


def test_an_active_policy_refuses_a_semi_honest_session(attack) -> None:
    fed = attack.federation(4, "active")
    server = ServerSession(list(fed.inputs), threshold=4, neighbours=0)  # semi-honest

    _share_keys(attack, fed, server)

    assert all(r[0].startswith("policy.secagg_threat_model: ") for r in fed.refusals.values())
    assert set(fed.refusals) == set(fed.inputs)


def _masked(attack, n: int):
    fed = attack.federation(n, "active")
    return fed, attack.honest_until_masked(fed, threshold=0.5)


def test_forged_and_replayed_survivor_signatures_do_not_count(attack) -> None:
    fed, server = _masked(attack, 6)  # t = 5
    honest = server.unmask_requests()[1]
    coordinator = Ed25519PrivateKey.generate()
    x = sorted(fed.inputs)
    forged = {v: coordinator.sign(survivors_statement(fed.nodes[1].sid, x)) for v in x}
    # signatures on the same set, but from another session: the session id hashes every nonce
    _, other = _masked(attack, 6)
    replayed = other.unmask_requests()[1].signatures

    for sigs in (forged, replayed, {1: honest.signatures[1], 2: honest.signatures[2]}):
        fed.answer(1, fed.nodes[1].unmask, attack.replace(honest, signatures=sigs), fed.ids[1])

    assert [r.split(":")[0] for r in fed.refusals[1]] == [
        "only 0 valid member signatures on the survivor set, below the threshold 5",
        "only 0 valid member signatures on the survivor set, below the threshold 5",
        "only 2 valid member signatures on the survivor set, below the threshold 5",
    ]
    assert fed.nodes[1].stage == "masked"  # nothing revealed; the honest request still works
    assert fed.nodes[1].unmask(honest, fed.ids[1]).b_shares


def test_a_node_signs_one_survivor_set_besides_u2_and_reveals_only_for_a_set_it_signed(attack) -> None:
    fed, server = _masked(attack, 7)  # t = 5
    node, me = fed.nodes[1], fed.ids[1]
    node.consistency(ConsistencyRequest(server.session, [1, 2, 3, 4, 5, 6]), me)

    fed.answer(1, node.consistency, ConsistencyRequest(server.session, [1, 2, 3, 4, 5, 7]), me)
    unsigned = UnmaskRequest(server.session, [2, 3, 4, 5], [6, 7], u3=[1, 2, 3, 4, 5])
    fed.answer(1, node.unmask, unsigned, me)

    assert fed.refusals[1] == [
        "this node already signed another survivor set in this session",
        "this node reveals shares only for a survivor set it signed itself, not this one",
    ]


def test_mixing_the_fast_and_the_consistency_survivor_sets_reveals_no_input(attack) -> None:
    # Everyone signs U2 with its masked input; the coordinator then has all but the victim sign
    # "U3 = U2 - {victim}" and asks some nodes to unmask under U2 (revealing the victim's self
    # mask) and the others under the smaller set (revealing its mask key). Each node answers once:
    # b and s_sk need t shares each, 2t > n + 1, so at most one of them is ever rebuilt.
    n, victim = 9, 9
    fed, server = _masked(attack, n)  # t = 7
    t = server.threshold
    smaller = [u for u in fed.inputs if u != victim]
    slow = {u: fed.nodes[u].consistency(ConsistencyRequest(server.session, smaller), fed.ids[u]) for u in smaller}
    fast = server.unmask_requests()
    first = [victim, *smaller[: t - 1]]  # enough for the victim's self mask
    replies = {u: fed.nodes[u].unmask(fast[u], fed.ids[u]) for u in first}
    for u in smaller[t - 1 :]:
        request = UnmaskRequest(server.session, [], [victim], u3=smaller, signatures=slow)
        replies[u] = fed.nodes[u].unmask(request, fed.ids[u])

    assert sum(victim in r.b_shares for r in replies.values()) == t
    assert sum(victim in r.sk_shares for r in replies.values()) == n - t < t
    assert attack.recover_inputs(fed, server, replies) == {}


def test_keys_are_authenticated_over_session_round_index_and_member(attack) -> None:
    # Node 2's shares to node 3 authenticate its keys statement: any other session, round,
    # index, member, channel key, mask key, commitment or nonce fails to decrypt at node 3.
    fed = attack.federation(4, "active")
    server = _server(fed, server_round=7)
    replies = _share_keys(attack, fed, server)
    r, me = replies[2], fed.ids[2]
    c_pk = fed.channel[2][1]
    (key,) = channel_keys(fed.channel[3][0], [c_pk], server.session)

    def ok(**kw) -> bool:
        a = dict(session=server.session, server_round=7, index=2, fingerprint=me.fingerprint, c_pk=c_pk)
        a |= dict(s_pk=r.s_pk, commitment=r.commitment, nonce=r.nonce) | kw
        statement = keys_statement(
            a["session"], a["server_round"], a["index"], a["fingerprint"], a["c_pk"], a["s_pk"], a["commitment"],
            a["nonce"],
        )  # fmt: skip
        try:
            aead_decrypt(key, r.ciphertexts[3], keys_aad(server.session, 7, 2, 3, statement))
        except ValueError:
            return False
        return True

    assert ok()
    assert not ok(server_round=8) and not ok(index=3) and not ok(session=b"x" * 16)
    assert not ok(fingerprint=fed.ids[3].fingerprint) and not ok(c_pk=fed.channel[3][1])
    assert not ok(s_pk=replies[3].s_pk) and not ok(commitment=replies[3].commitment) and not ok(nonce=replies[3].nonce)
    assert all(len(r.nonce) == 16 for r in replies.values())
