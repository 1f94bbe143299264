"""What the coordinator keeps about a secure round: its key session, the round in flight, the report.

Only public material is kept here: node ids, protocol indices, the session (which holds
masked data, public keys and encrypted shares only), the TRAIN messages sent and timings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
    rejoined: int = 0  # nodes that came back with a new channel key (restarted) and joined this round's keys
    shared: int = 0  # |U2|: nodes that shared keys
    masked: int = 0  # |U3|: nodes whose masked input is in the sum
    asked: int = 0  # nodes asked to unmask (a covering subset of U3, more if some were silent)
    unmasked: int = 0  # |U4|: nodes whose unmask answers were used
    threshold: int = 0
    pipelined: bool = False  # the share-keys stage rode on the previous round's unmask messages
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, as the coordinator sees it
    abort_reason: str | None = None

    def summary(self) -> str:
        """The round's one line, the same in simulation and in a deployment (``fedmart coordinate`` prints it)."""
        parts = [f"secure aggregation: round {self.server_round}", f"{self.sampled} sampled", f"{self.masked} masked"]
        if self.shared < self.sampled:
            parts.append(f"{self.sampled - self.shared} shared no keys")
        if self.shared > self.masked:
            parts.append(f"{self.shared - self.masked} dropped after sharing keys (their masks rebuilt from shares)")
        if self.abort_reason is None:
            parts.append(f"unmasked by {self.unmasked} of {self.asked} asked (threshold {self.threshold})")
        if self.rejoined:
            parts.append(f"{self.rejoined} rejoined with a new channel key")
        if self.pipelined:
            parts.append("keys pipelined")
        if self.abort_reason is not None:
            parts.append(f"ABORTED: {self.abort_reason}; the global model is unchanged")
        times = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return ", ".join(parts) + (f"; {times}" if times else "")

    def to_json(self) -> dict:
        """The round's report for ``metrics.jsonl``, with its line."""
        return {**asdict(self), "summary": self.summary()}


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
    rejoined: set[int] = field(default_factory=set)  # nodes that answered their TRAIN message with a new channel key
