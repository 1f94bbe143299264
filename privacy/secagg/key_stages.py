"""The coordinator's key stages: advertise channel keys, share keys, and pipeline the next round's.

:class:`KeyStages` keeps the nodes' long-lived channel public keys and, with pipelining, the
next round's session whose share-keys stage rode on this round's TRAIN messages. It learns
public keys and encrypted shares only. A node that restarted answers a share-keys stage (or a
TRAIN message of a session it lost) with its new channel key instead (:func:`is_rejoin`): the
coordinator keeps that key, runs the share-keys stage once more in the same round if the node was
in it, and the node is in the secure sum from then on, with no error on either side. A node that
fails a stage for another reason is forgotten and asked to advertise again next time.

In the active mode a node's advertise reply also carries its roster fingerprint, its signature
on its channel key (forwarded to its neighbours, who check it against their own roster) and
the size of its roster, which sets the threshold the nodes will demand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from privacy.secagg import wire
from privacy.secagg.config import SecAggConfig
from privacy.secagg.graph import SecAggAbort
from privacy.secagg.round_state import KeySession, RoundReport
from privacy.secagg.server_session import ServerSession
from privacy.secagg.stage_exchange import exchange_stage
from privacy.secagg.stage_messages import ChannelCert
from privacy.secagg.stage_records import parse_share_keys_reply, share_keys_record

__all__ = ["KeyStages", "is_rejoin"]

log = logging.getLogger(__name__)


def is_rejoin(record: ConfigRecord) -> bool:
    """A node's answer that it restarted: its new channel key instead of the stage it was asked for."""
    return record.get(wire.STAGE) == wire.ADVERTISE and bool(record.get(wire.REJOIN, False))


