"""Client-level DP as a strategy wrapper (privacy/client_dp_strategy.py): noise on the sum, before the inner
strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity

import privacy.client_dp_strategy as module
from privacy.client_dp import ClientDPConfig, add_noise_to_sum
from privacy.client_dp_strategy import ClientDPStrategy


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's Message() needs a run id outside a running app."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class _Grid:  # configure_train only samples node ids
    def get_node_ids(self):
        return [1, 2, 3, 4]


def _round(strategy, g: ArrayRecord, updates: list[dict[str, np.ndarray]], server_round: int = 1):
    instruction = Message(RecordDict({"arrays": g}), dst_node_id=1, message_type="train")
    list(strategy.configure_train(server_round, g, ConfigRecord({}), _Grid()))
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in u.items()}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            reply_to=instruction,
        )
        for u in updates
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else {k: arrays[k].numpy() for k in arrays}


def _seed_noise(monkeypatch, seed: int = 11) -> None:
    def noise(summed, **kwargs):
        return add_noise_to_sum(summed, rng=np.random.default_rng(seed), **kwargs)

    monkeypatch.setattr(module, "add_noise_to_sum", noise)


@pytest.mark.parametrize("cls", [FedAvg, FedAdam])
def test_client_dp_noise_is_on_the_sum_with_the_configured_std(cls):
    g = ArrayRecord({"w": Array(np.zeros(40_000, dtype=np.float32))})
    m, sigma, clip = 4, 1.5, 0.2
    strategy = ClientDPStrategy(
        cls(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0),
        config=ClientDPConfig(noise_multiplier=sigma, clipping_norm=clip),
    )
    updates = [{"w": np.full(40_000, 0.01 * (k + 1), np.float32)} for k in range(m)]
    out = _round(strategy, g, updates)["w"]
    if cls is FedAvg:
        noise = out - 0.01 * (1 + 2 + 3 + 4) / m  # mean of the clipped updates is 0.025
        assert noise.mean() == pytest.approx(0.0, abs=4 * sigma * clip / m / 200)
        # N(0, (sigma C)^2) on the sum, divided by m nodes
        assert noise.std() == pytest.approx(sigma * clip / m, rel=0.03)
    else:  # FedAdam takes its step on the noised average: the update is not the plain mean
        assert not np.allclose(out, 0.0)


def test_the_noise_comes_before_fedadams_step_not_after_it(monkeypatch):
    """FedAdam steps on the noised mean (what the wrapper hands it), unlike Flower's wrappers,
    which noise FedAdam's output."""
    _seed_noise(monkeypatch)
    g = ArrayRecord({"w": Array(np.zeros(50, dtype=np.float32))})
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(scale=0.05, size=50).astype(np.float32)} for _ in range(3)]
    cdp = ClientDPConfig(noise_multiplier=0.8, clipping_norm=0.5)
    common = {"min_train_nodes": 2, "min_available_nodes": 2, "eta": 0.1}

    got = _round(ClientDPStrategy(FedAdam(**common), config=cdp), g, updates)["w"]

    mean = _round(FedAvg(min_train_nodes=2, min_available_nodes=2), g, updates)["w"]  # weights 1: m = 3
    summed = {"w": (mean.astype(np.float64) - 0.0) * 3}  # the global is 0
    noisy = add_noise_to_sum(summed, noise_multiplier=0.8, clipping_norm=0.5, rng=np.random.default_rng(11))["w"]
    noised_mean = (noisy / 3).astype(np.float32)
    before_step = _round(FedAdam(**common), g, [{"w": noised_mean}])["w"]
    np.testing.assert_array_equal(got, before_step)
    step_then_noise = _round(FedAdam(**common), g, updates)["w"] + (noisy - summed["w"]) / 3
    assert not np.allclose(got, step_then_noise, atol=1e-3)


def test_excluded_arrays_pass_through_unnoised_and_unknown_ones_are_refused(monkeypatch):
    _seed_noise(monkeypatch)
    g = ArrayRecord({"w": Array(np.zeros(8, np.float32)), "public": Array(np.zeros(4, np.float32))})
    updates = [
        {"w": np.full(8, 0.1, np.float32), "public": np.array([1, 0, 1, 0], np.float32)},
        {"w": np.full(8, 0.3, np.float32), "public": np.array([1, 1, 0, 0], np.float32)},
    ]
    strategy = ClientDPStrategy(
        FedAvg(min_train_nodes=2, min_available_nodes=2),
        config=ClientDPConfig(noise_multiplier=1.0, clipping_norm=1.0),
        exclude=("public",),
    )

    out = _round(strategy, g, updates)

    np.testing.assert_array_equal(out["public"], np.array([1.0, 0.5, 0.5, 0.0], np.float32))  # the plain mean
    assert not np.allclose(out["w"], 0.2, atol=0.05)  # noise of std 0.5 on the mean of two
    stranger = [{**u, "extra": np.ones(2, np.float32)} for u in updates]
    with pytest.raises(ValueError, match="arrays the global model has not: \\['extra'\\]"):
        _round(ClientDPStrategy(FedAvg(), config=strategy.config, exclude=("public",)), g, stranger)


def test_a_round_the_wrapper_did_not_configure_is_not_released():
    strategy = ClientDPStrategy(FedAvg(), config=ClientDPConfig(noise_multiplier=1.0, clipping_norm=1.0))
    g = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    instruction = Message(RecordDict({"arrays": g}), dst_node_id=1, message_type="train")
    reply = Message(RecordDict({"arrays": g, "metrics": MetricRecord({"num-examples": 1})}), reply_to=instruction)

    assert strategy.aggregate_train(1, [reply, reply]) == (None, None)  # never configured
    list(strategy.configure_train(1, g, ConfigRecord({}), _Grid()))
    assert strategy.aggregate_train(2, [reply, reply]) == (None, None)  # configured for another round
    assert strategy.aggregate_train(1, []) == (None, None)  # no reply: nothing to release


def test_constructor_checks_and_delegation():
    inner = FedAvg(weighted_by_key="users")
    cdp = ClientDPConfig(noise_multiplier=1.0, clipping_norm=1.0)
    wrapped = ClientDPStrategy(inner, config=cdp)
    assert wrapped.weighted_by_key == "users" and wrapped.inner is inner and "FedAvg" in repr(wrapped)
    with pytest.raises(ValueError, match="Strategy"):
        ClientDPStrategy(object(), config=cdp)
    with pytest.raises(ValueError, match="ClientDPConfig"):
        ClientDPStrategy(inner, config={"noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="collection of array names"):
        ClientDPStrategy(inner, config=cdp, exclude="public")
    assert wrapped.aggregate_evaluate(1, []) is None
