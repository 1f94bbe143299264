"""The node's side of secure aggregation as a Flower client mod.

Wire it as the *outermost* mod, so that it sees the final reply of the train handler (after
e.g. Flower's ``fixedclipping_mod``)::

    app = ClientApp(mods=[secagg_mod, fixedclipping_mod])

Stage messages (``advertise``, ``share-keys``, ``unmask``) are answered by the mod itself; the
``masked-input`` stage is the round's TRAIN message: the mod lets it through to the handler
(``call_next``), then replaces the reply's ArrayRecord (the full new weights) by the masked
encoding of ``w * (new - global)`` and ``w``, where ``w`` is the reply's ``num-examples``. A
TRAIN message may also carry the next round's share-keys stage under ``secagg.next``
(pipelining, see :class:`~privacy.secagg.SecAggStrategy`), answered in the same reply.
The reply's MetricRecords and ConfigRecords travel **in plaintext** (the coordinator needs
the metrics for its round summary); nothing else leaves the node.

State between stages lives in ``ctxt.state``: :data:`~privacy.secagg.wire.STATE_CHANNEL`
holds the node's long-lived channel key pair; :data:`~privacy.secagg.wire.STATE_SESSION_NEXT`
a session whose keys are shared (waiting for its TRAIN message) and
:data:`~privacy.secagg.wire.STATE_SESSION` the session that masked this node's input (waiting
for the unmask stage). The latter is wiped after the unmask stage, or at the next masked input
if the coordinator did not need this node's shares.

A node that restarted has lost ``ctxt.state``: asked to share keys under its old channel key,
or to mask for a session it shared keys for before the restart, it answers with its new channel
key instead (the advertise reply marked :data:`~privacy.secagg.wire.REJOIN`), neither training
nor revealing anything; the coordinator brings it into its next session (docs/secagg.md).

A TRAIN message without a secagg record passes through untouched with :func:`secagg_mod`
(so the same app runs with ``secagg=off``) and is refused by :func:`strict_secagg_mod`.

The **active-adversary mode** needs the node's own :class:`~privacy.secagg.identity.NodeIdentity`
(its roster, roster key, seen sessions and policy): build the mod with
:func:`make_secagg_mod` and a function that returns it from the node's context (never from a
message). :func:`secagg_mod` has no identity: it takes part in semi-honest sessions only.
Refusals (:mod:`privacy.secagg.active_checks`) are raised before the node trains, so a
coordinator that cheats costs the node no privacy budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from privacy.secagg import wire
from privacy.secagg.encoding import EncodingParams, WeightCapNotice, encode
from privacy.secagg.identity import NodeIdentity
from privacy.secagg.key_agreement import new_channel_keypair
from privacy.secagg.node_session import NodeSession
from privacy.secagg.stage_messages import ChannelCert, ConsistencyRequest, MaskRequest, ShareKeysRequest, UnmaskRequest

__all__ = ["secagg_mod", "strict_secagg_mod", "make_secagg_mod", "flatten_update"]

IdentityOf = Callable[[Context], NodeIdentity | None]

log = logging.getLogger(__name__)

_WEIGHT_CAP = WeightCapNotice()  # the cap is explained once per run in this node's log


def _is_secagg(msg: Message) -> bool:
    return (
        msg.metadata.message_type.split(".")[0] == "train"
        and msg.has_content()
        and wire.RECORD in msg.content.config_records
    )


def make_secagg_mod(identity_of: IdentityOf) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A secure-aggregation mod whose node brings ``identity_of(ctxt)`` (None: semi-honest sessions only)."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if not _is_secagg(msg):
            return call_next(msg, ctxt)
        record = msg.content.config_records[wire.RECORD]
        stage = record.get(wire.STAGE)
        identity = identity_of(ctxt)
        if stage == wire.MASKED_INPUT:
            return _masked_input(msg, ctxt, record, call_next, identity)
        handlers = {
            wire.ADVERTISE: _advertise,
            wire.SHARE_KEYS: _share_keys,
            wire.CONSISTENCY: _consistency,
            wire.UNMASK: _unmask,
        }
        handler = handlers.get(str(stage))
        if handler is None:
            raise ValueError(f"unknown secure-aggregation stage {stage!r}")
        return Message(RecordDict({wire.RECORD: ConfigRecord(handler(ctxt, record, identity))}), reply_to=msg)

    return mod


secagg_mod = make_secagg_mod(lambda ctxt: None)
secagg_mod.__doc__ = "Flower mod: this node's side of secure aggregation (semi-honest sessions); others pass through."


def strict_secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Like :func:`secagg_mod`, but refuses a TRAIN message that is not securely aggregated."""
    if msg.metadata.message_type.split(".")[0] == "train" and not _is_secagg(msg):
        raise ValueError("this node only trains under secure aggregation (secagg.enabled=true on the coordinator)")
    return secagg_mod(msg, ctxt, call_next)


