"""What the coordinator keeps about a secure round: its key session, the round in flight, the report.

Only public material is kept here: node ids, protocol indices, the session (which holds
masked data, public keys and encrypted shares only), the TRAIN messages sent and timings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from privacy.secagg.server_session import ServerSession

__all__ = ["RoundReport", "KeySession", "PendingRound"]


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
class KeySession:
    """One protocol session of a round, and how its indices map to Flower node ids."""

    server_round: int
    session: ServerSession
    node_of: dict[int, int]  # protocol index -> node id
    index_of: dict[int, int]  # node id -> protocol index


@dataclass
class PendingRound:
    """A round between ``configure_train`` (TRAIN messages sent) and ``aggregate_train``."""

    server_round: int
    grid: Grid
    arrays: ArrayRecord
    arrays_key: str
    keys: KeySession
    instructions: dict[int, Message]  # node id -> TRAIN message sent
    report: RoundReport
    sent_at: float = 0.0
    upcoming: KeySession | None = None  # next round's session, its share-keys stage riding on these TRAIN messages
