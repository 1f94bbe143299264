"""One secure-aggregation stage as one exchange of messages: push to every node, poll until done.

The coordinator's stage messages are small and answered at once, so a stage waits only as
long as its slowest needed answer (or ``timeout``); each message carries that TTL, so a late
one is not delivered into a later round. Nothing here sees a node's update: stage messages
carry keys, encrypted shares and revealed shares only (:mod:`privacy.secagg.stage_records`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from privacy.secagg import wire

__all__ = ["POLL_FIRST", "POLL_MAX", "exchange_stage"]

log = logging.getLogger(__name__)

POLL_FIRST = 0.005  # seconds; polling backs off to POLL_MAX
# A stage's replies are small and come back within tens of ms in simulation; with a 0.1 s
# cap the doubling backoff checked at 5, 15, 35, 75, 155 ms and a stage that finished at
# 80 ms was seen at 155 (BENCHMARKS.md, "Secure aggregation cost"). A pull is cheap: an
# in-memory lookup in simulation, one request to the SuperLink in a deployment.
POLL_MAX = 0.02


def exchange_stage(
    grid: Grid,
    payloads: Mapping[int, Mapping[str, dict]],
    server_round: int,
    *,
    timeout: float,
    errors_out: set[int] | None = None,
    done: Callable[[Mapping[int, dict[str, ConfigRecord]]], bool] | None = None,
) -> dict[int, dict[str, ConfigRecord]]:
    """Send one stage message per node (record key -> values); return each answer's secagg records.

    Polls with a short, growing interval (a stage message is small and answered at once)
    until every node answered, ``done(answers so far)`` holds, or ``timeout`` seconds
    passed. Error replies are left out (and their senders added to ``errors_out``).
    """
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
    pause = POLL_FIRST
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
        pause = min(2 * pause, POLL_MAX)
    return out