def flatten_update(new: ArrayRecord, old: ArrayRecord) -> np.ndarray:
    """``new - old`` over all arrays in ``old``'s key order, flattened to one float64 vector."""
    if set(new.keys()) != set(old.keys()):
        raise ValueError(f"the reply's arrays {sorted(new.keys())} differ from the global ones {sorted(old.keys())}")
    olds = {key: arr.numpy() for key, arr in old.items()}
    out = np.empty(sum(g.size for g in olds.values()), dtype=np.float64)
    offset = 0
    for key, g in olds.items():
        n = new[key].numpy()
        if g.shape != n.shape:
            raise ValueError(f"array {key!r}: reply shape {n.shape} differs from the global {g.shape}")
        np.subtract(n.ravel(), g.ravel(), out=out[offset : offset + g.size], dtype=np.float64)
        offset += g.size
    return out


def _channel_keys(ctxt: Context) -> tuple[bytes, bytes]:
    """The node's long-lived channel key pair, created on first use."""
    rec = ctxt.state.config_records.get(wire.STATE_CHANNEL)
    if rec is None:
        c_sk, c_pk = new_channel_keypair()
        ctxt.state.config_records[wire.STATE_CHANNEL] = ConfigRecord({"sk": c_sk, "pk": c_pk})
        return c_sk, c_pk
    return cast(bytes, rec["sk"]), cast(bytes, rec["pk"])


def _load_session(ctxt: Context, slot: str, session: bytes) -> tuple[NodeSession, int]:
    rec = ctxt.state.config_records.get(slot)
    if rec is None or rec.get("session") != session:
        what = "with shared keys" if slot == wire.STATE_SESSION_NEXT else "that masked an input"
        raise ValueError(f"this node holds no secure-aggregation session {what} for this message")
    return NodeSession.from_dict(rec), cast(int, rec[wire.ROUND])


def _save_session(ctxt: Context, slot: str, node: NodeSession, server_round: int) -> None:
    ctxt.state.config_records[slot] = ConfigRecord({**node.to_dict(), wire.ROUND: server_round})


def _wipe(ctxt: Context, *slots: str) -> None:
    for slot in slots:
        if slot in ctxt.state.config_records:
            del ctxt.state[slot]


def _advertise(ctxt: Context, record: ConfigRecord, identity: NodeIdentity | None) -> dict:
    # The coordinator asks only when it holds no channel key for this node: first contact,
    # after it restarted (resume) or after this node failed a stage. Any session in progress is
    # void then, and would make the node refuse the resumed round's keys as "stale".
    if record.get(wire.ADVERSARY) == wire.ACTIVE and identity is None:
        raise ValueError("the active-adversary mode needs this node's roster and roster key (fedmart node --roster)")
    _wipe(ctxt, wire.STATE_SESSION, wire.STATE_SESSION_NEXT)
    return _advertisement(ctxt, identity)


def _advertisement(ctxt: Context, identity: NodeIdentity | None) -> dict:
    """This node's channel key, with (active mode) its roster signature on it and its roster's size."""
    _, c_pk = _channel_keys(ctxt)
    out = {wire.STAGE: wire.ADVERTISE, wire.CHANNEL_PK: c_pk}
    if identity is not None:  # its roster signature on the channel key, and its roster's size
        cert = identity.channel_cert(c_pk)
        out |= {
            wire.MEMBER: cert.fingerprint,
            wire.SIGNATURE: cert.signature,
            wire.ROSTER_SIZE: len(identity.roster),
            wire.ROSTER_DIGEST: identity.roster.digest,
        }
    return out


def _rejoin(ctxt: Context, identity: NodeIdentity | None, server_round: object, why: str) -> dict:
    """Instead of a stage this node cannot take part in since it restarted: its new channel key.

    The advertise stage's answer (public material only), marked :data:`~privacy.secagg.wire.REJOIN`;
    the coordinator takes the key and brings the node into its next session. No error: a restart
    is not a fault of the protocol, and the node neither trained nor revealed anything for it.
    """
    log.info("secure aggregation round %s: %s; sending this node's channel key, it joins from its next session",
             server_round, why)  # fmt: skip
    return {**_advertisement(ctxt, identity), wire.REJOIN: True}


