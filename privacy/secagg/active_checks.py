"""The node's checks in the active-adversary mode: what it verifies before it shares, masks or reveals.

Each function raises ``ValueError`` with the node's reason; the caller refuses the stage. They
rest on the roster (:mod:`privacy.secagg.roster`) and on the assumption that fewer than a third
of its members collude with the coordinator (docs/secagg.md states the argument):

* before sharing: the coordinator runs the mode the node's policy demands; the session is new to
  this node; its neighbourhood and the threshold reach ``floor(2n/3) + 1`` of the roster's
  ``n`` members whatever the coordinator asked; every neighbour's channel key is signed by a
  distinct roster member;
* before masking: every neighbour's session keys (mask key, commitment, nonce) are the ones that
  member sent this node for this session, round and index (its shares authenticate them:
  :func:`~privacy.secagg.key_agreement.keys_aad`), and the U2 the node is shown lists its own
  nonce and its neighbours' as authenticated;
* before revealing: at least ``t`` members signed the survivor set it is shown (members of that
  set, bound to their indices by the session id), and the node itself signed that set (it signs
  at most one set besides U2).
"""

from __future__ import annotations

from collections.abc import Mapping

from privacy.secagg.graph import active_threshold, minimum_degree
from privacy.secagg.identity import NodeIdentity
from privacy.secagg.stage_messages import ShareKeysRequest
from privacy.secagg.statements import NONCE_BYTES, keys_statement, session_id, survivors_statement
from privacy.secagg.wire import ACTIVE

__all__ = ["check_session_keys", "check_session_start", "count_signatures"]


def check_session_start(request: ShareKeysRequest, identity: NodeIdentity | None) -> dict[int, str]:
    """Before a node shares its secrets: the mode, freshness, degree, threshold and channel keys.

    Returns each neighbour's roster fingerprint (empty in the semi-honest mode).
    """
    if identity is not None and identity.threat_model == ACTIVE and request.adversary != ACTIVE:
        raise ValueError(
            f"policy.secagg_threat_model: the coordinator runs a {request.adversary} session; this node's policy "
            "takes part in secure aggregation only in the active-adversary mode (secagg.adversary: active)"
        )
    if request.adversary != ACTIVE:
        return {}
    if identity is None:
        raise ValueError("the active-adversary mode needs this node's roster and roster key (fedmart node --roster)")
    n = len(identity.roster)
    holders, t_min = len(request.neighbours) + 1, active_threshold(n)
    if holders < t_min:
        raise ValueError(
            f"degree {holders - 1} is below the minimum {minimum_degree(n)} for a roster of {n} members: a "
            f"neighbourhood must hold floor(2n/3) + 1 = {t_min} shares (docs/secagg.md)"
        )
    if request.threshold < t_min:
        raise ValueError(
            f"threshold {request.threshold} is below floor(2n/3) + 1 = {t_min} for a roster of {n} members: two "
            "survivor sets could each gather t signatures (the partition attack; docs/secagg.md)"
        )
    if request.session in identity.seen:
        raise ValueError(f"session {request.session.hex()} was seen before by this node: a replayed session")
    fps = {}
    for v, c_pk in request.neighbours.items():
        cert = request.certs.get(v)
        if cert is None or cert.fingerprint not in identity.roster:
            raise ValueError(f"neighbour {v} is not a roster member (its channel key is not signed by a known key)")
        if not identity.verify_channel(cert, c_pk):
            raise ValueError(f"neighbour {v}'s channel key is not signed by roster member {cert.fingerprint}")
        fps[v] = cert.fingerprint
    if len(set(fps.values())) != len(fps) or identity.fingerprint in fps.values():
        raise ValueError("a roster member appears twice in this neighbourhood")
    return fps


def check_session_keys(
    *,
    identity: NodeIdentity,
    session: bytes,
    server_round: int,
    index: int,
    nonce: bytes,
    peers: Mapping[int, tuple[str, bytes]],
    neighbours: tuple[int, ...],
    s_pks: Mapping[int, bytes],
    commitments: Mapping[int, bytes],
    nonces: Mapping[int, bytes],
    members: Mapping[int, tuple[str, bytes]],
) -> tuple[bytes, dict[int, bytes]]:
    """Before a node masks: the U2 it is shown; returns the session id and each neighbour's keys statement.

    ``peers`` maps a neighbour to (roster fingerprint, channel key) as checked at share-keys;
    ``members`` is U2 as index -> (fingerprint, nonce). The statements are what each neighbour's
    shares must authenticate (:func:`privacy.secagg.key_agreement.keys_aad`): the caller refuses
    the stage if a neighbour's shares do not decrypt under them, so a substituted mask key,
    commitment or nonce is refused before the node trains.
    """
    statements = {}
    for v, s_pk in s_pks.items():
        fp, c_pk = peers[v]
        nonce_v, commit_v = nonces.get(v, b""), commitments.get(v, b"")
        if len(nonce_v) != NONCE_BYTES or len(commit_v) != 32:
            raise ValueError(f"neighbour {v}'s session keys come without their nonce or commitment")
        statements[v] = keys_statement(session, server_round, v, fp, c_pk, s_pk, commit_v, nonce_v)
    if members.get(index) != (identity.fingerprint, nonce):
        raise ValueError("the U2 this node is shown does not hold its own nonce: not this session")
    if {v for v in members if v in neighbours} != set(s_pks):
        raise ValueError("the U2 this node is shown disagrees with the neighbours whose keys it was sent")
    for v in s_pks:
        if members[v] != (peers[v][0], nonces[v]):
            raise ValueError(f"the U2 this node is shown lists neighbour {v} with another key or nonce")
    fps = [fp for fp, _ in members.values()]
    if len(set(fps)) != len(fps) or not all(fp in identity.roster for fp in fps):
        raise ValueError("the U2 this node is shown lists a non-member, or a member twice")
    return session_id(session, server_round, members), statements


def count_signatures(
    *,
    identity: NodeIdentity,
    sid: bytes,
    survivors: frozenset[int],
    signatures: Mapping[int, bytes],
    fingerprints: Mapping[int, str],
    enough: int | None = None,
) -> int:
    """How many distinct members signed ``survivors``; ``fingerprints`` is U2 as index -> member.

    Only signers in ``survivors`` count: a node whose masked input is not in the sum has no say.
    U2's fingerprints are distinct (checked before masking), so each member counts once. Counting
    stops at ``enough`` (each check is an Ed25519 verification).
    """
    statement = survivors_statement(sid, survivors)
    valid = 0
    for v, sig in signatures.items():
        if enough is not None and valid >= enough:
            break
        if v in survivors and v in fingerprints and identity.roster.verify(fingerprints[v], statement, sig):
            valid += 1
    return valid
