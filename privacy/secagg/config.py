"""Typed configuration of secure aggregation (the ``secagg`` Hydra group), validated at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from privacy.secagg.encoding import EncodingParams
from privacy.secagg.wire import ACTIVE, ADVERSARIES

__all__ = ["SecAggConfig"]


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation settings; every constraint is checked in ``__post_init__``.

    Parameters
    ----------
    enabled : bool
        Whether the coordinator wraps its strategy in :class:`~privacy.secagg.SecAggStrategy`.
    adversary : {"active", "semi-honest"}
        The coordinator the nodes defend against. ``active`` (the default): nodes sign their
        keys with their roster keys, check a consistency signature set before revealing
        shares, refuse seen sessions, and demand a threshold and degree of at least
        ``floor(2n/3) + 1`` of the ``n`` roster members (docs/secagg.md). ``semi-honest``:
        an honest-but-curious coordinator only.
    threshold : int | float
        Shares needed to rebuild a node's secrets, and the fewest survivors a round accepts.
        A float in ``(0, 1]`` is a fraction of each secret's holders (the node and its
        neighbours), rounded up, at least 2; an int >= 2 is a count. In the active mode the
        coordinator raises it to ``floor(2n/3) + 1`` of the roster, which the nodes enforce.
    neighbours : int
        Degree ``k`` of the SecAgg+ neighbour graph (even), or 0 for the complete graph. In the
        active mode a degree below ``floor(2n/3)`` is raised to it (the nodes refuse less).
    clip_range : float
        Update coordinates are clipped to ``[-clip_range, clip_range]`` before quantisation.
    bits : int
        Quantisation bit width (1..32).
    max_weight : int
        Largest per-node weight (example count) that enters the sum; larger ones are capped.
    max_nodes : int
        Largest number of nodes in one round; with ``max_weight`` and ``bits`` it sizes the
        modulus (``max_nodes * max_weight * (2**bits - 1) < 2**64``).
    timeout : float
        Seconds the coordinator waits for replies at each key or unmask stage.
    unmask_spare : int
        Share holders asked in the unmask stage beyond the ``t`` each secret needs. The stage
        asks only enough survivors to hold ``t + unmask_spare`` shares of every secret and
        ends as soon as ``t`` of each are in, so up to ``unmask_spare`` silent holders per
        secret cost neither a second wave nor the timeout. A value at least the number of
        nodes asks every survivor, as plain SecAgg does.
    """

    enabled: bool = False
    adversary: str = ACTIVE
    threshold: int | float = 0.5
    neighbours: int = 0
    clip_range: float = 1.0
    bits: int = 16
    max_weight: int = 1000
    max_nodes: int = 50
    timeout: float = 60.0
    unmask_spare: int = 1

    def __post_init__(self) -> None:
        if self.adversary not in ADVERSARIES:
            raise ValueError(f"adversary must be one of {list(ADVERSARIES)}, got {self.adversary!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise ValueError(f"threshold must be an int count or a float fraction, got {t!r}")
        if isinstance(t, float) and not 0.0 < t <= 1.0:
            raise ValueError(f"threshold as a fraction must lie in (0, 1], got {t}")
        if isinstance(t, int) and t < 2:
            raise ValueError(f"threshold as a count must be >= 2, got {t}")
        if isinstance(t, int) and t > self.max_nodes:
            raise ValueError(f"threshold {t} exceeds max_nodes {self.max_nodes}")
        if isinstance(t, int) and self.neighbours and t > self.neighbours + 1:
            raise ValueError(f"threshold {t} exceeds neighbours + 1 = {self.neighbours + 1} (the holders of a secret)")
        if self.neighbours < 0 or self.neighbours % 2:
            raise ValueError(f"neighbours must be 0 (complete graph) or an even number >= 2, got {self.neighbours}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if isinstance(self.unmask_spare, bool) or not isinstance(self.unmask_spare, int) or self.unmask_spare < 0:
            raise ValueError(f"unmask_spare must be an int >= 0, got {self.unmask_spare!r}")
        _ = self.encoding  # validates clip_range, bits, max_weight, max_nodes and the modulus

    @property
    def encoding(self) -> EncodingParams:
        """The quantisation and modulus parameters."""
        return EncodingParams(
            clip_range=float(self.clip_range),
            bits=int(self.bits),
            max_weight=int(self.max_weight),
            max_nodes=int(self.max_nodes),
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SecAggConfig:
        """Build from a mapping such as Hydra's composed ``cfg.secagg``; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown secagg keys {sorted(unknown)}; known keys: {sorted(known)}")
        kwargs: dict[str, Any] = dict(values)
        if "threshold" in kwargs and isinstance(kwargs["threshold"], str):
            text = kwargs["threshold"]
            kwargs["threshold"] = float(text) if "." in text else int(text)
        return cls(**kwargs)
