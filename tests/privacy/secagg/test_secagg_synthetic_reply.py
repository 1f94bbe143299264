"""The one reply the inner strategy sees after unmasking (privacy/secagg/synthetic_reply.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from privacy.secagg.encoding import EncodingParams
from privacy.secagg.synthetic_reply import mean_metrics, synthetic_reply

PARAMS = EncodingParams(clip_range=0.5, bits=16, max_weight=100, max_nodes=10)


def test_metrics_are_weighted_by_the_capped_weights_and_only_common_keys_are_kept() -> None:
    metrics = {
        1: {"m": MetricRecord({"num-examples": 10, "loss": 1.0, "hist": [1.0, 2.0], "only-here": 5.0})},
        2: {"m": MetricRecord({"num-examples": 1000, "loss": 3.0, "hist": [3.0, 4.0]})},  # capped at 100
        3: {"m": MetricRecord({"num-examples": 90, "loss": 2.0, "hist": [1.0]})},  # list of another length
    }

    key, out = mean_metrics(metrics, weighted_by_key="num-examples", params=PARAMS)

    assert key == "m" and set(out) == {"loss"}
    assert out["loss"] == pytest.approx((10 * 1.0 + 100 * 3.0 + 90 * 2.0) / 200)
    key, out = mean_metrics({k: metrics[k] for k in (1, 2)}, weighted_by_key="num-examples", params=PARAMS)
    assert out["hist"] == pytest.approx([(10 * 1 + 100 * 3) / 110, (10 * 2 + 100 * 4) / 110])
    assert mean_metrics({}, weighted_by_key="num-examples", params=PARAMS) == ("metrics", {})


def test_the_reply_adds_the_mean_update_to_the_global_arrays_in_their_dtype() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    global_arrays = ArrayRecord(
        {"a": Array(np.full((2, 2), 0.25, np.float32)), "b": Array(np.arange(3, dtype=np.float64))}
    )
    mean = np.array([0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 3.0])
    instruction = Message(RecordDict({"arrays": global_arrays}), dst_node_id=7, message_type="train")
    metrics = {1: {"metrics": MetricRecord({"num-examples": 4, "loss": 2.0})}}

    reply = synthetic_reply(
        global_arrays, "arrays", mean, 4, metrics, weighted_by_key="num-examples", params=PARAMS, reply_to=instruction
    )

    a, b = reply.content["arrays"]["a"].numpy(), reply.content["arrays"]["b"].numpy()
    assert a.dtype == np.float32 and b.dtype == np.float64
    np.testing.assert_array_equal(a, (np.float64(0.25) + mean[:4]).astype(np.float32).reshape(2, 2))
    np.testing.assert_array_equal(b, np.arange(3) + mean[4:])
    assert dict(reply.content["metrics"]) == {"loss": 2.0, "num-examples": 4}
