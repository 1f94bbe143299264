"""Holder-normalised item rows (federation/aggregation.py) against hand-computed values, alone and under the
client-level DP wrapper (privacy/client_dp_strategy.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from conf.settings import ClientDPSettings, FederationSettings
from federation import wire
from federation.aggregation import (
    MIN_SHARE,
    HolderFedAdam,
    HolderFedAvg,
    normalise_rows,
    with_holders,
)
from privacy.client_dp import ClientDPConfig, add_noise_to_sum
from privacy.client_dp_strategy import ClientDPStrategy
from privacy.secagg.config import SecAggConfig

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
    for key in wire.item_row_keys(out):
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
    for key in wire.item_row_keys(got):
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
    for k in wire.item_row_keys(got):
        np.testing.assert_allclose(got[k], expect[k], atol=1e-5)


@pytest.mark.parametrize("share", [0.0, MIN_SHARE / 2])
def test_rows_with_a_negligible_holder_share_keep_the_plain_average(share):
    current = {"head.bias": np.zeros(ROWS), wire.ITEM_HOLDERS: np.zeros(ROWS)}
    averaged = {"head.bias": np.full(ROWS, 0.01), wire.ITEM_HOLDERS: np.full(ROWS, share)}
    np.testing.assert_allclose(normalise_rows(current, averaged)["head.bias"], 0.01)


# ---- client-level DP around the holder rule: noise on the sum, before the division ------


def test_without_client_dp_the_average_is_exact():
    from federation.server import make_strategy

    fed = FederationSettings(item_rows="mean", min_train_nodes=2, min_available_nodes=2)
    strategy = make_strategy(fed, 2)
    assert not isinstance(strategy, ClientDPStrategy)  # no wrapper, no noise
    g = ArrayRecord({"w": Array(np.zeros(10, dtype=np.float32))})
    out = _round(strategy, g, [({"w": np.ones(10, np.float32)}, 1)] * 2)
    np.testing.assert_array_equal(out["w"], np.ones(10, np.float32))


def test_client_dp_noise_comes_before_the_holder_division_and_spares_the_holder_shares():
    g = _global()
    strategy = ClientDPStrategy(
        HolderFedAvg(min_train_nodes=2, min_available_nodes=2),
        config=ClientDPConfig(noise_multiplier=1.0, clipping_norm=1e-6),  # tiny noise: values checkable
        exclude=(wire.ITEM_HOLDERS,),
    )
    out = _round(strategy, g, [(_node_update(g, [1, 2], 0.5), 1), (_node_update(g, [2, 3], 0.5), 1)])
    np.testing.assert_array_equal(out[wire.ITEM_HOLDERS], np.zeros(ROWS, np.float32))  # reset for the next round
    emb = g["item_emb.weight"].numpy()
    # row 1 is held by one node of two: its averaged update 0.25 is divided by the share 0.5
    np.testing.assert_allclose(out["item_emb.weight"][1], emb[1] + 0.5, atol=1e-4)


def test_make_strategy_stacks_secure_aggregation_over_client_dp_over_the_holder_rule():
    from federation.server import make_strategy
    from privacy.secagg import SecAggStrategy

    fed = FederationSettings(
        strategy="fedadam",
        item_rows="holders",
        client_dp=ClientDPSettings(enabled=True, clipping_norm=0.5, noise_multiplier=1.0, delta=0.01),
    )
    strategy = make_strategy(fed, 3, SecAggConfig(enabled=True))

    assert isinstance(strategy, SecAggStrategy) and isinstance(strategy.inner, ClientDPStrategy)
    assert type(strategy.inner.inner) is HolderFedAdam
    assert strategy.inner.exclude == {wire.ITEM_HOLDERS} and strategy.inner.config.clipping_norm == 0.5
    assert not hasattr(strategy.inner.inner, "client_dp")  # no attribute attached after construction


class _MixinOracle(FedAvg):
    """The mixin ClientDPStrategy replaced (federation/aggregation.py before issue 12), kept as the oracle.

    Its ``aggregate_train`` ran below the holder rule and FedAdam's step in the MRO: FedAvg's
    average, then noise on the recovered sum. ``_rng`` is the test's seeded generator.
    """

    _global = None
    _rng = None
    client_dp = None

    def configure_train(self, server_round, arrays, config, grid):
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        averaged, metrics = super().aggregate_train(server_round, replies)
        cdp = self.client_dp
        m = sum(float(rec[self.weighted_by_key]) for r in replies for rec in r.content.metric_records.values()
                if self.weighted_by_key in rec)  # fmt: skip
        avg = {k: averaged[k].numpy() for k in averaged}
        g = {k: self._global[k].numpy().astype(np.float64) for k in avg if k != wire.ITEM_HOLDERS}
        noisy = add_noise_to_sum(
            {k: (avg[k].astype(np.float64) - g[k]) * m for k in g},
            noise_multiplier=cdp.noise_multiplier,
            clipping_norm=cdp.clipping_norm,
            rng=self._rng,
        )
        out = {k: (g[k] + noisy[k] / m).astype(avg[k].dtype) if k in g else avg[k] for k in avg}
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()}), metrics


class _OracleFedAdam(FedAdam, _MixinOracle):
    pass


class _OracleHolders(_MixinOracle):
    def aggregate_train(self, server_round, replies):
        averaged, metrics = super().aggregate_train(server_round, replies)
        current = {k: self._global[k].numpy() for k in self._global}
        fixed = normalise_rows(current, {k: averaged[k].numpy() for k in averaged})
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in fixed.items()}), metrics


class _OracleHolderFedAvg(_OracleHolders):
    pass


class _OracleHolderFedAdam(FedAdam, _OracleHolders):
    pass


@pytest.mark.parametrize(
    ("inner", "oracle"),
    [
        (FedAvg, _MixinOracle),
        (FedAdam, _OracleFedAdam),
        (HolderFedAvg, _OracleHolderFedAvg),
        (HolderFedAdam, _OracleHolderFedAdam),
    ],
)
def test_the_wrapper_equals_the_old_mixin_bit_for_bit(monkeypatch, inner, oracle):
    """Same replies, same noise draws: the wrapper's arrays and metrics equal the mixin's, over three rounds."""
    import privacy.client_dp_strategy as module

    cdp = ClientDPConfig(noise_multiplier=0.7, clipping_norm=0.3)
    common = {"min_train_nodes": 2, "min_available_nodes": 2}
    if inner in (FedAdam, HolderFedAdam):
        common["eta"] = 0.05
    wrapped = ClientDPStrategy(inner(**common), config=cdp, exclude=(wire.ITEM_HOLDERS,))
    old = oracle(**common)
    old.client_dp = cdp
    seeded = module.add_noise_to_sum

    def noise(summed, **kwargs):
        return seeded(summed, rng=np.random.default_rng(7), **kwargs)

    monkeypatch.setattr(module, "add_noise_to_sum", noise)
    holders = inner in (HolderFedAvg, HolderFedAdam)
    g_old = _global() if holders else ArrayRecord({k: v for k, v in _global().items() if k != wire.ITEM_HOLDERS})
    g_new = g_old
    rng = np.random.default_rng(3)
    for server_round in (1, 2, 3):
        updates = []
        for rows in ([0, 1], [1, 3], [2]):
            u = _node_update(g_old, rows, float(rng.normal(scale=0.1)))
            if not holders:
                del u[wire.ITEM_HOLDERS]
            updates.append((u, 1))
        old._rng = np.random.default_rng(7)
        got, got_metrics = _round_with_metrics(wrapped, g_new, updates, server_round)
        want, want_metrics = _round_with_metrics(old, g_old, updates, server_round)
        assert got.keys() == want.keys() and got_metrics == want_metrics
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k])
        g_new = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in got.items()})
        g_old = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in want.items()})


def _round_with_metrics(strategy, g: ArrayRecord, updates, server_round: int):
    instruction = Message(RecordDict({wire.ARRAYS: g}), dst_node_id=1, message_type="train")

    class _Grid:
        def get_node_ids(self):
            return [1, 2, 3]

    list(strategy.configure_train(server_round, g, ConfigRecord({}), _Grid()))
    replies = []
    for i, (u, w) in enumerate(updates):
        content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in u.items()}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: w, "users_trained": 10 + i, "hist": [1.0, float(i)]}),
            }
        )
        replies.append(Message(content, reply_to=instruction))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return {k: arrays[k].numpy() for k in arrays}, dict(metrics)
