r"""Fixed-point encoding of a weighted model update into integers modulo M = 2**32 or 2**64.

A node with weight ``w`` (its example count, capped at ``max_weight``) and update
``delta = new - global`` sends the vector::

    x = [ w * q_1, ..., w * q_d, w ]          q_i = round((clip(delta_i) + c) / s)

with clipping range ``c`` (``clip(delta_i)`` lies in ``[-c, c]``), ``L = 2**bits - 1``
quantisation levels and step ``s = 2c / L``, so ``q_i`` is an integer in ``[0, L]``. Summed over
the nodes ``U`` that survive, the coordinator gets ``sum_u w_u q_u`` and ``W = sum_u w_u`` and
decodes the weighted mean update as::

    mean_i = s * (sum_u w_u q_ui) / W - c

**Modulus.** Every coordinate of the sum is at most ``max_nodes * max_weight * L``; the
modulus is the smallest of ``2**32`` and ``2**64`` that exceeds it, so the sum of masked vectors
modulo M *is* the integer sum. :func:`modulus_bits` checks this at configuration time and raises
``ValueError`` naming the constraint ``max_nodes * max_weight * (2**bits - 1) < 2**64``.

**Quantisation error bound.** Rounding moves each ``clip(delta_i)`` by at most ``s / 2``; the
weighted mean of values that each moved by at most ``s / 2`` moved by at most ``s / 2``. Hence
for every coordinate::

    | mean_i - sum_u w_u clip(delta_ui) / W |  <=  s / 2  =  c / (2**bits - 1)

(:func:`quantisation_error_bound`), plus float rounding when the result is stored back in the
model's dtype (float32: a relative 2**-24). The bound is about the *clipped* update: a coordinate
outside ``[-c, c]`` is clipped (logged by the node), and a weight above ``max_weight`` counts as
``max_weight``. Example: ``c = 1.0, bits = 16`` gives ``|error| <= 1.53e-5`` per coordinate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EncodingParams",
    "WeightCapNotice",
    "modulus_bits",
    "quantisation_error_bound",
    "encode",
    "decode",
    "weight_cap_explanation",
]

log = logging.getLogger(__name__)


def quantisation_error_bound(clip_range: float, bits: int) -> float:
    """Largest per-coordinate error of the decoded weighted mean of clipped updates: ``c / (2**bits - 1)``."""
    return clip_range / (2**bits - 1)


def modulus_bits(max_nodes: int, max_weight: int, bits: int) -> int:
    """32 or 64: the word size whose modulus cannot overflow for the worst-case sum.

    Raises
    ------
    ValueError
        If ``max_nodes * max_weight * (2**bits - 1) >= 2**64``.
    """
    worst = max_nodes * max_weight * (2**bits - 1)
    if worst < 2**32:
        return 32
    if worst < 2**64:
        return 64
    raise ValueError(
        "secure aggregation would overflow: max_nodes * max_weight * (2**bits - 1) must be < 2**64, got "
        f"{max_nodes} * {max_weight} * (2**{bits} - 1) = 2**{math.log2(worst):.1f}; lower bits, max_weight or max_nodes"
    )


@dataclass(frozen=True)
class EncodingParams:
    """How updates become integers; validated at construction.

    Parameters
    ----------
    clip_range : float
        Each update coordinate is clipped to ``[-clip_range, clip_range]``.
    bits : int
        Quantisation levels ``2**bits - 1`` (1..32).
    max_weight : int
        Largest per-node weight (example count) that enters the sum; larger weights are capped.
    max_nodes : int
        Largest number of nodes whose vectors are summed (sizes the modulus).
    """

    clip_range: float
    bits: int
    max_weight: int
    max_nodes: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a positive finite number, got {self.clip_range}")
        if not 1 <= self.bits <= 32:
            raise ValueError(f"bits must lie in 1..32, got {self.bits}")
        if self.max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, got {self.max_weight}")
        if self.max_nodes < 2:
            raise ValueError(f"max_nodes must be >= 2, got {self.max_nodes}")
        modulus_bits(self.max_nodes, self.max_weight, self.bits)  # raises when it cannot fit

    @property
    def levels(self) -> int:
        """Largest quantised value L = 2**bits - 1."""
        return 2**self.bits - 1

    @property
    def step(self) -> float:
        """Quantisation step s = 2c / L."""
        return 2.0 * self.clip_range / self.levels

    @property
    def modulus_bits(self) -> int:
        """32 or 64 (the modulus is 2**modulus_bits)."""
        return modulus_bits(self.max_nodes, self.max_weight, self.bits)

    @property
    def dtype(self) -> np.dtype:
        """Unsigned word type whose wrap-around is reduction modulo M."""
        return np.dtype(np.uint32 if self.modulus_bits == 32 else np.uint64)

    @property
    def error_bound(self) -> float:
        """Per-coordinate bound of :func:`quantisation_error_bound` for these parameters."""
        return quantisation_error_bound(self.clip_range, self.bits)

    def cap_weight(self, weight: float) -> int:
        """The integer weight a node encodes: ``round(weight)`` capped at ``max_weight``.

        Silent: whoever caps says so once per run (:class:`WeightCapNotice`), not per node and round.
        """
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"a node's weight must be a finite number >= 0, got {weight}")
        return min(int(round(weight)), self.max_weight)


class WeightCapNotice:
    """Explains the weight cap once per run (``key``), not once per node per round.

    The cap is part of the encoding, not a bug: ``max_weight`` bounds every coordinate of the sum
    (``max_nodes * max_weight * (2**bits - 1)``), which decides whether the masked words are 32 or
    64 bits wide. Nodes above it all count as ``max_weight``: with every node that large, the
    secure average weighs them equally. Thread-safe; one instance per process is enough.
    """

    def __init__(self) -> None:
        import threading

        self._told: set[object] = set()
        self._lock = threading.Lock()

    def note(self, key: object, weight: float, params: EncodingParams, *, who: str) -> None:
        """Say once per ``key`` that ``weight`` (of ``who``: "this node", "node weights") was capped."""
        if not math.isfinite(weight) or weight <= params.max_weight:
            return
        with self._lock:
            if key in self._told:
                return
            self._told.add(key)
        log.warning("%s", weight_cap_explanation(weight, params, who=who))


def weight_cap_explanation(weight: float, params: EncodingParams, *, who: str) -> str:
    """One line: what the cap did, why the encoding has it, and how to change it."""
    fits32 = (2**32 - 1) // (params.max_nodes * params.levels)
    room = (
        f"above {fits32} the words become 64-bit, twice the traffic; fewer max_nodes or bits leave more room"
        if params.modulus_bits == 32
        else "the words are 64-bit already, and max_nodes x max_weight x levels must stay below 2**64"
    )
    return (
        f"secure aggregation: {who} weighs ~{weight:.0f} (training users), above secagg.max_weight "
        f"{params.max_weight}, and counts as {params.max_weight} (said once per run). At these sizes every node with "
        f"{params.max_weight} or more training users gets the same weight in the average, because max_weight bounds "
        f"each coordinate of the masked sum (max_nodes {params.max_nodes} x max_weight x {params.levels} levels) and "
        f"so sizes its {params.modulus_bits}-bit words. To weigh nodes by size, raise secagg.max_weight ({room}); "
        "federation.item_rows=holders (the default) and client-level DP weigh every node 1 anyway"
    )


def encode(delta: np.ndarray, weight: int, params: EncodingParams, *, overwrite: bool = False) -> np.ndarray:
    """The vector ``[w*q_1, ..., w*q_d, w]`` in ``params.dtype`` (length ``d + 1``).

    Parameters
    ----------
    delta : np.ndarray
        Flat float update ``new - global``; must be finite.
    weight : int
        Integer weight in ``0..max_weight`` (see :meth:`EncodingParams.cap_weight`).
    params : EncodingParams
    overwrite : bool
        If ``delta`` is a contiguous float64 array, quantise it in place (it is garbage on
        return). Saves two model-sized temporaries: fresh multi-megabyte arrays cost page
        faults, and this path runs on every node every round (3x faster at 1M parameters).
    """
    if not 0 <= weight <= params.max_weight:
        raise ValueError(f"weight must lie in 0..{params.max_weight}, got {weight}")
    x = np.asarray(delta, dtype=np.float64)
    in_place = overwrite and x is delta and x.flags.c_contiguous and x.flags.writeable
    x = x.ravel()  # a view when contiguous
    out = np.empty(x.size + 1, dtype=params.dtype)
    out[-1] = weight
    if x.size == 0:
        return out
    c, scale = params.clip_range, params.levels / (2.0 * params.clip_range)
    lo, hi = float(x.min()), float(x.max())  # NaN propagates through min/max
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("the update contains NaN or infinity")
    if lo < -c or hi > c:
        log.warning("secagg: %d of %d update coordinates clipped to +-%g", np.count_nonzero(np.abs(x) > c), x.size, c)
    q = x if in_place else np.multiply(x, scale)  # q = (clip(x) + c) * L / 2c, in as few passes as possible
    if in_place:
        q *= scale
    q += c * scale
    np.clip(q, 0, params.levels, out=q)  # also guards float rounding at the edges
    np.rint(q, out=q)
    # q * w <= (2**bits - 1) * max_weight is an exact float64 integer below the modulus
    np.multiply(q, weight, out=out[:-1], casting="unsafe")
    return out


def decode(total: np.ndarray, params: EncodingParams) -> tuple[np.ndarray, int]:
    """From the sum of encoded vectors to ``(weighted mean update as float64, total weight W)``.

    Raises
    ------
    ValueError
        If the total weight is zero (no node contributed any weight).
    """
    weight = int(total[-1])
    if weight <= 0:
        raise ValueError("the total weight of the surviving nodes is zero")
    mean = total[:-1].astype(np.float64)
    mean *= params.step / weight
    mean -= params.clip_range
    return mean, weight
