"""What an honest-but-curious coordinator learns: only the sum.

Every message the coordinator receives during a round is recorded (the in-process Grid keeps
them). From those alone: no float array (no update, no weights) arrives; each masked vector
is statistically uniform modulo M and unrelated to its node's update; for every node the
coordinator holds shares of at most one of its two secrets; and yet the sum is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from scipy.stats import chi2_contingency, chisquare

from privacy.secagg import SecAggConfig, SecAggStrategy, secagg_mod, wire
from privacy.secagg.encoding import EncodingParams, encode
from privacy.secagg.local_round import run_round_locally

D = 20_000
N = 8
ALPHA = 1e-6  # false alarm rate per test; a non-uniform vector gives p ~ 0
CFG = SecAggConfig(
    enabled=True, adversary="semi-honest", threshold=0.5, clip_range=0.5, bits=16, max_weight=1000, timeout=0.2
)


def _update(pid: int) -> np.ndarray:
    # deliberately structured: constant, ramps, a spike; anything but noise
    if pid % 3 == 0:
        return np.full(D, 0.4 if pid % 2 else -0.4, np.float32)
    if pid % 3 == 1:
        return np.linspace(-0.5, 0.5, D, dtype=np.float32)
    u = np.zeros(D, np.float32)
    u[::100] = 0.5
    return u


def _uniformity_pvalue(y: np.ndarray, bits: int) -> float:
    counts = np.bincount((y >> np.uint64(bits - 8)).astype(np.int64), minlength=256)
    return float(chisquare(counts).pvalue)


@pytest.fixture(scope="module")
def transcript(grid_factory: type) -> dict:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        w = msg.content["arrays"]["w"].numpy()
        reply = {"arrays": ArrayRecord({"w": Array(w + _update(pid))}), "metrics": MetricRecord({"num-examples": 50})}
        return Message(RecordDict(reply), reply_to=msg)

    grid = grid_factory(app, N, drop=lambda stage, node: stage == wire.MASKED_INPUT and node == 108)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=N), config=CFG)
    init = ArrayRecord({"w": Array(np.zeros(D, np.float32))})
    msgs = list(strategy.configure_train(1, init, ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    arrays, _ = strategy.aggregate_train(1, replies)
    return {"received": list(grid.received), "arrays": arrays}


def test_no_update_or_weight_array_reaches_the_coordinator(transcript: dict) -> None:
    for msg in transcript["received"]:
        if msg.has_error():
            continue
        for key, record in msg.content.array_records.items():
            assert key == wire.MASKED_RECORD
            assert [a.numpy().dtype for a in record.values()] == [np.dtype(np.uint32)]
        for record in msg.content.config_records.values():
            assert not any(isinstance(v, float) for v in record.values())


def test_masked_vectors_are_uniform_and_unrelated_to_the_updates(transcript: dict) -> None:
    masked = [
        m.content.array_records[wire.MASKED_RECORD][wire.MASKED_ARRAY].numpy()
        for m in transcript["received"]
        if not m.has_error() and wire.MASKED_RECORD in m.content.array_records
    ]
    params = CFG.encoding

    assert len(masked) == N - 1
    for y in masked:
        assert _uniformity_pvalue(y.astype(np.uint64), 32) > ALPHA
    # the test has power: a node's unmasked encoding is far from uniform
    assert _uniformity_pvalue(encode(_update(1), 50, params).astype(np.uint64), 32) < ALPHA
    # two very different updates give indistinguishable masked vectors (two-sample chi-square)
    top = [np.bincount((y >> 24).astype(np.int64), minlength=256) for y in masked[:2]]
    assert chi2_contingency(np.array(top)).pvalue > ALPHA


def test_masked_vector_is_uncorrelated_with_its_input() -> None:
    params = EncodingParams(clip_range=0.5, bits=16, max_weight=1000, max_nodes=8)
    inputs = {u: encode(_update(u - 1), 50, params) for u in range(1, 5)}
    record: list = []

    total, _ = run_round_locally(inputs, threshold=0.5, transcript=record)

    for stage, u, y in record:
        if stage == "masked-input":
            r = np.corrcoef(y.astype(np.float64), inputs[u].astype(np.float64))[0, 1]
            assert abs(r) < 6 / np.sqrt(D)  # ~N(0, 1/sqrt(D)) if independent
    assert total.tolist() == sum(x.astype(np.uint64) for x in inputs.values()).astype(np.uint32).tolist()


def test_coordinator_never_holds_both_secrets_of_a_node(transcript: dict) -> None:
    b_of, sk_of = set(), set()
    for msg in transcript["received"]:
        rec = None if msg.has_error() else msg.content.config_records.get(wire.RECORD)
        if rec is not None and rec[wire.STAGE] == wire.UNMASK:
            b_of.update(rec[wire.B_SOURCES])
            sk_of.update(rec[wire.SK_SOURCES])

    assert b_of and sk_of  # survivors' self masks, the late node's mask key
    assert not b_of & sk_of


def test_the_sum_is_still_exact(transcript: dict) -> None:
    got = transcript["arrays"]["w"].numpy()
    want = np.mean([np.clip(_update(p), -0.5, 0.5) for p in range(N - 1)], axis=0)  # node 108 dropped

    assert np.max(np.abs(got - want)) <= CFG.encoding.error_bound + 1e-7