class KeyStages:
    """Channel keys and key sessions of one coordinator (see the module docstring).

    Parameters
    ----------
    config : SecAggConfig
        Threshold, graph degree and per-stage timeout.
    pipeline : bool
        Run the next round's share-keys stage on this round's TRAIN messages.
    """

    def __init__(self, config: SecAggConfig, *, pipeline: bool) -> None:
        self.config = config
        self.pipeline = pipeline
        self.timeout = float(config.timeout)
        self.channel_pks: dict[int, bytes] = {}  # node id -> channel public key (long-lived)
        self.certs: dict[int, ChannelCert] = {}  # node id -> its roster signature on it (active mode)
        self.roster_sizes: dict[int, int] = {}  # node id -> members in its roster (active mode)
        self.next: KeySession | None = None  # share-keys already done for the next round (pipelining)

    def take_next(self) -> KeySession | None:
        """The pipelined session for the coming round, if any; it is used at most once."""
        speculation, self.next = self.next, None
        return speculation

    def session_for(
        self,
        server_round: int,
        node_ids: list[int],
        grid: Grid,
        report: RoundReport,
        speculation: KeySession | None,
    ) -> KeySession:
        """The round's key session: ``speculation`` if it covers exactly ``node_ids``, else fresh key stages."""
        if (
            speculation is not None
            and speculation.server_round == server_round
            and {speculation.node_of[i] for i in speculation.session.u2} == set(node_ids)
        ):
            # share-keys already ran with the previous round's TRAIN messages, and every node
            # sampled now took part (one that failed last round's training did not: it gets
            # a fresh share-keys stage instead of sitting this round out)
            report.pipelined = True
            return speculation
        return self.fresh(server_round, node_ids, grid, report)

    def fresh(self, server_round: int, node_ids: list[int], grid: Grid, report: RoundReport) -> KeySession:
        """Advertise (nodes without a known channel key) and share-keys stages; U2 is set on return."""
        unknown = [n for n in node_ids if n not in self.channel_pks]
        report.advertised = len(unknown)
        if unknown:
            t0 = time.perf_counter()
            request = {wire.STAGE: wire.ADVERTISE, wire.ADVERSARY: self.config.adversary}
            replies = exchange_stage(
                grid, {n: {wire.RECORD: request} for n in unknown}, server_round, timeout=self.timeout
            )
            for n, recs in replies.items():
                self._learn(n, recs[wire.RECORD])
            report.seconds[wire.ADVERTISE] = time.perf_counter() - t0

        t0 = time.perf_counter()
        keys, records = self._share_keys_stage(server_round, node_ids, grid)
        rejoined = [n for n, r in records.items() if is_rejoin(r)]
        if rejoined:
            # They restarted since the coordinator learnt their channel keys, and answered with their
            # new ones: the shares the others just made for them under the old keys are useless, so
            # the stage runs once more, with every participant, under the keys it now holds.
            for n in rejoined:
                self.learn_rejoin(n, records[n])
            report.rejoined = len(rejoined)
            log.info(
                "secure aggregation round %d: %d node(s) came back with a new channel key (restarted); sharing "
                "keys again with every node",
                server_round,
                len(rejoined),
            )
            keys, records = self._share_keys_stage(server_round, node_ids, grid)
        self.receive_share_keys(keys, records)
        report.seconds[wire.SHARE_KEYS] = time.perf_counter() - t0
        return keys

    def _share_keys_stage(
        self, server_round: int, node_ids: list[int], grid: Grid
    ) -> tuple[KeySession, dict[int, ConfigRecord]]:
        """One share-keys exchange over the nodes whose channel keys are known: the session and the answers."""
        keys = self.new_session(server_round, [n for n in node_ids if n in self.channel_pks])
        payloads = {n: {wire.RECORD: p} for n, p in self.share_keys_payloads(keys).items()}
        failed: set[int] = set()
        replies = exchange_stage(grid, payloads, server_round, timeout=self.timeout, errors_out=failed)
        for n in failed:  # the node may have lost its channel key: ask it to advertise again next time
            self.forget(n)
        return keys, {n: recs[wire.RECORD] for n, recs in replies.items()}

    def learn_rejoin(self, n: int, record: ConfigRecord) -> None:
        """Node ``n`` restarted and sent its new channel key (:func:`is_rejoin`): hold that one from now on."""
        self.forget(n)
        self._learn(n, record)

    def _learn(self, n: int, record: ConfigRecord) -> None:
        """Keep a node's advertised channel key (and, active, its member fingerprint, signature, roster size)."""
        pk = record.get(wire.CHANNEL_PK)
        if not (isinstance(pk, bytes) and len(pk) == 32):
            return
        if self.config.adversary == wire.ACTIVE:
            fp, sig, size = record.get(wire.MEMBER), record.get(wire.SIGNATURE), record.get(wire.ROSTER_SIZE)
            if not (isinstance(fp, str) and isinstance(sig, bytes) and isinstance(size, int)):
                log.warning("secagg: node %d advertised no roster signature; it cannot join an active session", n)
                return
            self.certs[n], self.roster_sizes[n] = ChannelCert(fp, sig), size
        self.channel_pks[n] = pk

    def forget(self, n: int) -> None:
        """Ask node ``n`` to advertise again next time."""
        for known in (self.channel_pks, self.certs, self.roster_sizes):
            known.pop(n, None)

    def new_session(self, server_round: int, participants: list[int]) -> KeySession:
        """A protocol session over ``participants`` (node ids), indexed 1..n in that order."""
        node_of = {i + 1: n for i, n in enumerate(participants)}
        # the nodes enforce floor(2n/3) + 1 of their own roster; an honest coordinator asks for that
        roster = max((self.roster_sizes.get(n, 0) for n in participants), default=0)
        session = ServerSession(
            list(node_of),
            threshold=self.config.threshold,
            neighbours=self.config.neighbours,
            server_round=server_round,
            adversary=self.config.adversary,
            roster_size=roster,
        )
        return KeySession(server_round, session, node_of, {n: i for i, n in node_of.items()})

    def share_keys_payloads(self, keys: KeySession) -> dict[int, dict]:
        """Share-keys stage record per node id."""
        requests = keys.session.share_keys_requests(
            {i: self.channel_pks[n] for i, n in keys.node_of.items()},
            {i: self.certs[n] for i, n in keys.node_of.items() if n in self.certs},
        )
        return {
            keys.node_of[i]: share_keys_record(
                req, server_round=keys.server_round, channel_pk=self.channel_pks[keys.node_of[i]]
            )
            for i, req in requests.items()
        }

    def receive_share_keys(self, keys: KeySession, records: Mapping[int, ConfigRecord]) -> None:
        """Parse share-keys replies (node id -> record) into the session; may abort."""
        parsed = {}
        for n, r in records.items():
            if n not in keys.index_of:
                continue
            if is_rejoin(r):  # it restarted (new channel key): it joins the next session
                self.learn_rejoin(n, r)
                continue
            if wire.ERROR in r:  # a pipelined share-keys stage failed on the node
                log.info("secagg round %d: node %d could not share keys: %s", keys.server_round, n, r[wire.ERROR])
                self.forget(n)
                continue
            try:
                parsed[keys.index_of[n]] = parse_share_keys_reply(r)
            except (KeyError, ValueError, TypeError):
                log.warning("secagg round %d: malformed share-keys reply from node %d", keys.server_round, n)
        keys.session.receive_share_keys(parsed)

    def speculate(self, server_round: int, node_ids: list[int]) -> KeySession | None:
        """A session for the next round over ``node_ids``, if pipelining is on and it is feasible."""
        if not self.pipeline:
            return None
        try:
            return self.new_session(server_round, [n for n in node_ids if n in self.channel_pks])
        except SecAggAbort:
            return None

    def harvest(self, upcoming: KeySession | None, replies: list[Message], asked: Mapping[int, Message]) -> None:
        """Take the next round's share-keys answers out of this round's TRAIN replies (nodes in ``asked``)."""
        if upcoming is None:
            return
        records = {
            r.metadata.src_node_id: r.content.config_records[wire.RECORD_NEXT]
            for r in replies
            if not r.has_error() and r.metadata.src_node_id in asked and wire.RECORD_NEXT in r.content.config_records
        }
        try:
            self.receive_share_keys(upcoming, records)
            self.next = upcoming
        except SecAggAbort as err:
            log.info("secagg: no pipelined keys for round %d: %s", upcoming.server_round, err.reason)
