"""The one-run audit bound (privacy/empirical_bound.py): hand-worked values, monotonicity, validity, guessing.

Theorem 5.2 of Steinke, Nasr and Jagielski (NeurIPS 2023): for an (eps, delta)-DP mechanism,
``P[W >= v] <= f(v) + 2 m delta max_i (f(v-i) - f(v))/i`` with
``f(x) = P[Binomial(r, q) >= x]`` and ``q = e^eps / (1 + e^eps)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from privacy.empirical_bound import (
    EPSILON_CAP,
    AuditResult,
    audit,
    epsilon_lower_bound,
    guess,
    p_value_bound,
)


def _logit(q: float) -> float:
    return math.log(q / (1.0 - q))


def _bisect_q(poly, target: float) -> float:
    """Largest q in [1/2, 1] with poly(q) <= target, for a poly increasing on [1/2, 1]."""
    lo, hi = 0.5, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if poly(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


# --- hand-worked values --------------------------------------------------------------------------


def test_all_ten_guesses_right_pure_dp():
    # delta = 0, r = v = 10: P[W >= 10] <= f(10) = q^10.
    # Rejected at 95% while q^10 <= 0.05, i.e. q <= 0.05^(1/10) = exp(ln(0.05)/10) = exp(-0.2995732273553991)
    #   = 0.7411344491069477, 1 - q = 0.2588655508930523, q/(1-q) = 2.8630091819870613,
    # eps = ln(2.8630091819870613) = 1.051873233231709.
    assert epsilon_lower_bound(10, 10, 10, 0.0, 0.95) == pytest.approx(1.051873233231709, abs=1e-9)
    q = 0.05 ** (1 / 10)
    assert epsilon_lower_bound(10, 10, 10, 0.0, 0.95) == pytest.approx(_logit(q), abs=1e-9)
    # m does not matter when delta = 0.
    assert epsilon_lower_bound(1000, 10, 10, 0.0, 0.95) == pytest.approx(1.051873233231709, abs=1e-9)
    # And the p-value itself: at eps = ln 3, q = 3/4, so P <= 0.75^10 = 0.056313514709472656.
    assert p_value_bound(math.log(3), 0.0, 10, 10, 10) == pytest.approx(0.75**10, rel=1e-12)


def test_nine_of_ten_right_pure_dp():
    # delta = 0, r = 10, v = 9: f(9) = C(10,9) q^9 (1-q) + C(10,10) q^10 = 10 q^9 - 9 q^10.
    # At q = 1/2 this is 11/1024 = 0.0107 <= 0.05, so eps = 0 is rejected; the bound is where
    # 10 q^9 - 9 q^10 = 0.05: q = 0.6058366975634951, q/(1-q) = 1.5370195394105426,
    # eps = ln(1.5370195394105426) = 0.4298451771695651.
    def poly(q: float) -> float:
        return 10 * q**9 - 9 * q**10

    assert poly(0.5) == pytest.approx(11 / 1024)
    q = _bisect_q(poly, 0.05)
    assert q == pytest.approx(0.6058366975634951, abs=1e-12)
    assert epsilon_lower_bound(10, 10, 9, 0.0, 0.95) == pytest.approx(_logit(q), abs=1e-9)
    assert epsilon_lower_bound(10, 10, 9, 0.0, 0.95) == pytest.approx(0.4298451771695651, abs=1e-9)


def test_delta_term_by_hand_and_it_lowers_the_bound():
    # m = r = v = 4, delta = 0.01, so 2 m delta = 0.08. With W' ~ Binomial(4, q):
    #   f(4) = q^4
    #   f(3) - f(4) = P[W' = 3]          = 4 q^3 (1-q)
    #   f(2) - f(4) = P[W' in {2, 3}]    = 4 q^3 (1-q) + 6 q^2 (1-q)^2
    #   f(1) - f(4) = P[W' in {1, 2, 3}] = 1 - (1-q)^4 - q^4
    #   f(0) - f(4) = P[W' < 4]          = 1 - q^4
    # bound = q^4 + 0.08 * max(that/1, that/2, that/3, that/4).
    def by_hand(q: float) -> float:
        f4 = q**4
        d1 = 4 * q**3 * (1 - q)
        d2 = 4 * q**3 * (1 - q) + 6 * q**2 * (1 - q) ** 2
        d3 = 1 - (1 - q) ** 4 - q**4
        d4 = 1 - q**4
        return f4 + 0.08 * max(d1 / 1, d2 / 2, d3 / 3, d4 / 4)

    # At eps = 1: q = e/(1+e) = 0.7310585786300049, q^4 = 0.28563321676704573, and the four ratios are
    # 0.42031435265704886, 0.32612593320738303, 0.2363784094600072, 0.17859169580823858 (i = 1 wins):
    # bound = 0.28563321676704573 + 0.08 * 0.42031435265704886 = 0.31925836497960963.
    q1 = math.e / (1 + math.e)
    assert by_hand(q1) == pytest.approx(0.31925836497960963, rel=1e-12)
    assert p_value_bound(1.0, 0.01, 4, 4, 4) == pytest.approx(0.31925836497960963, rel=1e-12)
    assert p_value_bound(1.0, 0.0, 4, 4, 4) == pytest.approx(0.28563321676704573, rel=1e-12)

    # At 80% confidence (reject when bound <= 0.2):
    #   delta = 0:    q^4 = 0.2  ->  q = 0.2^(1/4) = 0.668740304976422, eps = ln(2.01877957090078) = 0.7024931560057722
    #   delta = 0.01: i = 1 wins near the crossing (ratios there: 0.3788, 0.3479, 0.2713, 0.2076), so
    #                 q^4 + 0.08 * 4 q^3 (1-q) = 0.68 q^4 + 0.32 q^3 = 0.2  ->  q = 0.6418270852755023,
    #                 eps = ln(1.7919475730575212) = 0.5833030580184765.
    pure = epsilon_lower_bound(4, 4, 4, 0.0, 0.8)
    approx = epsilon_lower_bound(4, 4, 4, 0.01, 0.8)
    assert pure == pytest.approx(0.7024931560057722, abs=1e-9)
    assert approx == pytest.approx(0.5833030580184765, abs=1e-9)
    assert approx == pytest.approx(_logit(_bisect_q(by_hand, 0.2)), abs=1e-9)
    assert approx < pure


def test_matches_scipy_binomial_and_the_theorem_maximum_over_all_i():
    stats = pytest.importorskip("scipy.stats")
    for eps, delta, m, r, v in [
        (0.0, 0.0, 50, 20, 12),
        (0.7, 0.0, 100, 60, 45),
        (2.0, 1e-4, 300, 200, 170),
        (0.3, 1e-3, 40, 40, 25),
    ]:
        q = math.exp(eps) / (1 + math.exp(eps))

        def f(x: int, r=r, q=q) -> float:
            return float(stats.binom.sf(x - 1, r, q))  # P[Binomial(r, q) >= x]

        # The theorem's maximum runs over i = 1..m (f(x) = 1 for x <= 0).
        expected = f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, m + 1))
        assert p_value_bound(eps, delta, m, r, v) == pytest.approx(min(expected, 1.0), rel=1e-9, abs=1e-14)


def test_extreme_values_stay_exact():
    # Tiny tails are computed in log space: at eps = 0 (q = 1/2), P[W >= 1000 of 1000] = 2^-1000 = 9.33e-302.
    assert p_value_bound(0.0, 0.0, 1000, 1000, 1000) == pytest.approx(2.0**-1000, rel=1e-9)
    # At eps = 50, q = 1/(1 + e^-50) rounds to 1.0: W >= v is then certain to double precision.
    assert p_value_bound(50.0, 0.0, 10, 10, 10) == pytest.approx(1.0)
    assert p_value_bound(50.0, 0.0, 10, 10, 0) == 1.0
    # 100/100 at 99.9999% confidence: q^100 = 1e-6, q = 1e-6^(1/100) = 0.87096, eps = 1.9095, far under the cap.
    q = 1e-6 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 100, 0.0, 0.999999) == pytest.approx(_logit(q), abs=1e-9)
    assert _logit(q) < 2 < EPSILON_CAP


# --- monotonicity --------------------------------------------------------------------------------


def test_more_correct_guesses_give_a_larger_bound():
    for delta in (0.0, 1e-5, 1e-3):
        bounds = [epsilon_lower_bound(200, 100, v, delta) for v in range(101)]
        assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
        positive = [b for b in bounds if b > 0]
        assert len(positive) > 30  # v from about 59 up
        assert all(a < b for a, b in zip(positive, positive[1:], strict=False))


def test_larger_delta_gives_a_smaller_or_equal_bound():
    for v in (60, 75, 90, 100):
        bounds = [epsilon_lower_bound(200, 100, v, d) for d in (0.0, 1e-7, 1e-5, 1e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)]
        assert all(a >= b for a, b in zip(bounds, bounds[1:], strict=False))
    # and the delta term really costs something here
    assert epsilon_lower_bound(200, 100, 90, 1e-3) < epsilon_lower_bound(200, 100, 90, 0.0)


def test_higher_confidence_gives_a_smaller_or_equal_bound():
    for delta in (0.0, 1e-5):
        bounds = [epsilon_lower_bound(200, 100, 85, delta, c) for c in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)]
        assert all(a > b for a, b in zip(bounds, bounds[1:], strict=False))


def test_at_most_half_right_gives_zero():
    for r in (1, 2, 10, 101, 400):
        for v in range(r // 2 + 1):
            assert epsilon_lower_bound(max(r, 1000), r, v, 0.0) == 0.0
            assert epsilon_lower_bound(max(r, 1000), r, v, 1e-5) == 0.0
    assert epsilon_lower_bound(5, 0, 0, 0.0) == 0.0  # no guesses, no evidence


def test_non_monotone_regime_still_returns_a_rejected_supremum():
    # 2 m delta = 2 > 1: the bound need not be monotone in eps, so a grid search brackets the answer.
    m, r, v, delta, conf = 1000, 1000, 990, 1e-3, 0.95
    lb = epsilon_lower_bound(m, r, v, delta, conf)
    assert 0 < lb < epsilon_lower_bound(m, r, v, 1 / (2 * m), conf)
    assert p_value_bound(lb, delta, m, r, v) <= 1 - conf
    assert all(p_value_bound(float(e), delta, m, r, v) > 1 - conf for e in np.linspace(lb + 1e-6, 30, 600))


# --- validity by simulation ----------------------------------------------------------------------


def test_exact_eps_dp_randomized_response_is_not_over_claimed():
    # Each canary's observed bit is S_i, flipped with probability 1/(1+e^eps): exactly eps-DP per canary.
    # Scores = observed bit + jitter independent of S (post-processing). The audit must claim a bound
    # above the true eps in at most ~5% of trials.
    eps_true, m, k, trials = 1.0, 200, 50, 2000
    rng = np.random.default_rng(20230515)
    included = rng.random((trials, m)) < 0.5
    flipped = rng.random((trials, m)) < 1.0 / (1.0 + math.exp(eps_true))
    observed = np.where(included ^ flipped, 1.0, -1.0)
    scores = observed + 0.5 * rng.random((trials, m))

    results = [audit(scores[t], included[t], k, delta=0.0, confidence=0.95) for t in range(trials)]
    bounds = np.array([res.epsilon_lower_bound for res in results])
    over = int(np.sum(bounds > eps_true))
    slack = 4 * math.sqrt(trials * 0.05 * 0.95)
    assert over <= 0.05 * trials + slack, f"{over} of {trials} trials claimed more than the true eps"
    assert 0.3 < float(np.median(bounds)) < eps_true  # not vacuous either
    assert {res.guesses for res in results} == {2 * k}

    # Exact version: W ~ Binomial(100, q_true) here, and the trials that over-claim are those with
    # v >= v*, the first v whose bound exceeds eps_true. That tail must be <= 5%, with and without delta.
    stats = pytest.importorskip("scipy.stats")
    q_true = math.exp(eps_true) / (1 + math.exp(eps_true))
    for delta in (0.0, 1e-4):
        v_star = next(v for v in range(101) if epsilon_lower_bound(m, 2 * k, v, delta) > eps_true)
        assert float(stats.binom.sf(v_star - 1, 2 * k, q_true)) <= 0.05
        assert float(stats.binom.sf(v_star - 2, 2 * k, q_true)) > 0.0  # v* is not trivially out of reach


# --- guess() and audit() -------------------------------------------------------------------------


def test_guess_marks_the_k_highest_in_and_the_k_lowest_out():
    assert guess([0.1, 0.9, 0.5, 0.3], 1) == [-1, 1, 0, 0]
    assert guess([0.1, 0.9, 0.5, 0.3, 0.7], 2) == [-1, 1, 0, -1, 1]
    assert guess([3.0, 1.0, 2.0, 0.0], 2) == [1, -1, 1, -1]  # 2k = m: no abstentions
    assert guess(np.array([2.0, -1.0, 5.0]), 1) == [0, -1, 1]


def test_guess_breaks_ties_by_index():
    # Ranked by (score, index): among equal scores the later index ranks higher.
    assert guess([1.0, 1.0, 1.0, 1.0], 1) == [-1, 0, 0, 1]
    assert guess([1.0, 1.0, 1.0, 1.0], 2) == [-1, -1, 1, 1]
    assert guess([0.0, 5.0, 5.0, 0.0], 1) == [-1, 0, 1, 0]
    assert guess([7.0, 7.0], 1) == [-1, 1]


@pytest.mark.parametrize(
    ("scores", "k", "match"),
    [
        ([1.0, 2.0, 3.0], 2, "2k must be <="),
        ([1.0, 2.0], 0, "k must be an integer >= 1"),
        ([1.0, 2.0], 1.0, "k must be an integer >= 1"),
        ([1.0, 2.0], True, "k must be an integer >= 1"),
        ([1.0, float("nan"), 3.0, 4.0], 1, "scores must be finite"),
        ([1.0, 2.0, float("inf"), 4.0], 1, "scores must be finite"),
        ([], 1, "non-empty 1-D"),
        ([[1.0, 2.0], [3.0, 4.0]], 1, "non-empty 1-D"),
        (["a", "b"], 1, "sequence of numbers"),
    ],
)
def test_guess_rejects_bad_input(scores, k, match):
    with pytest.raises(ValueError, match=match):
        guess(scores, k)


def test_audit_counts_correct_guesses():
    included = [True, False] * 50
    perfect = audit([1.0 if x else 0.0 for x in included], included, k=50, delta=1e-5)
    assert perfect == AuditResult(
        canaries=100,
        guesses=100,
        correct=100,
        confidence=0.95,
        delta=1e-5,
        epsilon_lower_bound=epsilon_lower_bound(100, 100, 100, 1e-5),
    )
    assert perfect.epsilon_lower_bound > 2.0

    backwards = audit([0.0 if x else 1.0 for x in included], included, k=10, delta=0.0)
    assert (backwards.guesses, backwards.correct, backwards.epsilon_lower_bound) == (20, 0, 0.0)

    # 6 canaries, k = 2: in-guesses at scores 0.9, 0.8 (indices 0, 4), out-guesses at 0.1, 0.2 (indices 1, 5).
    scores = [0.9, 0.1, 0.5, 0.6, 0.8, 0.2]
    inc = np.array([1, 0, 1, 0, 0, 1])  # 0/1 accepted; index 4 and index 5 are wrong guesses
    res = audit(scores, inc, k=2, delta=0.0, confidence=0.9)
    assert (res.canaries, res.guesses, res.correct, res.confidence) == (6, 4, 2, 0.9)
    assert res.epsilon_lower_bound == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"included": [True, False, True]}, "one entry per canary"),
        ({"included": [0.5, 1.0, 0.0, 1.0]}, "booleans"),
        ({"included": [2, 1, 0, 1]}, "booleans"),
        ({"delta": 1.0}, "0 <= delta < 1"),
        ({"delta": -1e-9}, "0 <= delta < 1"),
        ({"confidence": 1.0}, "strictly between 0 and 1"),
        ({"confidence": 0.0}, "strictly between 0 and 1"),
        ({"k": 3}, "2k must be <="),
        ({"scores": [1.0, float("nan"), 0.0, 1.0]}, "finite"),
    ],
)
def test_audit_rejects_bad_input(kwargs, match):
    args = {"scores": [0.3, 0.1, 0.4, 0.2], "included": [True, False, True, False], "k": 1, "delta": 0.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        audit(**args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0, 0, 0.0), "m \\(number of canaries\\) must be >= 1"),
        ((10, 11, 5, 0.0), "0 <= v <= r <= m"),
        ((10, 5, 6, 0.0), "0 <= v <= r <= m"),
        ((10, 5, -1, 0.0), "0 <= v <= r <= m"),
        ((10, 5.0, 3, 0.0), "r must be an integer"),
        ((10, 5, 3, 1.0), "0 <= delta < 1"),
        ((10, 5, 3, float("nan")), "0 <= delta < 1"),
    ],
)
def test_bound_rejects_bad_counts_and_delta(args, match):
    with pytest.raises(ValueError, match=match):
        epsilon_lower_bound(*args)
    with pytest.raises(ValueError, match=match):
        p_value_bound(1.0, args[3], *args[:3])


def test_bound_rejects_bad_confidence_and_epsilon():
    for confidence in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="confidence must be strictly between 0 and 1"):
            epsilon_lower_bound(10, 10, 10, 0.0, confidence)
    for eps in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
            p_value_bound(eps, 0.0, 10, 10, 10)


# ---- membership_auc: the context figure beside the bound ----------------------------------------


def test_membership_auc_by_hand():
    from privacy.empirical_bound import membership_auc

    assert membership_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert membership_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert membership_auc([1.0], [1.0]) == 0.5  # a tie counts one half
    # pairs (member > non-member): 2>1 yes, 2>3 no, 5>1 yes, 5>3 yes -> 3 of 4
    assert membership_auc([2.0, 5.0], [1.0, 3.0]) == 0.75
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        membership_auc([], [1.0])
