"""Client-level DP: a node's contribution is clipped, the sum is noised, rounds are accounted."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from privacy.accounting import epsilon
from privacy.client_dp import ClientDPConfig, add_noise_to_sum, client_level_epsilon, clip_update, update_norm

_floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(
    a=arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 4)), elements=_floats),
    b=arrays(np.float32, st.integers(1, 7), elements=_floats),
    max_norm=st.floats(1e-3, 1e3),
)
def test_a_clipped_update_never_exceeds_the_bound(a, b, max_norm):
    update = {"w": a, "b": b}
    clipped, norm = clip_update(update, max_norm=max_norm)
    assert update_norm(clipped) <= max_norm
    assert norm == pytest.approx(update_norm(update))
    assert {k: v.dtype for k, v in clipped.items()} == {"w": np.float32, "b": np.float32}
    if norm <= max_norm:  # nothing to clip: unchanged
        for k in update:
            np.testing.assert_array_equal(clipped[k], update[k])
    else:  # clipping only scales, to the bound
        assert update_norm(clipped) == pytest.approx(max_norm, rel=1e-5)
        np.testing.assert_allclose(clipped["w"], a * (max_norm / norm), rtol=1e-5, atol=1e-6 * max_norm)


def test_clip_refuses_a_non_finite_update():
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"w": np.array([np.inf, 1.0])}, max_norm=1.0)


def test_noise_on_the_sum_has_the_calibrated_std():
    summed = {"w": np.zeros((200, 100), dtype=np.float32)}
    noisy = add_noise_to_sum(summed, noise_multiplier=1.5, clipping_norm=0.2, rng=np.random.default_rng(0))
    assert noisy["w"].dtype == np.float32
    assert noisy["w"].std() == pytest.approx(0.3, rel=0.02)
    assert abs(noisy["w"].mean()) < 0.01


def test_client_level_epsilon_composes_rounds_with_the_node_sampling_rate():
    cfg = ClientDPConfig(noise_multiplier=1.0, clipping_norm=0.5, node_sampling_rate=0.5, delta=1e-3)
    eps = [cfg.epsilon(r) for r in (0, 1, 5, 20)]
    assert eps[0] == 0.0 and eps == sorted(eps)
    assert eps[2] == epsilon([(1.0, 0.5, 5)], delta=1e-3)
    # sampling nodes amplifies privacy: q = 1 (every node every round) costs more
    assert client_level_epsilon(noise_multiplier=1.0, node_sampling_rate=1.0, rounds=5, delta=1e-3) > eps[2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0, "clipping_norm": 1.0}, "noise_multiplier must be > 0"),
        ({"noise_multiplier": 1.0, "clipping_norm": 0.0}, "clipping_norm must be > 0"),
        ({"noise_multiplier": 1.0, "clipping_norm": 1.0, "node_sampling_rate": 0.0}, "node_sampling_rate"),
        ({"noise_multiplier": 1.0, "clipping_norm": 1.0, "delta": 1.0}, "delta must be in"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClientDPConfig(**kwargs)
