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

**The active-adversary mode** (``config.adversary == "active"``, the default) also forwards the
nodes' roster signatures, raises the threshold and a sparse degree to what the nodes demand
(``floor(2n/3) + 1`` of their roster), and, only when a node dropped between the share-keys
stage and its masked input, runs a ``consistency`` exchange (survivors sign U3) before the
unmask stage; otherwise the signatures on U2 that rode on the masked inputs serve.

A round that cannot complete (fewer survivors than the threshold at some stage, a secret
without enough shares, too many nodes for the modulus) aborts: ``aggregate_train`` returns
``(None, None)``, the global model stays as it was, and the reason is logged and kept in
:attr:`SecAggStrategy.last_abort_reason` (and in :attr:`SecAggStrategy.last_report`).

Server-side clipping wrappers (``DifferentialPrivacyServerSideFixedClipping``) and robust
aggregators (Krum, median, trimmed mean) need individual updates and cannot work on a sum.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy.secagg import wire
from privacy.secagg.config import SecAggConfig
from privacy.secagg.encoding import WeightCapNotice
from privacy.secagg.graph import SecAggAbort
from privacy.secagg.key_stages import KeyStages, is_rejoin
from privacy.secagg.round_state import PendingRound, RoundReport
from privacy.secagg.stage_records import masked_input_record
from privacy.secagg.unmask_stage import unmask_round
from privacy.strategy_wrapper import StrategyWrapper, one_reply_explained

__all__ = ["SecAggStrategy", "RoundReport", "wrap_strategy"]

log = logging.getLogger(__name__)


def wrap_strategy(inner: Strategy, config: SecAggConfig) -> Strategy:
    """``SecAggStrategy(inner, config=config)`` if ``config.enabled``, else ``inner`` itself."""
    return SecAggStrategy(inner, config=config) if config.enabled else inner