def _share_keys(ctxt: Context, record: ConfigRecord, identity: NodeIdentity | None) -> dict:
    server_round = cast(int, record[wire.ROUND])
    c_sk, c_pk = _channel_keys(ctxt)
    if record[wire.CHANNEL_PK] != c_pk:
        # The coordinator holds the key this node had before it restarted: sharing keys under it
        # would make shares nobody can decrypt. Send the new key instead (the coordinator shares
        # keys again for this round); a coordinator that substitutes a key learns only a public key.
        return _rejoin(ctxt, identity, server_round, "the coordinator holds an earlier channel key of this node")
    for slot in (wire.STATE_SESSION, wire.STATE_SESSION_NEXT):
        previous = ctxt.state.config_records.get(slot)
        if previous is not None and cast(int, previous.get(wire.ROUND, 0)) > server_round:
            raise ValueError(f"stale share-keys message of round {server_round}: a later round has begun")
    neighbours = cast(list[int], record[wire.NEIGHBOURS])
    pks = cast(list[bytes], record[wire.CHANNEL_PKS])
    fps = cast(list[str], record.get(wire.MEMBERS, []))
    sigs = cast(list[bytes], record.get(wire.CHANNEL_SIGS, []))
    request = ShareKeysRequest(
        session=cast(bytes, record[wire.SESSION]),
        index=cast(int, record[wire.INDEX]),
        threshold=cast(int, record[wire.THRESHOLD]),
        neighbours=dict(zip(neighbours, pks, strict=True)),
        server_round=server_round,
        adversary=str(record.get(wire.ADVERSARY, wire.SEMI_HONEST)),
        certs={v: ChannelCert(fp, sig) for v, fp, sig in zip(neighbours, fps, sigs, strict=True)} if fps else {},
    )
    node, reply = NodeSession.share_keys(request, c_sk, identity)
    _save_session(ctxt, wire.STATE_SESSION_NEXT, node, server_round)
    dsts = sorted(reply.ciphertexts)
    out = {
        wire.STAGE: wire.SHARE_KEYS,
        wire.SESSION: request.session,
        wire.MASK_PK: reply.s_pk,
        wire.COMMITMENT: reply.commitment,
        wire.DESTINATIONS: dsts,
        wire.CIPHERTEXTS: [reply.ciphertexts[v] for v in dsts],
    }
    if reply.nonce:  # active mode
        out[wire.NONCE] = reply.nonce
    return out


def _mask_request(record: ConfigRecord, session: bytes) -> MaskRequest:
    sources = cast(list[int], record[wire.SOURCES])

    def per_source(key: str) -> dict[int, bytes]:
        return dict(zip(sources, cast(list[bytes], record.get(key, [])), strict=True)) if key in record else {}

    u2 = cast(list[int], record.get(wire.U2_INDICES, []))
    members = zip(
        u2,
        cast(list[str], record.get(wire.U2_MEMBERS, [])),
        cast(list[bytes], record.get(wire.U2_NONCES, [])),
        strict=True,
    )
    return MaskRequest(
        session=session,
        neighbour_s_pks=per_source(wire.MASK_PKS),
        ciphertexts=per_source(wire.CIPHERTEXTS),
        commitments=per_source(wire.COMMITMENTS),
        nonces=per_source(wire.NONCES),
        members={v: (fp, nonce) for v, fp, nonce in members},
    )


