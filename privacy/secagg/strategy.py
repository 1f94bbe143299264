"""The coordinator's side of secure aggregation: a wrapper around any Message-API strategy.

``SecAggStrategy(inner, config=...)`` behaves like ``inner`` except that the inner strategy
never sees a node's update. Per round (``Strategy.start`` calls these in this order):

* ``configure_train`` asks ``inner.configure_train`` which nodes to train, then runs the key
  stages with them (``advertise`` only for nodes whose channel key it does not hold yet, then
  ``share-keys``) and returns the TRAIN messages, each carrying the secagg record of the
  ``masked-input`` stage. Nodes that fail a key stage are simply not asked to train.
* ``aggregate_train`` takes the masked replies, runs the ``unmask`` stage (with only as many
  survivors as hold ``t + unmask_spare`` shares of every secret, ending once ``t`` of each
  are in; the other survivors are asked only if that falls short), rebuilds
  ``sum w_u q_u`` and ``W = sum w_u``, decodes ``global + sum w_u delta_u / W`` and hands the
  inner strategy **one** synthetic reply: ``{arrays: ArrayRecord(averaged weights),
  metrics: MetricRecord(num-examples = W, weighted mean of the nodes' plaintext metrics)}``.
  FedAvg returns it unchanged, FedAdam/FedYogi apply their server optimiser to it, and
  ``DifferentialPrivacyClientSideFixedClipping(SecAggStrategy(FedAvg(...)))`` adds its noise
  to the unmasked mean (nodes clip with ``fixedclipping_mod`` inside ``secagg_mod``).

**Pipelining.** By default the TRAIN message of round ``r`` also carries the share-keys stage
of round ``r + 1`` for the same nodes (record ``secagg.next``), answered in the same reply as
the masked input; if ``inner`` then samples exactly those nodes for round ``r + 1`` (the usual
case with ``fraction_train=1``), round ``r + 1`` skips its share-keys exchange. Otherwise the
speculation is dropped and the stage runs as usual. In steady state a secure round thus costs
one message exchange more than a plain one (the unmask stage, which then carries nothing but
the unmasking and so need not reach every node); ``pipeline=False`` turns this off.

A round that cannot complete (fewer survivors than the threshold at some stage, a secret
without enough shares, too many nodes for the modulus) aborts: ``aggregate_train`` returns
``(None, None)``, the global model stays as it was, and the reason is logged and kept in
:attr:`SecAggStrategy.last_abort_reason` (and in :attr:`SecAggStrategy.last_report`).

Server-side clipping wrappers (``DifferentialPrivacyServerSideFixedClipping``) and robust
aggregators (Krum, median, trimmed mean) need individual updates and cannot work on a sum.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy.secagg import wire
from privacy.secagg.config import SecAggConfig
from privacy.secagg.encoding import decode
from privacy.secagg.graph import SecAggAbort
from privacy.secagg.server_session import ServerSession
from privacy.secagg.stage_messages import ShareKeysReply, UnmaskReply

__all__ = ["SecAggStrategy", "RoundReport", "wrap_strategy"]

log = logging.getLogger(__name__)

_POLL_FIRST = 0.005  # seconds; polling backs off to _POLL_MAX
# A stage's replies are small and come back within tens of ms in simulation; with a 0.1 s
# cap the doubling backoff checked at 5, 15, 35, 75, 155 ms and a stage that finished at
# 80 ms was seen at 155 (BENCHMARKS.md, "Secure aggregation cost"). A pull is cheap: an
# in-memory lookup in simulation, one request to the SuperLink in a deployment.
_POLL_MAX = 0.02


@dataclass
class RoundReport:
    """What happened in one secure round (for logs, tests and the benchmark)."""

    server_round: int
    sampled: int = 0
    advertised: int = 0  # nodes asked to advertise a channel key this round
    shared: int = 0  # |U2|: nodes that shared keys
    masked: int = 0  # |U3|: nodes whose masked input is in the sum
    asked: int = 0  # nodes asked to unmask (a covering subset of U3, more if some were silent)
    unmasked: int = 0  # |U4|: nodes whose unmask answers were used
    threshold: int = 0
    pipelined: bool = False  # the share-keys stage rode on the previous round's unmask messages
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, as the coordinator sees it
    abort_reason: str | None = None


@dataclass
class _Round:
    server_round: int
    grid: Grid
    arrays: ArrayRecord
    arrays_key: str
    keys: _Session
    instructions: dict[int, Message]  # node id -> TRAIN message sent
    report: RoundReport
    sent_at: float = 0.0
    upcoming: _Session | None = None  # next round's session, its share-keys stage riding on these TRAIN messages


@dataclass
class _Session:
    server_round: int
    session: ServerSession
    node_of: dict[int, int]  # protocol index -> node id
    index_of: dict[int, int]  # node id -> protocol index


def wrap_strategy(inner: Strategy, config: SecAggConfig) -> Strategy:
    """``SecAggStrategy(inner, config=config)`` if ``config.enabled``, else ``inner`` itself."""
    return SecAggStrategy(inner, config=config) if config.enabled else inner


class SecAggStrategy(Strategy):
    """Secure aggregation (SecAgg+) around any ``flwr.serverapp.strategy.Strategy``.

    Parameters
    ----------
    inner : Strategy
        The strategy that samples nodes and aggregates; it only ever sees the unmasked mean.
    config : SecAggConfig
        Threshold, graph degree, quantisation, modulus sizing and per-stage timeout
        (``config.enabled`` is not consulted here; see :func:`wrap_strategy`).
    weighted_by_key : str, optional
        MetricRecord key of a node's weight; defaults to ``inner.weighted_by_key`` when the
        inner strategy has one, else ``"num-examples"``.
    pipeline : bool
        Run the next round's share-keys stage together with this round's unmask stage.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        config: SecAggConfig,
        weighted_by_key: str | None = None,
        pipeline: bool = True,
    ) -> None:
        if not isinstance(inner, Strategy):
            raise ValueError(f"inner must be a flwr.serverapp.strategy.Strategy, got {type(inner).__name__}")
        if not isinstance(config, SecAggConfig):
            raise ValueError(f"config must be a SecAggConfig, got {type(config).__name__}")
        self.inner = inner
        self.config = config
        self.weighted_by_key = weighted_by_key or str(getattr(inner, "weighted_by_key", "num-examples"))
        self.last_abort_reason: str | None = None
        self.last_report: RoundReport | None = None
        self._params = config.encoding
        self._channel_pks: dict[int, bytes] = {}  # node id -> channel public key (long-lived)
        self.pipeline = bool(pipeline)
        self._round: _Round | None = None
        self._next: _Session | None = None  # share-keys already done for the next round (pipelining)

    def __repr__(self) -> str:
        return f"SecAggStrategy({self.inner!r})"

    def summary(self) -> None:
        """Log the secure-aggregation settings, then the inner strategy's summary."""
        c = self.config
        log.info(
            "secure aggregation: threshold=%s neighbours=%s clip_range=%g bits=%d (error <= %.3g) "
            "max_weight=%d max_nodes=%d modulus=2**%d timeout=%gs",
            c.threshold,
            c.neighbours or "all",
            c.clip_range,
            c.bits,
            self._params.error_bound,
            c.max_weight,
            c.max_nodes,
            self._params.modulus_bits,
            c.timeout,
        )
        self.inner.summary()

    # ------------------------------------------------------------------ train: key stages
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample with the inner strategy, run the key stages, return the TRAIN messages."""
        self._round = None
        self.last_abort_reason = None
        report = RoundReport(server_round)
        self.last_report = report
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not messages:
            return []
        try:
            return self._key_stages(server_round, arrays, messages, grid, report)
        except SecAggAbort as err:
            self._abort(report, err.reason)
            return []

    def _key_stages(
        self, server_round: int, arrays: ArrayRecord, messages: list[Message], grid: Grid, report: RoundReport
    ) -> list[Message]:
        node_ids = [m.metadata.dst_node_id for m in messages]
        report.sampled = len(node_ids)
        speculation, self._next = self._next, None
        if len(set(node_ids)) != len(node_ids):
            raise SecAggAbort("the inner strategy addressed a node twice in one round")
        if len(node_ids) > self.config.max_nodes:
            raise SecAggAbort(
                f"{len(node_ids)} nodes sampled but secagg.max_nodes={self.config.max_nodes} sized the modulus"
            )
        array_keys = list(messages[0].content.array_records)
        if len(array_keys) != 1:
            raise SecAggAbort(f"a TRAIN message must carry exactly one ArrayRecord, got {array_keys}")

        if (
            speculation is not None
            and speculation.server_round == server_round
            and {speculation.node_of[i] for i in speculation.session.u2} == set(node_ids)
        ):
            # share-keys already ran with the previous round's TRAIN messages, and every node
            # sampled now took part (one that failed last round's training did not: it gets
            # a fresh share-keys stage instead of sitting this round out)
            keys = speculation
            report.pipelined = True
        else:
            keys = self._fresh_keys(server_round, node_ids, grid, report)
        session = keys.session
        report.threshold = session.threshold
        report.shared = len(session.u2)

        # masked input: the inner TRAIN messages, each with the secagg record added (and the
        # next round's share-keys stage, answered in the same reply)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        params = self._params
        upcoming = self._speculate(server_round + 1, [keys.node_of[i] for i in sorted(session.u2)])
        next_payloads = self._share_keys_payloads(upcoming) if upcoming is not None else {}
        out: dict[int, Message] = {}
        for i, req in session.mask_requests().items():
            n = keys.node_of[i]
            original = by_node[n]
            sources = sorted(req.neighbour_s_pks)
            content = RecordDict(dict(original.content.items()))
            content[wire.RECORD] = ConfigRecord(
                {
                    wire.STAGE: wire.MASKED_INPUT,
                    wire.SESSION: session.session,
                    wire.SOURCES: sources,
                    wire.MASK_PKS: [req.neighbour_s_pks[v] for v in sources],
                    wire.CIPHERTEXTS: [req.ciphertexts[v] for v in sources],
                    wire.CLIP_RANGE: params.clip_range,
                    wire.BITS: params.bits,
                    wire.MAX_WEIGHT: params.max_weight,
                    wire.MAX_NODES: params.max_nodes,
                    wire.WEIGHT_KEY: self.weighted_by_key,
                    wire.ARRAYS_KEY: array_keys[0],
                }
            )
            if n in next_payloads:
                content[wire.RECORD_NEXT] = ConfigRecord(next_payloads[n])
            out[n] = Message(
                content,
                dst_node_id=n,
                message_type=original.metadata.message_type,
                group_id=original.metadata.group_id,
                ttl=original.metadata.ttl,
            )
        self._round = _Round(
            server_round=server_round,
            grid=grid,
            arrays=arrays,
            arrays_key=array_keys[0],
            keys=keys,
            instructions=out,
            report=report,
            sent_at=time.perf_counter(),
            upcoming=upcoming,
        )
        return list(out.values())

    def _fresh_keys(self, server_round: int, node_ids: list[int], grid: Grid, report: RoundReport) -> _Session:
        """Advertise (nodes without a known channel key) and share-keys stages; U2 is set on return."""
        unknown = [n for n in node_ids if n not in self._channel_pks]
        report.advertised = len(unknown)
        if unknown:
            t0 = time.perf_counter()
            replies = self._exchange(
                grid, {n: {wire.RECORD: {wire.STAGE: wire.ADVERTISE}} for n in unknown}, server_round
            )
            for n, recs in replies.items():
                pk = recs[wire.RECORD].get(wire.CHANNEL_PK)
                if isinstance(pk, bytes) and len(pk) == 32:
                    self._channel_pks[n] = pk
            report.seconds[wire.ADVERTISE] = time.perf_counter() - t0

        t0 = time.perf_counter()
        keys = self._new_session(server_round, [n for n in node_ids if n in self._channel_pks])
        payloads = {n: {wire.RECORD: p} for n, p in self._share_keys_payloads(keys).items()}
        failed: set[int] = set()
        replies = self._exchange(grid, payloads, server_round, errors_out=failed)
        for n in failed:  # the node may have restarted and lost its channel key: ask it again next time
            self._channel_pks.pop(n, None)
        self._receive_share_keys(keys, {n: recs[wire.RECORD] for n, recs in replies.items()})
        report.seconds[wire.SHARE_KEYS] = time.perf_counter() - t0
        return keys

    def _new_session(self, server_round: int, participants: list[int]) -> _Session:
        node_of = {i + 1: n for i, n in enumerate(participants)}
        session = ServerSession(list(node_of), threshold=self.config.threshold, neighbours=self.config.neighbours)
        return _Session(server_round, session, node_of, {n: i for i, n in node_of.items()})

    def _share_keys_payloads(self, keys: _Session) -> dict[int, dict]:
        """Share-keys stage record per node id."""
        requests = keys.session.share_keys_requests({i: self._channel_pks[n] for i, n in keys.node_of.items()})
        payloads = {}
        for i, req in requests.items():
            peers = sorted(req.neighbours)
            payloads[keys.node_of[i]] = {
                wire.STAGE: wire.SHARE_KEYS,
                wire.SESSION: keys.session.session,
                wire.ROUND: keys.server_round,
                wire.INDEX: i,
                wire.THRESHOLD: req.threshold,
                wire.CHANNEL_PK: self._channel_pks[keys.node_of[i]],
                wire.NEIGHBOURS: peers,
                wire.CHANNEL_PKS: [req.neighbours[v] for v in peers],
            }
        return payloads

    def _receive_share_keys(self, keys: _Session, records: Mapping[int, ConfigRecord]) -> None:
        """Parse share-keys replies (node id -> record) into the session; may abort."""
        parsed = {}
        for n, r in records.items():
            if n not in keys.index_of:
                continue
            if wire.ERROR in r:  # a pipelined share-keys stage failed on the node (e.g. a stale channel key)
                log.info("secagg round %d: node %d could not share keys: %s", keys.server_round, n, r[wire.ERROR])
                self._channel_pks.pop(n, None)
                continue
            try:
                parsed[keys.index_of[n]] = ShareKeysReply(
                    s_pk=cast(bytes, r[wire.MASK_PK]),
                    commitment=cast(bytes, r[wire.COMMITMENT]),
                    ciphertexts=dict(
                        zip(cast(list[int], r[wire.DESTINATIONS]), cast(list[bytes], r[wire.CIPHERTEXTS]), strict=True)
                    ),
                )
            except (KeyError, ValueError, TypeError):
                log.warning("secagg round %d: malformed share-keys reply from node %d", keys.server_round, n)
        keys.session.receive_share_keys(parsed)

    # ------------------------------------------------------------------ train: unmask
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked replies and let the inner strategy aggregate it."""
        rnd, self._round = self._round, None
        if rnd is None or rnd.server_round != server_round:
            self._next = None
            if self.last_abort_reason is None:
                self.last_abort_reason = f"round {server_round} was not configured by this SecAggStrategy"
                log.warning("secagg: %s", self.last_abort_reason)
            return None, None
        report = rnd.report
        report.seconds[wire.MASKED_INPUT] = time.perf_counter() - rnd.sent_at
        replies = list(replies)
        self._harvest_next_keys(rnd, replies)  # first: an aborted round still leaves keys for the next
        try:
            synthetic = self._unmask(rnd, replies)
        except SecAggAbort as err:
            self._abort(report, err.reason)
            return None, None
        log.info(
            "secagg round %d: %d sampled, %d shared keys, %d in the sum, %d of %d asked unmasked (threshold %d); %s",
            server_round,
            report.sampled,
            report.shared,
            report.masked,
            report.unmasked,
            report.asked,
            report.threshold,
            ", ".join(f"{k} {v:.3f}s" for k, v in report.seconds.items()),
        )
        return self.inner.aggregate_train(server_round, [synthetic])

    def validate_reply(self, reply: Message) -> str:
        """Why a TRAIN reply cannot enter this round's secure sum ("" if it can).

        For a coordinator that triages replies itself before ``aggregate_train``: a masked
        reply carries no weights to check, only a masked vector of a known shape.
        """
        rnd = self._round
        if rnd is None:
            return "no secure-aggregation round is in progress"
        if reply.has_error():
            return reply.error.reason or f"error code {reply.error.code}"
        if reply.metadata.src_node_id not in rnd.instructions:
            return f"node {reply.metadata.src_node_id} was not asked to train in this secure round"
        rec = reply.content.config_records.get(wire.RECORD)
        masked = reply.content.array_records.get(wire.MASKED_RECORD)
        if rec is None or masked is None or wire.MASKED_ARRAY not in masked:
            return "the reply carries no masked input (is secagg_mod the outermost mod on the node?)"
        if rec.get(wire.SESSION) != rnd.keys.session.session:
            return "the masked input belongs to another secure-aggregation session"
        y = masked[wire.MASKED_ARRAY]
        d = sum(int(np.prod(a.shape)) for a in rnd.arrays.values())
        if y.dtype != str(self._params.dtype) or tuple(y.shape) != (d + 1,):
            return (
                f"masked input of dtype {y.dtype} and shape {tuple(y.shape)}, expected {self._params.dtype} ({d + 1},)"
            )
        return ""

    def _unmask(self, rnd: _Round, replies: list[Message]) -> Message:
        keys, report = rnd.keys, rnd.report
        session = keys.session
        d = sum(int(np.prod(a.shape)) for a in rnd.arrays.values())
        vectors: dict[int, np.ndarray] = {}
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
        u3 = session.receive_masked(vectors, d + 1, self._params.dtype)
        report.masked = len(u3)

        t0 = time.perf_counter()
        requests = session.unmask_requests()
        order = list(requests)
        secrets.SystemRandom().shuffle(order)  # spread the unmask work over the survivors
        first = session.unmask_cover(self.config.unmask_spare, order)
        parsed: dict[int, UnmaskReply] = {}
        seen: set[int] = set()

        def enough(answers: Mapping[int, dict[str, ConfigRecord]]) -> bool:
            for n in answers.keys() - seen:
                seen.add(n)
                self._parse_unmask(rnd, keys, n, answers[n][wire.RECORD], parsed)
            return session.can_rebuild(parsed)

        for wave in (first, [i for i in order if i not in first]):
            if not wave:
                continue
            report.asked += len(wave)
            payloads = {
                keys.node_of[i]: {
                    wire.RECORD: {
                        wire.STAGE: wire.UNMASK,
                        wire.SESSION: session.session,
                        wire.SURVIVORS: list(requests[i].survivors),
                        wire.DROPPED: list(requests[i].dropped),
                    }
                }
                for i in wave
            }
            if enough(self._exchange(rnd.grid, payloads, rnd.server_round, done=enough)):
                break
        report.seconds[wire.UNMASK] = time.perf_counter() - t0

        t0 = time.perf_counter()
        report.unmasked = len(parsed)
        total = session.receive_unmask(parsed)
        try:
            mean, total_weight = decode(total, self._params)
        except ValueError as err:
            raise SecAggAbort(str(err)) from err
        message = self._synthetic_reply(rnd, mean, total_weight, {i: metrics[i] for i in u3})
        report.seconds["reconstruct"] = time.perf_counter() - t0
        return message

    def _harvest_next_keys(self, rnd: _Round, replies: list[Message]) -> None:
        """Take the next round's share-keys answers out of this round's TRAIN replies."""
        upcoming = rnd.upcoming
        if upcoming is None:
            return
        records = {
            r.metadata.src_node_id: r.content.config_records[wire.RECORD_NEXT]
            for r in replies
            if not r.has_error()
            and r.metadata.src_node_id in rnd.instructions
            and wire.RECORD_NEXT in r.content.config_records
        }
        try:
            self._receive_share_keys(upcoming, records)
            self._next = upcoming
        except SecAggAbort as err:
            log.info("secagg: no pipelined keys for round %d: %s", upcoming.server_round, err.reason)

    @staticmethod
    def _parse_unmask(rnd: _Round, keys: _Session, n: int, r: ConfigRecord, into: dict[int, UnmaskReply]) -> None:
        try:
            into[keys.index_of[n]] = UnmaskReply(
                b_shares=dict(
                    zip(cast(list[int], r[wire.B_SOURCES]), cast(list[bytes], r[wire.B_SHARES]), strict=True)
                ),
                sk_shares=dict(
                    zip(cast(list[int], r[wire.SK_SOURCES]), cast(list[bytes], r[wire.SK_SHARES]), strict=True)
                ),
            )
        except (KeyError, ValueError, TypeError):
            log.warning("secagg round %d: malformed unmask reply from node %d", rnd.server_round, n)

    def _speculate(self, server_round: int, node_ids: list[int]) -> _Session | None:
        """A session for the next round over ``node_ids``, if pipelining is on and it is feasible."""
        if not self.pipeline:
            return None
        try:
            return self._new_session(server_round, [n for n in node_ids if n in self._channel_pks])
        except SecAggAbort:
            return None

    def _synthetic_reply(
        self, rnd: _Round, mean: np.ndarray, total_weight: int, metrics: Mapping[int, dict[str, MetricRecord]]
    ) -> Message:
        arrays: dict[str, Array] = {}
        offset = 0
        for key, arr in rnd.arrays.items():
            g = arr.numpy()
            part = mean[offset : offset + g.size].reshape(g.shape)
            offset += g.size
            # the sum in float64, stored in the global's dtype: one pass, no temporaries
            new = np.empty(g.shape, dtype=g.dtype)
            np.add(g, part, out=new, dtype=np.float64, casting="unsafe")
            arrays[key] = Array(new)
        metric_key, averaged = self._mean_metrics(metrics)
        averaged[self.weighted_by_key] = total_weight
        content = RecordDict({rnd.arrays_key: ArrayRecord(arrays), metric_key: MetricRecord(averaged)})
        any_instruction = next(iter(rnd.instructions.values()))
        return Message(content, reply_to=any_instruction)

    def _mean_metrics(self, metrics: Mapping[int, dict[str, MetricRecord]]) -> tuple[str, dict]:
        """Weighted mean of the plaintext metrics (weights: the nodes' own, capped like the encoding)."""
        rows: list[tuple[float, MetricRecord]] = []
        key = "metrics"
        for recs in metrics.values():
            for k, rec in recs.items():
                if self.weighted_by_key in rec:
                    key = k
                    w = self._params.cap_weight(float(cast(float, rec[self.weighted_by_key])))
                    rows.append((float(w), rec))
        total = sum(w for w, _ in rows)
        if not rows or total <= 0:
            return key, {}
        common = set.intersection(*(set(rec) for _, rec in rows)) - {self.weighted_by_key}
        out: dict = {}
        for name in sorted(common):
            values = [rec[name] for _, rec in rows]
            if all(isinstance(v, list) for v in values):
                if len({len(cast(list, v)) for v in values}) != 1:
                    continue
                out[name] = [
                    sum(w * float(v[j]) for (w, _), v in zip(rows, values, strict=True)) / total
                    for j in range(len(cast(list, values[0])))
                ]
            elif all(isinstance(v, int | float) for v in values):
                out[name] = sum(w * float(cast(float, v)) for (w, _), v in zip(rows, values, strict=True)) / total
        return key, out

    # ------------------------------------------------------------------ plumbing
    def _abort(self, report: RoundReport, reason: str) -> None:
        self._round = None  # (a pipelined session for the next round, if any, stays valid)
        report.abort_reason = reason
        self.last_abort_reason = reason
        log.warning("secagg round %d aborted, the global model is unchanged: %s", report.server_round, reason)

    def _exchange(
        self,
        grid: Grid,
        payloads: Mapping[int, Mapping[str, dict]],
        server_round: int,
        errors_out: set[int] | None = None,
        done: Callable[[Mapping[int, dict[str, ConfigRecord]]], bool] | None = None,
    ) -> dict[int, dict[str, ConfigRecord]]:
        """Send one stage message per node (record key -> values); return each answer's secagg records.

        Polls with a short, growing interval (a stage message is small and answered at once)
        until every node answered, ``done(answers so far)`` holds, or ``config.timeout``
        passed. Error replies are left out (and their senders added to ``errors_out``).
        """
        timeout = float(self.config.timeout)
        messages = [
            Message(
                RecordDict({key: ConfigRecord(values) for key, values in records.items()}),
                dst_node_id=n,
                message_type="train",
                group_id=str(server_round),
                ttl=timeout,
            )
            for n, records in payloads.items()
        ]
        pending = set(grid.push_messages(messages))
        out: dict[int, dict[str, ConfigRecord]] = {}
        deadline = time.monotonic() + timeout
        pause = _POLL_FIRST
        while pending:
            for r in grid.pull_messages(pending):
                pending.discard(r.metadata.reply_to_message_id)
                n = r.metadata.src_node_id
                if n not in payloads:
                    continue
                if r.has_error():
                    log.info("secagg round %d: node %d failed a stage: %s", server_round, n, r.error.reason)
                    if errors_out is not None:
                        errors_out.add(n)
                    continue
                recs = {k: v for k, v in r.content.config_records.items() if k in (wire.RECORD, wire.RECORD_NEXT)}
                if wire.RECORD in recs:
                    out[n] = recs
            if not pending or time.monotonic() >= deadline or (done is not None and out and done(out)):
                break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, _POLL_MAX)
        return out

    # ------------------------------------------------------------------ evaluation: unchanged
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy (evaluation metrics are not secret)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)
