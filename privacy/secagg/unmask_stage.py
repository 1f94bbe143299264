"""The coordinator's unmask stage: collect the masked inputs, ask a cover of survivors, rebuild the sum.

The coordinator asks first only as many survivors as hold ``t + unmask_spare`` shares of
every secret (:func:`privacy.secagg.unmask_cover.unmask_cover`, in a random order that
spreads the work) and stops as soon as ``t`` shares of each are in; the other survivors are
asked only if that falls short. It learns the sum of the masked inputs and nothing else
about any single one (see :mod:`privacy.secagg.server_session` for the assumptions).

In the active mode each masked input comes with its node's signature on U2; while nobody
dropped between the share-keys stage and the masked input, those signatures are the
consistency check and the unmask stage carries them (no extra exchange). After such a dropout
the survivors are first asked to sign U3 (the ``consistency`` stage, one exchange more).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord

from privacy.secagg import wire
from privacy.secagg.encoding import EncodingParams, decode
from privacy.secagg.graph import SecAggAbort
from privacy.secagg.round_state import KeySession, PendingRound
from privacy.secagg.stage_exchange import exchange_stage
from privacy.secagg.stage_messages import UnmaskReply
from privacy.secagg.stage_records import consistency_record, parse_signature, parse_unmask_reply, unmask_record
from privacy.secagg.synthetic_reply import synthetic_reply

__all__ = ["unmask_round"]

log = logging.getLogger(__name__)


def unmask_round(
    rnd: PendingRound,
    replies: list[Message],
    *,
    params: EncodingParams,
    unmask_spare: int,
    timeout: float,
    weighted_by_key: str,
) -> Message:
    """The synthetic reply carrying the weighted mean of the round's masked inputs.

    ``params`` decode the sum; ``unmask_spare`` holders of each secret are asked beyond the
    threshold in the first wave; each wave waits at most ``timeout`` seconds.

    Raises
    ------
    SecAggAbort
        Fewer than ``t`` masked inputs or unmask answers, a secret that cannot be rebuilt,
        or a sum that does not decode.
    """
    keys, report = rnd.keys, rnd.report
    session = keys.session
    d = sum(int(np.prod(a.shape)) for a in rnd.arrays.values())
    vectors: dict[int, np.ndarray] = {}
    signatures: dict[int, bytes] = {}
    metrics: dict[int, dict[str, MetricRecord]] = {}
    for r in replies:
        n = r.metadata.src_node_id
        if r.has_error() or n not in rnd.instructions:
            continue
        rec = r.content.config_records.get(wire.RECORD)
        masked = r.content.array_records.get(wire.MASKED_RECORD)
        if rec is None or rec.get(wire.SESSION) != session.session or masked is None:
            log.warning("secagg round %d: node %d replied without a masked input", rnd.server_round, n)
            continue
        vectors[keys.index_of[n]] = masked[wire.MASKED_ARRAY].numpy()
        metrics[keys.index_of[n]] = dict(r.content.metric_records.items())
        try:
            signatures[keys.index_of[n]] = parse_signature(rec)
        except TypeError:
            log.warning("secagg round %d: node %d sent a malformed signature", rnd.server_round, n)
    u3 = session.receive_masked(vectors, d + 1, params.dtype, signatures)
    report.masked = len(u3)

    if session.needs_consistency:
        t0 = time.perf_counter()
        asked = {
            keys.node_of[i]: {wire.RECORD: consistency_record(q)} for i, q in session.consistency_requests().items()
        }
        answers = exchange_stage(rnd.grid, asked, rnd.server_round, timeout=timeout)
        signed = {}
        for n, recs in answers.items():
            try:
                signed[keys.index_of[n]] = parse_signature(recs[wire.RECORD])
            except TypeError:
                log.warning("secagg round %d: node %d sent a malformed signature", rnd.server_round, n)
        session.receive_consistency(signed)
        report.seconds[wire.CONSISTENCY] = time.perf_counter() - t0

    t0 = time.perf_counter()
    requests = session.unmask_requests()
    order = list(requests)
    secrets.SystemRandom().shuffle(order)  # spread the unmask work over the survivors
    first = session.unmask_cover(unmask_spare, order)
    parsed: dict[int, UnmaskReply] = {}
    seen: set[int] = set()

    def enough(answers: Mapping[int, dict[str, ConfigRecord]]) -> bool:
        for n in answers.keys() - seen:
            seen.add(n)
            _parse_unmask(rnd, keys, n, answers[n][wire.RECORD], parsed)
        return session.can_rebuild(parsed)

    for wave in (first, [i for i in order if i not in first]):
        if not wave:
            continue
        report.asked += len(wave)
        payloads = {keys.node_of[i]: {wire.RECORD: unmask_record(requests[i])} for i in wave}
        if enough(exchange_stage(rnd.grid, payloads, rnd.server_round, timeout=timeout, done=enough)):
            break
    report.seconds[wire.UNMASK] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report.unmasked = len(parsed)
    total = session.receive_unmask(parsed)
    try:
        mean, total_weight = decode(total, params)
    except ValueError as err:
        raise SecAggAbort(str(err)) from err
    message = synthetic_reply(
        rnd.arrays,
        rnd.arrays_key,
        mean,
        total_weight,
        {i: metrics[i] for i in u3},
        weighted_by_key=weighted_by_key,
        params=params,
        reply_to=next(iter(rnd.instructions.values())),
    )
    report.seconds["reconstruct"] = time.perf_counter() - t0
    return message


def _parse_unmask(rnd: PendingRound, keys: KeySession, n: int, r: ConfigRecord, into: dict[int, UnmaskReply]) -> None:
    try:
        into[keys.index_of[n]] = parse_unmask_reply(r)
    except (KeyError, ValueError, TypeError):
        log.warning("secagg round %d: malformed unmask reply from node %d", rnd.server_round, n)
