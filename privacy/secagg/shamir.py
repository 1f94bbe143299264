"""Shamir secret sharing of byte strings over the prime field GF(2**127 - 1).

A secret of any length is cut into 15-byte chunks (120 bits < 127 bits, so every chunk is a
field element); each chunk gets its own random polynomial of degree ``threshold - 1`` with the
chunk as constant term. A share for holder ``x`` is::

    2-byte big-endian secret length || for each chunk: f_chunk(x) as 16 bytes big-endian

Any ``threshold`` shares give back the secret by Lagrange interpolation at 0; fewer than
``threshold`` shares are uniformly distributed whatever the secret (perfect secrecy), because
for every candidate secret exactly one polynomial of degree ``threshold - 1`` passes through
them. Holder coordinates are small positive integers (the protocol's node indices).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence

__all__ = ["PRIME", "CHUNK_BYTES", "split_secret", "combine_shares", "share_length"]

PRIME = 2**127 - 1  # a Mersenne prime
CHUNK_BYTES = 15
_ELEM_BYTES = 16
_LEN_BYTES = 2


def _chunks(secret: bytes) -> list[int]:
    return [int.from_bytes(secret[i : i + CHUNK_BYTES], "big") for i in range(0, len(secret), CHUNK_BYTES)]


def share_length(secret_length: int) -> int:
    """Length in bytes of one share of a ``secret_length``-byte secret."""
    return _LEN_BYTES + _ELEM_BYTES * -(-secret_length // CHUNK_BYTES)


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("holder coordinates must be distinct")
    if any(not 0 < x < PRIME for x in xs):
        raise ValueError("holder coordinates must lie in 1..PRIME-1")


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> list[bytes]:
    """Split ``secret`` into one share per holder coordinate in ``xs``; any ``threshold`` recombine.

    Parameters
    ----------
    secret : bytes
        At most 65535 bytes.
    threshold : int
        Number of shares needed to reconstruct, ``1 <= threshold <= len(xs)``.
    xs : Sequence[int]
        Distinct holder coordinates in ``1..PRIME-1``.

    Returns
    -------
    list[bytes]
        ``shares[i]`` belongs to holder ``xs[i]``.
    """
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must satisfy 1 <= threshold <= number of holders, got {threshold}/{len(xs)}")
    if len(secret) >= 2**16:
        raise ValueError("secret longer than 65535 bytes")
    _check_xs(xs)
    header = len(secret).to_bytes(_LEN_BYTES, "big")
    out = [bytearray(header) for _ in xs]
    for chunk in _chunks(secret):
        coeffs = [chunk] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
        for share, x in zip(out, xs, strict=True):
            y = 0
            for c in reversed(coeffs):  # Horner, reduced once at the end: x is small, so y stays short
                y = y * x + c
            share += (y % PRIME).to_bytes(_ELEM_BYTES, "big")
    return [bytes(s) for s in out]


@functools.lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i) for any polynomial of degree < len(xs)."""
    coeffs = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num *= xj
                den *= xj - xi
        coeffs.append(num * pow(den % PRIME, -1, PRIME) % PRIME)
    return tuple(coeffs)


def combine_shares(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Reconstruct a secret from at least ``threshold`` shares ``{holder coordinate: share}``.

    Raises
    ------
    ValueError
        If fewer than ``threshold`` shares are given or they are malformed or inconsistent.
    """
    if threshold < 1 or len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    xs = tuple(sorted(shares)[:threshold])
    _check_xs(xs)
    blobs = [shares[x] for x in xs]
    secret_length = int.from_bytes(blobs[0][:_LEN_BYTES], "big")
    n_bytes = share_length(secret_length)
    if any(len(b) != n_bytes or b[:_LEN_BYTES] != blobs[0][:_LEN_BYTES] for b in blobs):
        raise ValueError("shares have inconsistent lengths")
    lagrange = _lagrange_at_zero(xs)
    out = bytearray()
    n_chunks = (n_bytes - _LEN_BYTES) // _ELEM_BYTES
    for k in range(n_chunks):
        lo = _LEN_BYTES + k * _ELEM_BYTES
        value = sum(
            lam * int.from_bytes(b[lo : lo + _ELEM_BYTES], "big") for lam, b in zip(lagrange, blobs, strict=True)
        )
        value %= PRIME
        size = min(CHUNK_BYTES, secret_length - k * CHUNK_BYTES)
        if value >= 2 ** (8 * size):
            raise ValueError("shares are inconsistent (reconstructed chunk out of range)")
        out += value.to_bytes(size, "big")
    return bytes(out)
