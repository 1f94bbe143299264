"""One-run privacy audit: an empirical lower bound on epsilon from guessing which canaries were trained on.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv:2305.08846). The setting:

* ``m`` canaries; each is included in training independently with probability 1/2
  (``S_i = +1`` in, ``S_i = -1`` out);
* after the one training run the auditor scores every canary (higher = "looks included"),
  guesses "in" (+1) for the ``k`` highest scores, "out" (-1) for the ``k`` lowest and abstains on
  the rest, so it makes ``r = 2k`` guesses (:func:`guess`);
* ``v`` of the ``r`` guesses are correct.

The statement implemented is the paper's main theorem for approximate DP, Theorem 5.2: let the
mechanism ``M: {-1,+1}^m -> Y`` be (epsilon, delta)-DP (with respect to changing one canary's
``S_i``), let ``S`` be uniform on ``{-1,+1}^m``, let the guesses ``T in {-1,0,+1}^m`` be any
function of ``M(S)`` with ``||T||_1 <= r``, and let ``W = sum_i max(0, T_i * S_i)`` be the number of
correct guesses. Then for every ``v``::

    P[W >= v]  <=  f(v) + 2 m delta * max_{i in {1,...,m}} (f(v - i) - f(v)) / i,

    f(v) := P[Binomial(r, e^eps / (1 + e^eps)) >= v].

With ``delta = 0`` the second term vanishes and this is the pure-DP bound: the number of correct
guesses is stochastically dominated by ``Binomial(r, e^eps / (1 + e^eps))``, the accuracy of
eps-DP randomized response. ``f(v - i) - f(v) = P[v - i <= Binomial < v]``; for ``i >= v``,
``f(v - i) = 1`` so the ratio is at most its value at ``i = v``, hence the maximum over
``{1,...,m}`` equals the maximum over ``{1,...,v}`` (this is how the paper's own reference code
evaluates it, and how :func:`p_value_bound` does).

:func:`epsilon_lower_bound` turns the bound into the audit's answer: at confidence ``c`` it returns
the largest epsilon whose bound on ``P[W >= v]`` is ``<= 1 - c`` (every such epsilon, and every
smaller one, is rejected: an (eps', delta)-DP mechanism with ``eps' <= eps`` is also
(eps, delta)-DP). Read the result as *evidence*, not proof: "if the mechanism were
(eps, delta)-DP for any eps at or below this number, seeing ``v`` or more correct guesses would
have had probability at most ``1 - c``". It is a statistical lower bound on the true epsilon, wrong
with probability at most ``1 - c``, and it says nothing about an upper bound; a weak attack gives a
small number for a leaky mechanism. The guarantee needs:

* canaries included by independent fair coins that the scorer does not see;
* ``k`` (hence ``r``), ``delta`` and the confidence fixed before the scores are looked at; picking
  the ``k`` that maximises the result over several tries is multiple testing and voids the
  confidence level;
* the (eps, delta) being audited to be with respect to one canary's inclusion.

Everything here is maths on integers and floats (numpy only; binomial probabilities are computed
exactly in log space).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["membership_auc", "AuditResult", "p_value_bound", "epsilon_lower_bound", "guess", "audit", "EPSILON_CAP"]

EPSILON_CAP = 100.0
"""Upper end of the search for epsilon. Never binding in practice: at eps = 100 the randomized-response
accuracy is 1 - 4e-44, so no finite audit can reject it."""

_TOLERANCE = 1e-12  # bisection stops when the bracket is this narrow (absolute, in epsilon)
_GRID_POINTS = 2001  # grid on [0, EPSILON_CAP] used when the bound need not be monotone (2 m delta > 1)


@dataclass(frozen=True)
class AuditResult:
    """The outcome of one one-run audit (see the module docstring for what it means).

    ``epsilon_lower_bound`` is evidence, not proof: with probability at least ``confidence`` over
    the canaries' random inclusion, the audited mechanism is not (eps, ``delta``)-DP for any eps
    below it. ``0.0`` means the audit found no evidence against any epsilon.
    """

    canaries: int  # m: canaries, each included independently with probability 1/2
    guesses: int  # r: guesses made (2k), the rest abstained
    correct: int  # v: guesses that matched the canary's inclusion
    confidence: float
    delta: float
    epsilon_lower_bound: float


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if not _is_int(x):
            raise ValueError(f"{name} must be an integer count, got {x!r}; pass an int")
    if m < 1:
        raise ValueError(f"m (number of canaries) must be >= 1, got {m}; audit at least one canary")
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"counts must satisfy 0 <= v <= r <= m, got m={m}, r={r}, v={v}; "
            "v is correct guesses out of r guesses on m canaries"
        )


def _check_delta(delta: float) -> None:
    if not isinstance(delta, numbers.Real) or not 0.0 <= float(delta) < 1.0:
        raise ValueError(f"delta must be a number with 0 <= delta < 1, got {delta!r}; use e.g. 1e-5, or 0 for pure DP")


def _check_confidence(confidence: float) -> None:
    if not isinstance(confidence, numbers.Real) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}; use e.g. 0.95")


@functools.lru_cache(maxsize=64)
def _log_binomial_coefficients(r: int) -> np.ndarray:
    """``log C(r, j)`` for ``j = 0..r`` (read-only, cached per ``r``)."""
    log_factorial = np.array([math.lgamma(j + 1) for j in range(r + 1)])
    out = log_factorial[r] - log_factorial - log_factorial[::-1]
    out.setflags(write=False)
    return out


def _binomial_pmf(r: int, epsilon: float) -> np.ndarray:
    """``P[Binomial(r, q) = j]`` for ``j = 0..r``, ``q = e^eps / (1 + e^eps)``, computed in log space.

    ``log q = -log(1 + e^-eps)`` and ``log(1 - q) = -eps - log(1 + e^-eps)`` stay exact where ``q``
    itself would round to 1.
    """
    log1p_exp_neg = math.log1p(math.exp(-epsilon))
    log_q = -log1p_exp_neg
    log_1mq = -epsilon - log1p_exp_neg
    j = np.arange(r + 1, dtype=float)
    return np.exp(_log_binomial_coefficients(r) + j * log_q + (r - j) * log_1mq)


def _p_value_bound(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    if v <= 0:
        return 1.0  # W >= 0 always happens
    pmf = _binomial_pmf(r, epsilon)
    f_v = float(np.sum(pmf[v:]))  # f(v) = P[Binomial(r, q) >= v]
    if delta > 0.0:
        # f(v - i) - f(v) = P[v - i <= Binomial < v] = pmf[v-1] + ... + pmf[v-i], for i = 1..v.
        windows = np.cumsum(pmf[:v][::-1])
        ratio = float(np.max(windows / np.arange(1, v + 1)))
        f_v += 2.0 * m * delta * ratio
    return min(f_v, 1.0)


def p_value_bound(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """Upper bound on ``P[W >= v]`` for any (epsilon, delta)-DP mechanism (Theorem 5.2 of the paper).

    ``W`` is the number of correct guesses when ``r`` guesses are made about ``m`` canaries, each
    included independently with probability 1/2. Returns::

        min(1, f(v) + 2 m delta * max_{i=1..v} (f(v - i) - f(v)) / i),
        f(x) = P[Binomial(r, e^eps / (1 + e^eps)) >= x]

    (``f(v)`` alone when ``delta == 0``). If this is small, seeing ``v`` correct guesses is evidence
    that the mechanism is not (epsilon, delta)-DP; it is a p-value for that hypothesis.
    """
    if not isinstance(epsilon, numbers.Real) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    _check_delta(delta)
    _check_counts(m, r, v)
    return _p_value_bound(float(epsilon), float(delta), int(m), int(r), int(v))


def _largest_rejected(bound, alpha: float, lo: float, hi: float) -> float:
    """Bisection keeping ``bound(lo) <= alpha < bound(hi)``; returns the final ``lo``."""
    for _ in range(200):
        if hi - lo <= _TOLERANCE:
            break
        mid = 0.5 * (lo + hi)
        if bound(mid) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


@functools.lru_cache(maxsize=4096)
def _epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    alpha = 1.0 - confidence

    def bound(eps: float) -> float:
        return _p_value_bound(eps, delta, m, r, v)

    if 2.0 * m * delta <= 1.0:
        # Then each term f(v) + 2 m delta (f(v-i) - f(v))/i = (1 - 2 m delta/i) f(v) + (2 m delta/i) f(v-i)
        # has non-negative weights on binomial tails that grow with eps, so the bound is
        # non-decreasing in eps and plain bisection finds the largest rejected eps.
        if bound(0.0) > alpha:
            return 0.0
        if bound(EPSILON_CAP) <= alpha:
            return EPSILON_CAP
        return _largest_rejected(bound, alpha, 0.0, EPSILON_CAP)
    # 2 m delta > 1: a term can put negative weight on f(v), so the bound need not be monotone in eps.
    # Any eps whose bound is <= alpha is rejected together with every smaller eps (an (eps', delta)-DP
    # mechanism with eps' <= eps is also (eps, delta)-DP), so look for the last grid point rejected
    # and refine above it. A dip narrower than the grid step can be missed: that only makes the
    # answer smaller, never invalid.
    grid = np.linspace(0.0, EPSILON_CAP, _GRID_POINTS)
    rejected = [i for i, eps in enumerate(grid) if bound(float(eps)) <= alpha]
    if not rejected:
        return 0.0
    last = rejected[-1]
    if last == len(grid) - 1:
        return EPSILON_CAP
    return _largest_rejected(bound, alpha, float(grid[last]), float(grid[last + 1]))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct out of ``r`` guesses on ``m`` canaries rejects.

    That is the largest eps in ``[0, EPSILON_CAP]`` with ``p_value_bound(eps, delta, m, r, v) <= 1 -
    confidence`` (found by bisection to within 1e-12; the bound is non-decreasing in eps whenever
    ``2 m delta <= 1``, otherwise a grid search brackets it first). Returns ``0.0`` when even eps = 0
    cannot be rejected, e.g. whenever ``v <= r/2`` at confidence >= 1/2.

    Evidence, not proof: with probability at least ``confidence`` (over the canaries' coin flips)
    the mechanism is not (eps, delta)-DP for any eps below the result. It is not an estimate of the
    true epsilon, which may be much larger.
    """
    _check_counts(m, r, v)
    _check_delta(delta)
    _check_confidence(confidence)
    return _epsilon_lower_bound(int(m), int(r), int(v), float(delta), float(confidence))


