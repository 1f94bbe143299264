"""A canary node of the client-level audit (clients/canary_node.py): its step, its secret, its score."""

from __future__ import annotations

import numpy as np

from clients.canary_node import CanaryNode, write_canary_node_dir
from federation import wire

WEIGHTS = {"a": np.zeros((30, 4), np.float32), "b": np.zeros(7, np.float32), wire.ITEM_HOLDERS: np.zeros(5, np.float32)}


def _node(tmp_path, included: bool) -> CanaryNode:
    write_canary_node_dir(tmp_path, 3)
    node = CanaryNode(tmp_path)
    node.included = included  # the drawn bit is the node's; the test fixes it
    return node


def test_an_included_canary_steps_exactly_the_clipping_norm_along_its_direction(tmp_path):
    node = _node(tmp_path, included=True)
    out = node.train(WEIGHTS, clipping_norm=0.05)

    step = np.sqrt(sum(float(np.sum((out[k] - WEIGHTS[k]) ** 2)) for k in ("a", "b")))
    assert abs(step - 0.05) < 1e-6
    np.testing.assert_array_equal(out[wire.ITEM_HOLDERS], np.ones(5, np.float32))  # speaks for every row
    final = {k: v + 3 * (out[k] - v) for k, v in WEIGHTS.items()}  # three rounds along its direction
    assert node.score(final) > 0.999
    assert node.name == "canary-node-03"


def test_an_excluded_canary_sends_a_zero_step_and_scores_noise_near_zero(tmp_path):
    node = _node(tmp_path, included=False)
    out = node.train(WEIGHTS, clipping_norm=0.05)

    for k in ("a", "b"):
        np.testing.assert_array_equal(out[k], WEIGHTS[k])
    rng = np.random.default_rng(0)
    final = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in WEIGHTS.items()}
    assert abs(node.score(final)) < 0.5  # a random change is nearly orthogonal to its direction


def test_the_secret_is_drawn_once_and_kept_private(tmp_path):
    write_canary_node_dir(tmp_path, 0)
    first, again = CanaryNode(tmp_path), CanaryNode(tmp_path)

    assert (first.seed, first.included, first.population_id) == (again.seed, again.included, again.population_id)
    assert (tmp_path / ".fedmart" / "canary-node.npz").stat().st_mode & 0o077 == 0
    other = tmp_path / "other"
    write_canary_node_dir(other, 1)
    assert CanaryNode(other).seed != first.seed