class SecAggStrategy(StrategyWrapper):
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
        super().__init__(inner, weighted_by_key=weighted_by_key)
        if not isinstance(config, SecAggConfig):
            raise ValueError(f"config must be a SecAggConfig, got {type(config).__name__}")
        self.config = config
        self.last_abort_reason: str | None = None
        self.last_report: RoundReport | None = None
        self._params = config.encoding
        self._keys = KeyStages(config, pipeline=bool(pipeline))
        self._round: PendingRound | None = None
        self._weight_cap = WeightCapNotice()  # one strategy per run: the cap is explained once

    def __repr__(self) -> str:
        return f"SecAggStrategy({self.inner!r})"

    @property
    def pipeline(self) -> bool:
        """Whether the next round's share-keys stage rides on this round's TRAIN messages."""
        return self._keys.pipeline

    @pipeline.setter
    def pipeline(self, value: bool) -> None:
        self._keys.pipeline = bool(value)

    def summary(self) -> None:
        """Log the secure-aggregation settings, then the inner strategy's summary."""
        c = self.config
        log.info(
            "secure aggregation (%s coordinator): threshold=%s neighbours=%s clip_range=%g bits=%d (error <= %.3g) "
            "max_weight=%d max_nodes=%d modulus=2**%d timeout=%gs",
            c.adversary,
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
        speculation = self._keys.take_next()
        if len(set(node_ids)) != len(node_ids):
            raise SecAggAbort("the inner strategy addressed a node twice in one round")
        if len(node_ids) > self.config.max_nodes:
            raise SecAggAbort(
                f"{len(node_ids)} nodes sampled but secagg.max_nodes={self.config.max_nodes} sized the modulus"
            )
        array_keys = list(messages[0].content.array_records)
        if len(array_keys) != 1:
            raise SecAggAbort(f"a TRAIN message must carry exactly one ArrayRecord, got {array_keys}")

        keys = self._keys.session_for(server_round, node_ids, grid, report, speculation)
        session = keys.session
        report.threshold = session.threshold
        report.shared = len(session.u2)

        # masked input: the inner TRAIN messages, each with the secagg record added (and the
        # next round's share-keys stage, answered in the same reply)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        upcoming = self._keys.speculate(server_round + 1, [keys.node_of[i] for i in sorted(session.u2)])
        next_payloads = self._keys.share_keys_payloads(upcoming) if upcoming is not None else {}
        out: dict[int, Message] = {}
        for i, req in session.mask_requests().items():
            n = keys.node_of[i]
            original = by_node[n]
            content = RecordDict(dict(original.content.items()))
            content[wire.RECORD] = ConfigRecord(
                masked_input_record(req, params=self._params, weight_key=self.weighted_by_key, arrays_key=array_keys[0])
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
        self._round = PendingRound(
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

    # ------------------------------------------------------------------ train: unmask
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked replies and let the inner strategy aggregate it."""
        rnd, self._round = self._round, None
        if rnd is None or rnd.server_round != server_round:
            self._keys.take_next()  # a round this wrapper did not configure: drop the pipelined keys
            if self.last_abort_reason is None:
                self.last_abort_reason = f"round {server_round} was not configured by this SecAggStrategy"
                log.warning("secagg: %s", self.last_abort_reason)
            return None, None
        report = rnd.report
        report.seconds[wire.MASKED_INPUT] = time.perf_counter() - rnd.sent_at
        replies = [r for r in replies if not self._rejoined(r, rnd)]
        self._keys.harvest(rnd.upcoming, replies, rnd.instructions)  # first: an aborted round leaves keys for the next
        self._note_weights(replies)
        try:
            synthetic = unmask_round(
                rnd,
                replies,
                params=self._params,
                unmask_spare=self.config.unmask_spare,
                timeout=float(self.config.timeout),
                weighted_by_key=self.weighted_by_key,
            )
        except SecAggAbort as err:
            self._abort(report, err.reason)
            return None, None
        log.info("%s", report.summary())
        what = f"1 result, the mean of the {report.masked} nodes' updates unmasked from their secure sum"
        with one_reply_explained(what):
            return self.inner.aggregate_train(server_round, [synthetic])

    def rejoin_reason(self, reply: Message) -> str:
        """Why a TRAIN reply is a node sitting the round out after a restart ("" if it is not).

        A node that restarted after sharing keys for this round lost its session with its memory:
        it answers with its new channel key instead of a masked input (it did not train). The key
        is kept here, so the node is in the next round's secure sum; for this round it is a
        dropout, whose masks the others' shares rebuild. A coordinator that triages replies itself
        (:class:`federation.coordinator.Coordinator`) counts it as dropped, not as an error.
        """
        if self._round is None or not self._rejoined(reply, self._round):
            return ""
        return "restarted since it shared keys for this round: it sat the round out and rejoins from the next"

    def _rejoined(self, reply: Message, rnd: PendingRound) -> bool:
        if reply.has_error() or reply.metadata.src_node_id not in rnd.instructions:
            return False
        n = reply.metadata.src_node_id
        rec = reply.content.config_records.get(wire.RECORD)
        if rec is None or not is_rejoin(rec):
            return False
        if n not in rnd.rejoined:  # asked twice (the coordinator's triage, then aggregate_train): learnt once
            rnd.rejoined.add(n)
            self._keys.learn_rejoin(n, rec)
            rnd.report.rejoined += 1
        return True

    def _note_weights(self, replies: list[Message]) -> None:
        """Explain the weight cap once per run if a node's plaintext weight is above it."""
        weights = [
            float(rec[self.weighted_by_key])
            for r in replies
            if not r.has_error()
            for rec in r.content.metric_records.values()
            if isinstance(rec.get(self.weighted_by_key), int | float)
        ]
        if weights:
            self._weight_cap.note("run", max(weights), self._params, who="the heaviest node")

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
        signature = rec.get(wire.SIGNATURE)
        if rnd.keys.session.active and not (isinstance(signature, bytes) and len(signature) == 64):
            return "the masked input carries no signature on U2 (the active mode's consistency check)"
        y = masked[wire.MASKED_ARRAY]
        d = sum(int(np.prod(a.shape)) for a in rnd.arrays.values())
        if y.dtype != str(self._params.dtype) or tuple(y.shape) != (d + 1,):
            return (
                f"masked input of dtype {y.dtype} and shape {tuple(y.shape)}, expected {self._params.dtype} ({d + 1},)"
            )
        return ""

    # ------------------------------------------------------------------ plumbing
    def _abort(self, report: RoundReport, reason: str) -> None:
        self._round = None  # (a pipelined session for the next round, if any, stays valid)
        report.abort_reason = reason
        self.last_abort_reason = reason
        log.warning("%s", report.summary())