def _as_scores(scores: Sequence[float]) -> np.ndarray:
    try:
        arr = np.asarray(scores, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores must be a sequence of numbers ({exc}); pass one float per canary") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D sequence, got shape {arr.shape}; pass one float per canary")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"scores must be finite, got {arr[bad[0]]} at index {int(bad[0])} ({bad.size} non-finite in all); "
            "replace NaN/inf scores before auditing"
        )
    return arr


def _check_k(k: int, m: int) -> None:
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}; it is the number of 'in' (and of 'out') guesses")
    if 2 * k > m:
        raise ValueError(f"2k must be <= the number of canaries, got k={k} with {m} canaries; use k <= {m // 2}")


def guess(scores: Sequence[float], k: int) -> list[int]:
    """Guesses from scores: +1 ("in") for the ``k`` highest, -1 ("out") for the ``k`` lowest, 0 otherwise.

    Canaries are ranked by ``(score, index)``: among equal scores the later index ranks higher.
    This one total order keeps the two groups disjoint and makes the result deterministic.
    Raises ``ValueError`` unless ``1 <= k`` and ``2k <= len(scores)`` and every score is finite.
    """
    arr = _as_scores(scores)
    _check_k(k, arr.size)
    order = np.argsort(arr, kind="stable")  # ascending score; equal scores keep index order
    out = np.zeros(arr.size, dtype=int)
    out[order[:k]] = -1
    out[order[arr.size - k :]] = 1
    return out.tolist()