def _masked_input(
    msg: Message, ctxt: Context, record: ConfigRecord, call_next: ClientAppCallable, identity: NodeIdentity | None
) -> Message:
    session = cast(bytes, record[wire.SESSION])
    if wire.STATE_SESSION_NEXT not in ctxt.state.config_records and wire.STATE_CHANNEL not in ctxt.state.config_records:
        # This node shared keys for this round, then restarted (crash, reboot) and lost them with its
        # memory: it cannot mask, so it sits the round out (the others' masks with it are rebuilt from
        # shares, as for a dropout) without training, and hands over its new channel key.
        why = "this node restarted after sharing keys for this round and lost its session; it does not train now"
        rejoin = _rejoin(ctxt, identity, msg.metadata.group_id or "?", why)
        return Message(RecordDict({wire.RECORD: ConfigRecord(rejoin)}), reply_to=msg)
    node, server_round = _load_session(ctxt, wire.STATE_SESSION_NEXT, session)
    params = EncodingParams(
        clip_range=cast(float, record[wire.CLIP_RANGE]),
        bits=cast(int, record[wire.BITS]),
        max_weight=cast(int, record[wire.MAX_WEIGHT]),
        max_nodes=cast(int, record[wire.MAX_NODES]),
    )
    weight_key = cast(str, record[wire.WEIGHT_KEY])
    global_arrays = msg.content.array_records[cast(str, record[wire.ARRAYS_KEY])]
    request = _mask_request(record, session)
    node.prepare_mask(request, identity)  # fail before training (signatures, shares), not after
    pipelined = msg.content.config_records.get(wire.RECORD_NEXT)
    del msg.content[wire.RECORD]  # the handler sees the plain train message
    if pipelined is not None:
        del msg.content[wire.RECORD_NEXT]
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    if len(out.content.array_records) != 1:
        raise ValueError(f"the train reply must carry exactly one ArrayRecord, got {len(out.content.array_records)}")
    new_arrays = next(iter(out.content.array_records.values()))
    metrics = [m for m in out.content.metric_records.values() if weight_key in m]
    if len(metrics) != 1:
        raise ValueError(f"the train reply must carry one MetricRecord with {weight_key!r}")
    raw_weight = float(cast(float, metrics[0][weight_key]))
    _WEIGHT_CAP.note(msg.metadata.run_id, raw_weight, params, who="this node")
    weight = params.cap_weight(raw_weight)
    x = encode(flatten_update(new_arrays, global_arrays), weight, params, overwrite=True)
    y = node.mask(request, x, in_place=True, identity=identity)
    # this session now waits for its unmask stage; it replaces any older one (whose unmask
    # stage, if any, did not need this node)
    _save_session(ctxt, wire.STATE_SESSION, node, server_round)
    _wipe(ctxt, wire.STATE_SESSION_NEXT)
    content = RecordDict()
    for key, rec in out.content.metric_records.items():
        content[key] = MetricRecord(dict(rec))
    for key, rec in out.content.config_records.items():
        content[key] = ConfigRecord(dict(rec))
    content[wire.MASKED_RECORD] = ArrayRecord({wire.MASKED_ARRAY: Array(y)})
    reply = {wire.STAGE: wire.MASKED_INPUT, wire.SESSION: session}
    if node.u2_signature:  # active: the consistency check's signature rides on the masked input
        reply[wire.SIGNATURE] = node.u2_signature
    content[wire.RECORD] = ConfigRecord(reply)
    if pipelined is not None:  # the next round's share-keys stage, riding on this message
        try:
            content[wire.RECORD_NEXT] = ConfigRecord(_share_keys(ctxt, pipelined, identity))
        except ValueError as err:  # must not cost this round's masked input
            log.warning("secagg: cannot start the next round's session: %s", err)
            content[wire.RECORD_NEXT] = ConfigRecord({wire.STAGE: wire.SHARE_KEYS, wire.ERROR: str(err)})
    return Message(content, reply_to=msg)


def _consistency(ctxt: Context, record: ConfigRecord, identity: NodeIdentity | None) -> dict:
    session = cast(bytes, record[wire.SESSION])
    node, server_round = _load_session(ctxt, wire.STATE_SESSION, session)
    signature = node.consistency(ConsistencyRequest(session, cast(list[int], record[wire.U3_INDICES])), identity)
    _save_session(ctxt, wire.STATE_SESSION, node, server_round)  # the set it signed: it signs no other
    return {wire.STAGE: wire.CONSISTENCY, wire.SESSION: session, wire.SIGNATURE: signature}


def _unmask(ctxt: Context, record: ConfigRecord, identity: NodeIdentity | None) -> dict:
    node, _ = _load_session(ctxt, wire.STATE_SESSION, cast(bytes, record[wire.SESSION]))
    signers = cast(list[int], record.get(wire.SIGNERS, []))
    request = UnmaskRequest(
        session=cast(bytes, record[wire.SESSION]),
        survivors=cast(list[int], record[wire.SURVIVORS]),
        dropped=cast(list[int], record[wire.DROPPED]),
        u3=cast(list[int], record.get(wire.U3_INDICES, [])),
        signatures=dict(zip(signers, cast(list[bytes], record.get(wire.SIGNATURES, [])), strict=True)),
    )
    reply = node.unmask(request, identity)
    _wipe(ctxt, wire.STATE_SESSION)  # the session's secrets are no longer needed
    b_src, sk_src = sorted(reply.b_shares), sorted(reply.sk_shares)
    return {
        wire.STAGE: wire.UNMASK,
        wire.SESSION: request.session,
        wire.B_SOURCES: b_src,
        wire.B_SHARES: [reply.b_shares[v] for v in b_src],
        wire.SK_SOURCES: sk_src,
        wire.SK_SHARES: [reply.sk_shares[v] for v in sk_src],
    }
