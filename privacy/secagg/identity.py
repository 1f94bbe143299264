"""What a node brings to the active-adversary mode: its roster, its roster key, its seen sessions, its policy.

All of it is the node's own: read from its configuration (``fedmart node --roster``,
``--roster-key``, its state directory and its policy) or, in simulation, handed to the
simulated node by ``fedmart simulate``; nothing here ever comes from a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.secagg.roster import Roster, RosterKey, make_roster
from privacy.secagg.seen_sessions import SeenSessions
from privacy.secagg.stage_messages import ChannelCert
from privacy.secagg.statements import channel_statement
from privacy.secagg.wire import ACTIVE, ADVERSARIES

__all__ = ["NodeIdentity", "in_memory_identities"]


@dataclass(frozen=True)
class NodeIdentity:
    """A node's roster, its own roster key, the sessions it has seen, and the mode its policy demands.

    ``threat_model`` is the node policy's ``secagg_threat_model``: with ``"active"`` the node
    refuses a semi-honest session; with ``"semi-honest"`` it takes either.
    """

    roster: Roster
    key: RosterKey
    seen: SeenSessions = field(default_factory=SeenSessions)
    threat_model: str = ACTIVE
    _channels: set[tuple[str, bytes, bytes]] = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.key.fingerprint not in self.roster:
            raise ValueError(f"the node's roster key {self.key.fingerprint} is not in its roster")
        if self.threat_model not in ADVERSARIES:
            raise ValueError(f"threat_model must be one of {ADVERSARIES}, got {self.threat_model!r}")

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    def verify_channel(self, cert: ChannelCert, c_pk: bytes) -> bool:
        """Whether ``cert`` is a roster member's signature on ``c_pk`` (a verified pair is remembered:
        channel keys are long-lived, so the check costs one signature per neighbour once, not per round)."""
        entry = (cert.fingerprint, c_pk, cert.signature)
        if entry in self._channels:
            return True
        ok = self.roster.verify(cert.fingerprint, channel_statement(cert.fingerprint, c_pk), cert.signature)
        if ok:
            self._channels.add(entry)
        return ok

    def channel_cert(self, c_pk: bytes) -> ChannelCert:
        """This member's signature on its channel key (sent with the advertise reply)."""
        return ChannelCert(self.fingerprint, self.key.sign(channel_statement(self.fingerprint, c_pk)))

    @classmethod
    def load(
        cls, roster: str | Path, key: str | Path, *, state_dir: str | Path | None, threat_model: str = ACTIVE
    ) -> NodeIdentity:
        """From the node's own files; ``RosterError`` if they are missing or do not belong together."""
        r = Roster.load(roster)
        return cls(r, RosterKey.load(key, r), SeenSessions(state_dir), threat_model)


def in_memory_identities(names: list[int] | list[str], threat_model: str = ACTIVE) -> dict:
    """A fresh roster and one identity per name, nothing on disk (tests, benchmarks, local rounds)."""
    keys = {n: Ed25519PrivateKey.generate() for n in names}
    roster = make_roster((str(n), k.public_key()) for n, k in keys.items())
    return {n: NodeIdentity(roster, RosterKey(k), SeenSessions(), threat_model) for n, k in keys.items()}
