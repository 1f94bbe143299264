"""Shamir sharing over GF(2**127 - 1): reconstruction, and secrecy below the threshold."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from privacy.secagg.shamir import PRIME, combine_shares, share_length, split_secret


@pytest.mark.parametrize("length", [0, 1, 14, 15, 16, 32, 100])
def test_round_trip_for_secret_lengths(length: int) -> None:
    secret = os.urandom(length)
    xs = [1, 2, 3, 4, 5]

    shares = split_secret(secret, 3, xs)

    assert all(len(s) == share_length(length) for s in shares)
    assert combine_shares(dict(zip(xs, shares, strict=True)), 3) == secret


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=0, max_size=40),
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_any_threshold_subset_reconstructs(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(min_value=1, max_value=n))
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    shares = dict(zip(xs, split_secret(secret, t, xs), strict=True))
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))

    assert combine_shares({x: shares[x] for x in subset}, t) == secret


def test_fewer_than_threshold_shares_are_refused_or_wrong() -> None:
    secret = os.urandom(32)
    xs = list(range(1, 8))
    shares = dict(zip(xs, split_secret(secret, 4, xs), strict=True))
    three = {x: shares[x] for x in xs[:3]}

    with pytest.raises(ValueError, match="need 4 shares"):
        combine_shares(three, 4)
    try:  # interpolating too low a degree gives garbage, usually caught as out of range
        wrong = combine_shares(three, 3)
    except ValueError:
        wrong = None
    assert wrong != secret


def _lagrange_at_zero(xs: list[int]) -> list[int]:
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num, den = num * xj, den * (xj - xi)
        out.append(num * pow(den % PRIME, -1, PRIME) % PRIME)
    return out


def test_threshold_minus_one_shares_are_consistent_with_every_secret() -> None:
    # Perfect secrecy, constructively: whatever secret B we guess, one more share value makes
    # the t - 1 real shares reconstruct to B. So t - 1 shares cannot rule out any secret.
    t, xs = 4, [3, 5, 8, 13]
    secret = b"\x42" * 15  # one chunk, to keep the algebra visible
    shares = dict(zip(xs, split_secret(secret, t, xs), strict=True))
    known = xs[:3]
    lam = _lagrange_at_zero(xs)
    ys = [int.from_bytes(shares[x][2:], "big") for x in known]

    for guess in [b"\x00" * 15, b"\xff" * 15, os.urandom(15)]:
        target = int.from_bytes(guess, "big")
        partial = sum(lam_i * y for lam_i, y in zip(lam[:3], ys, strict=True)) % PRIME
        forged_y = (target - partial) * pow(lam[3], -1, PRIME) % PRIME
        forged = {x: shares[x] for x in known}
        forged[xs[3]] = shares[xs[3]][:2] + forged_y.to_bytes(16, "big")

        assert combine_shares(forged, t) == guess


def test_below_threshold_shares_are_uniform_whatever_the_secret() -> None:
    # 2 of 3 shares of an all-zero and of an all-one secret: the share values are uniform mod
    # PRIME in both cases (top 4 bits of a 127-bit element -> 8 bins; chi-square).
    xs = [1, 2, 3]
    for secret in [bytes(15), b"\xff" * 15]:
        tops = []
        for _ in range(4000):
            s = split_secret(secret, 3, xs)
            for share in s[:2]:
                tops.append(int.from_bytes(share[2:], "big") >> 123)
        counts = np.bincount(tops, minlength=16)[:16]
        assert chisquare(counts).pvalue > 1e-6


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="threshold"):
        split_secret(b"x", 4, [1, 2, 3])
    with pytest.raises(ValueError, match="threshold"):
        split_secret(b"x", 0, [1, 2, 3])
    with pytest.raises(ValueError, match="distinct"):
        split_secret(b"x", 2, [1, 1, 2])
    with pytest.raises(ValueError, match="1..PRIME-1"):
        split_secret(b"x", 2, [0, 1])
    shares = split_secret(b"abc", 2, [1, 2])
    with pytest.raises(ValueError, match="inconsistent"):
        combine_shares({1: shares[0], 2: shares[1][:-1]}, 2)
