"""Quantisation, modulus sizing and the error bound (privacy/secagg/encoding.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from privacy.secagg.encoding import EncodingParams, decode, encode, modulus_bits, quantisation_error_bound


def test_modulus_is_the_smallest_word_that_cannot_overflow() -> None:
    assert modulus_bits(50, 1000, 16) == 32  # 50 * 1000 * 65535 = 3.3e9 < 2**32
    assert modulus_bits(100, 1000, 16) == 64
    assert EncodingParams(1.0, 16, 1000, 50).dtype == np.uint32
    assert EncodingParams(1.0, 16, 1000, 100).dtype == np.uint64


def test_overflowing_configuration_is_refused_naming_the_constraint() -> None:
    with pytest.raises(ValueError, match=r"max_nodes \* max_weight \* \(2\*\*bits - 1\) must be < 2\*\*64"):
        EncodingParams(clip_range=1.0, bits=32, max_weight=2**31, max_nodes=2**2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_range": 0.0}, "clip_range"),
        ({"clip_range": float("inf")}, "clip_range"),
        ({"bits": 0}, "bits"),
        ({"bits": 33}, "bits"),
        ({"max_weight": 0}, "max_weight"),
        ({"max_nodes": 1}, "max_nodes"),
    ],
)
def test_parameters_are_validated(kwargs: dict, match: str) -> None:
    base = {"clip_range": 1.0, "bits": 16, "max_weight": 10, "max_nodes": 10}
    with pytest.raises(ValueError, match=match):
        EncodingParams(**(base | kwargs))


def test_error_bound_is_half_a_step() -> None:
    p = EncodingParams(clip_range=2.0, bits=8, max_weight=10, max_nodes=10)

    assert quantisation_error_bound(2.0, 8) == pytest.approx(2.0 / 255)
    assert p.error_bound == pytest.approx(p.step / 2)


def test_encoding_layout_and_extremes() -> None:
    p = EncodingParams(clip_range=1.0, bits=4, max_weight=10, max_nodes=10)

    x = encode(np.array([-1.0, 0.0, 1.0, -5.0, 5.0]), 3, p)

    assert x.dtype == np.uint32
    assert x.tolist() == [0, 3 * 8, 3 * 15, 0, 3 * 15, 3]  # q = rint((d + 1) * 7.5); clipped; weight last


def test_weights_are_rounded_and_capped() -> None:
    p = EncodingParams(clip_range=1.0, bits=8, max_weight=100, max_nodes=10)

    assert p.cap_weight(7.4) == 7
    assert p.cap_weight(1e6) == 100
    with pytest.raises(ValueError):
        p.cap_weight(-1)
    with pytest.raises(ValueError):
        p.cap_weight(float("nan"))
    with pytest.raises(ValueError, match="weight"):
        encode(np.zeros(3), 101, p)


def test_non_finite_updates_and_zero_total_weight_are_refused() -> None:
    p = EncodingParams(clip_range=1.0, bits=8, max_weight=100, max_nodes=10)

    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([0.0, np.nan]), 1, p)
    with pytest.raises(ValueError, match="total weight"):
        decode(encode(np.zeros(3), 0, p), p)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 24),
    clip=st.floats(1e-3, 10.0),
    deltas=st.lists(arrays(np.float64, 20, elements=st.floats(-20, 20)), min_size=1, max_size=6),
    data=st.data(),
)
def test_decoded_weighted_mean_is_within_the_bound(
    bits: int, clip: float, deltas: list[np.ndarray], data: st.DataObject
) -> None:
    p = EncodingParams(clip_range=clip, bits=bits, max_weight=1000, max_nodes=8)
    weights = data.draw(st.lists(st.integers(1, 1000), min_size=len(deltas), max_size=len(deltas)))
    total = sum((encode(d, w, p) for d, w in zip(deltas, weights, strict=True)), np.zeros(21, p.dtype))

    mean, w_total = decode(total, p)

    plain = sum(w * np.clip(d, -clip, clip) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
    assert w_total == sum(weights)
    assert np.max(np.abs(mean - plain)) <= p.error_bound * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("shape", [(300,), (20, 15)])
def test_overwrite_encodes_identically_and_leaves_other_inputs_alone(shape: tuple[int, ...]) -> None:
    params = EncodingParams(clip_range=0.5, bits=16, max_weight=1000, max_nodes=50)
    delta = np.random.default_rng(3).normal(0, 0.3, size=shape)  # some coordinates clipped
    keep = delta.copy()

    want = encode(delta, 7, params)
    assert np.array_equal(delta, keep)  # the default never touches the input
    float32 = delta.astype(np.float32)
    assert np.array_equal(encode(float32, 7, params, overwrite=True), encode(float32.astype(np.float64), 7, params))
    assert np.array_equal(float32, keep.astype(np.float32))  # not float64: converted, so not overwritten

    assert np.array_equal(encode(delta, 7, params, overwrite=True), want)
