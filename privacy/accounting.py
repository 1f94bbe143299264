"""Privacy accounting for DP-SGD histories: epsilon from a list of training phases.

A *history* is what Opacus's accountants keep: a list of
``(noise_multiplier, sample_rate, num_steps)`` entries, one per phase of training
with constant parameters. Each step is one release of the Poisson-subsampled
Gaussian mechanism (clipped per-example gradient sum plus Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm``). The entries compose
(order does not matter), so the history of a node's dataset over many rounds,
runs and restarts is simply the concatenation of each training's entry.

The numbers come from Opacus's own accountants, never from a re-implementation:
``epsilon(history, ...)`` equals ``RDPAccountant``/``PRVAccountant`` given the same
history. Guarantee assumptions (what makes the number true):

* every step samples each example independently with probability ``sample_rate``
  (Poisson sampling), and the same dataset (same unit of privacy) is behind every
  entry of the history;
* the per-example gradient is clipped to ``max_grad_norm`` before the noise is
  added, and nothing else about the data is released during training;
* add/remove-one-example adjacency (Opacus's convention).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "ACCOUNTANTS",
    "HistoryEntry",
    "validate_history",
    "epsilon",
    "epsilon_after",
    "noise_multiplier_for",
    "default_delta",
]

log = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")
"""Accountants fedmart supports (Opacus mechanism names). RDP is the default: fast and
monotone; PRV is tighter (smaller epsilon for the same training) but slower."""

HistoryEntry = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, num_steps)``, as Opacus accountants keep them."""


def validate_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Check and normalise a history; raises ``ValueError`` naming the bad entry.

    Each entry needs ``noise_multiplier > 0`` (zero noise has no finite epsilon),
    ``0 < sample_rate <= 1`` and an integer ``num_steps >= 0``.
    """
    out: list[HistoryEntry] = []
    for i, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(f"history entry {i} must be (noise_multiplier, sample_rate, num_steps), got {entry!r}")
        sigma, q, steps = float(entry[0]), float(entry[1]), entry[2]
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"history entry {i}: noise_multiplier must be > 0, got {sigma}")
        if not (0 < q <= 1):
            raise ValueError(f"history entry {i}: sample_rate must be in (0, 1], got {q}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"history entry {i}: num_steps must be an integer >= 0, got {steps!r}")
        out.append((sigma, q, int(steps)))
    return out


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, not {accountant!r}")


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon(history: Iterable[Sequence[float]], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by ``history`` at ``delta``, computed by the Opacus accountant.

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, num_steps)
        Every training phase on *one* dataset (one unit of privacy). Entries with
        zero steps are ignored.
    delta : float
        Target delta, in (0, 1). Use the same delta for the whole life of a dataset.
    accountant : {"rdp", "prv"}
        RDP (Mironov et al.) or PRV (Gopi et al., an upper bound from numerical
        composition). PRV gives a smaller epsilon for the same history.

    Returns
    -------
    float
        Epsilon; 0.0 for an empty history.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    entries = [e for e in validate_history(history) if e[2] > 0]
    if not entries:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(entries, delta)
    from opacus.accountants import create_accountant  # heavy import, only when needed

    acc = create_accountant(mechanism=accountant)
    acc.history = list(entries)
    return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(entries: list[HistoryEntry], delta: float) -> float:
    """``RDPAccountant.get_epsilon`` computed the same way (same orders, same float
    operations, so the same number), with the per-step RDP of each ``(sigma, q)``
    cached: a ledger's history grows by one entry per round and is re-evaluated at
    every check, and most entries share their parameters."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum([_rdp_per_step(q, sigma) * steps for (sigma, q, steps) in entries])
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    vec = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    vec = np.asarray(vec)
    vec.flags.writeable = False
    return vec


def epsilon_after(
    history: Iterable[Sequence[float]],
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon that ``history`` plus one more training of ``steps`` steps would reach."""
    return epsilon(
        [*validate_history(history), (noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant
    )


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier (Opacus's binary search) with which ``steps`` steps at
    ``sample_rate`` stay within ``(target_epsilon, delta)``, starting from zero spend.

    The search takes seconds on a CPU (many accountant evaluations), so results are
    cached per argument tuple. Raises ``ValueError`` when the budget cannot be met
    (Opacus gives up above sigma=1e6).
    """
    _check_accountant(accountant)
    _check_delta(delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return _noise_multiplier(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant)


@functools.lru_cache(maxsize=64)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def default_delta(num_examples: int) -> float:
    """The delta used when none is configured: ``1 / num_examples`` (one user = one example).

    This is the loosest value still commonly used: a mechanism that publishes one
    random user's whole history satisfies (0, 1/n)-DP, so configure a smaller delta
    (e.g. ``1 / (10 n)``) where that matters. Keep it fixed for the life of a dataset:
    the ledger's epsilon is only meaningful at one delta.
    """
    if num_examples < 1:
        raise ValueError(f"need at least one example to derive delta, got {num_examples}")
    return 1.0 / num_examples