def _as_included(included: Sequence[bool], m: int) -> np.ndarray:
    arr = np.asarray(included)
    if arr.ndim != 1 or arr.size != m:
        raise ValueError(f"included must have one entry per canary ({m}), got shape {arr.shape}; pass a bool per score")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.integer) and np.all((arr == 0) | (arr == 1)):
        return arr.astype(bool)
    raise ValueError(f"included must hold booleans (or 0/1), got dtype {arr.dtype}; pass True for canaries trained on")


def audit(
    scores: Sequence[float],
    included: Sequence[bool],
    k: int,
    delta: float,
    confidence: float = 0.95,
) -> AuditResult:
    """Run the one-run audit: guess with :func:`guess`, count correct guesses, bound epsilon.

    ``scores[i]`` is the auditor's score for canary ``i`` (higher = more likely trained on),
    computed without looking at ``included``; ``included[i]`` says whether canary ``i`` was actually
    in training (each decided by an independent fair coin before training). ``k``, ``delta`` and
    ``confidence`` must be fixed in advance. See :class:`AuditResult` for how to read the result.
    """
    arr = _as_scores(scores)
    m = int(arr.size)
    inc = _as_included(included, m)
    _check_k(k, m)
    _check_delta(delta)
    _check_confidence(confidence)
    guesses = np.asarray(guess(arr, k))
    truth = np.where(inc, 1, -1)
    r = 2 * int(k)
    v = int(np.sum(guesses == truth))  # abstentions (0) never equal +-1
    return AuditResult(
        canaries=m,
        guesses=r,
        correct=v,
        confidence=float(confidence),
        delta=float(delta),
        epsilon_lower_bound=epsilon_lower_bound(m, r, v, float(delta), float(confidence)),
    )


def membership_auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """The AUC of a score that should be higher for members: P(member > non-member), ties counting ½.

    The Mann-Whitney statistic over every (member, non-member) pair; 0.5 is chance. It is
    context for the audit, not a bound: an attack that fails says nothing about a better one.
    """
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError("membership_auc needs at least one member and one non-member score")
    a, b = _as_scores(members), _as_scores(non_members)
    pooled = np.concatenate([a, b])
    order = np.argsort(pooled, kind="mergesort")
    ranks = np.empty(pooled.size, dtype=np.float64)
    sorted_vals = pooled[order]
    # average ranks over ties (1-based)
    start = 0
    while start < pooled.size:
        end = start
        while end + 1 < pooled.size and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))
