"""Holder-normalised item rows (federation/aggregation.py) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from federation import wire
from federation.aggregation import (
    MIN_SHARE,
    ClientDPFedAdam,
    ClientDPFedAvg,
    HolderFedAdam,
    HolderFedAvg,
    normalise_rows,
    with_holders,
)

ROWS, DIM = 5, 3


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's Message() needs a run id outside a running app."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _global() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return with_holders(
        ArrayRecord(
            {
                "item_emb.weight": Array(rng.normal(size=(ROWS, DIM)).astype(np.float32)),
                "head.weight": Array(rng.normal(size=(ROWS, DIM)).astype(np.float32)),
                "head.bias": Array(rng.normal(size=ROWS).astype(np.float32)),
                "encoder.w": Array(rng.normal(size=(2, 2)).astype(np.float32)),
            }
        )
    )


def _reply(instruction: Message, arrays: dict[str, np.ndarray], weight: int) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: weight}),
        }
    )
    return Message(content, reply_to=instruction)


def _round(strategy, g: ArrayRecord, updates: list[tuple[dict[str, np.ndarray], int]]):
    instruction = Message(RecordDict({wire.ARRAYS: g}), dst_node_id=1, message_type="train")

    class _Grid:  # configure_train only samples node ids
        def get_node_ids(self):
            return [1, 2]

    list(strategy.configure_train(1, g, ConfigRecord({}), _Grid()))
    arrays, _ = strategy.aggregate_train(1, [_reply(instruction, u, w) for u, w in updates])
    return {k: arrays[k].numpy() for k in arrays}


def _node_update(g: ArrayRecord, rows: list[int], delta: float) -> dict[str, np.ndarray]:
    """Move the given item rows (all item-indexed parameters) and the dense weight by ``delta``."""
    out = {k: g[k].numpy().copy() for k in g}
    for key in wire.ITEM_ROW_KEYS:
        out[key][rows] += delta
    out["encoder.w"] += delta
    held = np.zeros(ROWS, dtype=np.float32)
    held[rows] = 1.0
    out[wire.ITEM_HOLDERS] = held
    return out


def test_disjoint_holders_get_their_whole_update_and_shared_weights_the_fedavg_mean():
    g = _global()
    common = {"min_available_nodes": 2, "min_train_nodes": 2}
    got = _round(HolderFedAvg(**common), g, [(_node_update(g, [1, 2], 0.3), 1), (_node_update(g, [3], -0.6), 3)])
    g0 = {k: g[k].numpy() for k in g}
    for key in wire.ITEM_ROW_KEYS:
        np.testing.assert_allclose(got[key][[1, 2]], g0[key][[1, 2]] + 0.3, atol=1e-5)  # not 0.3 / 4
        np.testing.assert_allclose(got[key][3], g0[key][3] - 0.6, atol=1e-5)  # not 0.6 * 3 / 4
        np.testing.assert_allclose(got[key][[0, 4]], g0[key][[0, 4]], atol=1e-6)  # nobody holds them
    # Dense parameters: FedAvg's weighted mean, (1 * 0.3 + 3 * -0.6) / 4.
    np.testing.assert_allclose(got["encoder.w"], g0["encoder.w"] + (0.3 - 1.8) / 4, atol=1e-5)
    assert not got[wire.ITEM_HOLDERS].any()  # reset for the next round


def test_equals_plain_fedavg_when_every_node_holds_every_item():
    g = _global()
    common = {"min_available_nodes": 2, "min_train_nodes": 2}
    rng = np.random.default_rng(1)
    updates = []
    for w in (2, 5):
        u = {k: g[k].numpy() + rng.normal(scale=0.1, size=g[k].shape).astype(np.float32) for k in g}
        u[wire.ITEM_HOLDERS] = np.ones(ROWS, dtype=np.float32)
        updates.append((u, w))
    got = _round(HolderFedAvg(**common), g, updates)
    plain = _round(FedAvg(**common), g, updates)
    for k in got:
        if k != wire.ITEM_HOLDERS:
            np.testing.assert_allclose(got[k], plain[k], atol=1e-5)


def test_fedadam_steps_on_the_normalised_average():
    """HolderFedAdam = FedAdam fed with the holder-normalised average (the MRO puts rows first)."""
    g = _global()
    common = {"min_available_nodes": 2, "min_train_nodes": 2, "eta": 0.1, "tau": 1e-3}
    updates = [(_node_update(g, [1], 0.2), 1), (_node_update(g, [2], 0.4), 1)]
    got = _round(HolderFedAdam(**common), g, updates)
    # The same step by hand: first-round Adam with the normalised delta.
    g0 = {k: g[k].numpy().astype(np.float64) for k in g}
    avg = {k: (updates[0][0][k] + updates[1][0][k]) / 2 for k in g0}
    fixed = normalise_rows(g0, avg)
    start = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in g0.items()})
    both = {k: fixed[k].astype(np.float32) for k in g0}
    expect = _round(FedAdam(**common), start, [(both, 1), (both, 1)])
    for k in wire.ITEM_ROW_KEYS:
        np.testing.assert_allclose(got[k], expect[k], atol=1e-5)


@pytest.mark.parametrize("share", [0.0, MIN_SHARE / 2])
def test_rows_with_a_negligible_holder_share_keep_the_plain_average(share):
    current = {"head.bias": np.zeros(ROWS), wire.ITEM_HOLDERS: np.zeros(ROWS)}
    averaged = {"head.bias": np.full(ROWS, 0.01), wire.ITEM_HOLDERS: np.full(ROWS, share)}
    np.testing.assert_allclose(normalise_rows(current, averaged)["head.bias"], 0.01)


# ---- client-level DP: noise on the sum of clipped updates -------------------------------


def _big_global(n: int = 40_000) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(n, dtype=np.float32))})


@pytest.mark.parametrize("cls", [ClientDPFedAvg, ClientDPFedAdam])
def test_client_dp_noise_is_on_the_sum_with_the_configured_std(cls):
    from privacy.client_dp import ClientDPConfig

    g = _big_global()
    m, sigma, clip = 4, 1.5, 0.2
    strategy = cls(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    strategy.client_dp = ClientDPConfig(noise_multiplier=sigma, clipping_norm=clip)
    updates = [({"w": np.full(40_000, 0.01 * (k + 1), np.float32)}, 1) for k in range(m)]
    out = _round(strategy, g, updates)["w"]
    if cls is ClientDPFedAvg:
        noise = out - 0.01 * (1 + 2 + 3 + 4) / m  # mean of the clipped updates is 0.025
        assert noise.mean() == pytest.approx(0.0, abs=4 * sigma * clip / m / 200)
        # N(0, (sigma C)^2) on the sum, divided by m nodes
        assert noise.std() == pytest.approx(sigma * clip / m, rel=0.03)
    else:  # FedAdam takes its step on the noised average: the update is not the plain mean
        assert not np.allclose(out, 0.0)


def test_without_client_dp_the_average_is_exact():
    g = _big_global(10)
    out = _round(ClientDPFedAvg(min_train_nodes=2, min_available_nodes=2), g, [({"w": np.ones(10, np.float32)}, 1)] * 2)
    np.testing.assert_array_equal(out["w"], np.ones(10, np.float32))


def test_client_dp_noise_comes_before_the_holder_division_and_spares_the_holder_shares():
    from privacy.client_dp import ClientDPConfig

    g = _global()
    strategy = HolderFedAvg(min_train_nodes=2, min_available_nodes=2)
    strategy.client_dp = ClientDPConfig(noise_multiplier=1.0, clipping_norm=1e-6)  # tiny noise: values checkable
    out = _round(strategy, g, [(_node_update(g, [1, 2], 0.5), 1), (_node_update(g, [2, 3], 0.5), 1)])
    np.testing.assert_array_equal(out[wire.ITEM_HOLDERS], np.zeros(ROWS, np.float32))  # reset for the next round
    emb = g["item_emb.weight"].numpy()
    # row 1 is held by one node of two: its averaged update 0.25 is divided by the share 0.5
    np.testing.assert_allclose(out["item_emb.weight"][1], emb[1] + 0.5, atol=1e-4)
