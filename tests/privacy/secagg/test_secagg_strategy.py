"""SecAggStrategy + secagg_mod through Flower's Message objects, with an in-process Grid.

These run the real mod, real ClientApp routing and real strategies (FedAvg, FedAdam, fedmart's
client-level DP wrapper, Flower's client-side DP wrapper); only the transport is replaced (see
``conftest.InProcessGrid``).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg

from privacy.secagg import SecAggConfig, SecAggStrategy, secagg_mod, strict_secagg_mod, wire, wrap_strategy

# The semi-honest mode's mechanics (the active mode's: test_secagg_active_strategy.py)
CFG = SecAggConfig(
    enabled=True,
    adversary="semi-honest",
    threshold=0.5,
    clip_range=0.5,
    bits=16,
    max_weight=1000,
    max_nodes=50,
    timeout=0.2,
)
SHAPES = {"emb": (6, 4), "bias": (5,)}


def _delta(pid: int, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Node pid's deterministic update for array key (depends on pid, so the mean is non-trivial)."""
    rng = np.random.default_rng(1000 * pid + len(key))
    return rng.normal(0.0, 0.1, size=shape).astype(np.float32)


def _weight(pid: int) -> int:
    return 10 * (pid + 1)


def make_app(mods: list | None = None) -> ClientApp:
    app = ClientApp(mods=[secagg_mod] if mods is None else mods)

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = msg.content["arrays"]
        new = {k: Array(v.numpy() + _delta(pid, k, v.numpy().shape)) for k, v in arrays.items()}
        metrics = MetricRecord({"num-examples": _weight(pid), "loss": float(pid), "hist": [1.0, float(pid)]})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


def initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, 0.25, np.float32)) for k, s in SHAPES.items()})


def expected(pids: list[int], arrays: ArrayRecord) -> dict[str, np.ndarray]:
    total = sum(_weight(p) for p in pids)
    return {
        k: (
            a.numpy() + sum(_weight(p) * np.clip(_delta(p, k, a.numpy().shape), -0.5, 0.5) for p in pids) / total
        ).astype(a.numpy().dtype)
        for k, a in arrays.items()
    }


def stage_of(msg: Message) -> str:
    return str(msg.content[wire.RECORD][wire.STAGE]) if wire.RECORD in msg.content.config_records else "train"


def node_pid(grid, node: int) -> int:
    return grid.node_ids.index(node)


def run_round(grid, strategy: SecAggStrategy, arrays: ArrayRecord | None = None, server_round: int = 1):
    arrays = arrays or initial()
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    return strategy.aggregate_train(server_round, replies), msgs


def assert_close(got: ArrayRecord, want: dict[str, np.ndarray], bound: float) -> None:
    assert set(got.keys()) == set(want)
    for k, v in want.items():
        g = got[k].numpy()
        assert g.dtype == v.dtype and g.shape == v.shape
        assert np.max(np.abs(g - v)) <= bound + 1e-6  # + float32 rounding of values near 0.25


# --- correctness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 5, 12])
def test_fedavg_gets_the_weighted_mean_within_the_bound(grid_factory: type, n: int) -> None:
    grid = grid_factory(make_app(), n)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=n), config=CFG)

    (arrays, metrics), _ = run_round(grid, strategy)

    pids = list(range(n))
    assert_close(arrays, expected(pids, initial()), CFG.encoding.error_bound)
    weights = np.array([_weight(p) for p in pids], float)
    assert metrics["loss"] == pytest.approx(float(np.dot(weights, pids) / weights.sum()))
    assert metrics["hist"] == pytest.approx([1.0, float(np.dot(weights, pids) / weights.sum())])
    assert strategy.last_abort_reason is None
    assert strategy.last_report.masked == n


@pytest.mark.parametrize("stage", [wire.ADVERTISE, wire.SHARE_KEYS, wire.MASKED_INPUT, wire.UNMASK])
def test_one_dropout_at_each_stage(grid_factory: type, stage: str) -> None:
    victim = 103
    grid = grid_factory(make_app(), 6, drop=lambda s, node: node == victim and s == stage)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=6), config=CFG)

    (arrays, _), _ = run_round(grid, strategy)

    pids = [p for p in range(6) if p != 2 or stage == wire.UNMASK]
    assert_close(arrays, expected(pids, initial()), CFG.encoding.error_bound)
    assert strategy.last_report.masked == len(pids)


def test_unmask_asks_a_cover_and_does_not_wait_for_a_silent_node(grid_factory: type) -> None:
    # 6 nodes, t = 3, unmask_spare 1: 4 asked; the first one asked stays silent. The stage's
    # timeout is long (30 s): it ends because the other three's shares suffice, not by timing out.
    silent: list[int] = []

    def drop(stage: str, node: int) -> bool:
        if stage == wire.UNMASK and not silent:
            silent.append(node)
        return stage == wire.UNMASK and node in silent

    grid = grid_factory(make_app(), 6, drop=drop)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=6), config=SecAggConfig(**{**vars(CFG), "timeout": 30.0}))

    (arrays, _), _ = run_round(grid, strategy)

    assert_close(arrays, expected(list(range(6)), initial()), CFG.encoding.error_bound)
    report = strategy.last_report
    assert (report.threshold, report.asked, report.unmasked) == (3, 4, 3)
    assert report.seconds[wire.UNMASK] < 10.0  # a wait for the silent node would take the full 30 s
    assert len([m for m in grid.sent if stage_of(m) == wire.UNMASK]) == 4


def test_unmask_asks_the_other_survivors_when_the_cover_falls_short(grid_factory: type) -> None:
    # the first two nodes asked stay silent: 2 of 4 answer, below t = 3, so the other 2 are asked
    silent: list[int] = []

    def drop(stage: str, node: int) -> bool:
        if stage == wire.UNMASK and len(silent) < 2 and node not in silent:
            silent.append(node)
        return stage == wire.UNMASK and node in silent

    grid = grid_factory(make_app(), 6, drop=drop)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=6), config=CFG)

    (arrays, _), _ = run_round(grid, strategy)

    assert_close(arrays, expected(list(range(6)), initial()), CFG.encoding.error_bound)
    assert (strategy.last_report.asked, strategy.last_report.unmasked) == (6, 4)


def test_nodes_keep_at_most_the_last_masked_session_and_the_next_one(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 6)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=6), config=CFG)

    strategy.start(grid, initial(), num_rounds=3)

    for node, ctx in grid.contexts.items():
        slots = {k: int(v[wire.ROUND]) for k, v in ctx.state.config_records.items() if k.startswith("secagg.session")}
        assert slots.get(wire.STATE_SESSION_NEXT) == 4, node  # keys for round 4, shared in round 3
        # a node the coordinator did not ask to unmask keeps round 3's secrets until round 4 masks;
        # one it asked has wiped them; no older session survives anywhere
        assert slots.get(wire.STATE_SESSION, 3) == 3, node
    asked = sum(wire.STATE_SESSION not in ctx.state.config_records for ctx in grid.contexts.values())
    assert asked == strategy.last_report.asked == 4


def test_unmask_spare_large_asks_every_survivor(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 5)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=5), config=SecAggConfig(**{**vars(CFG), "unmask_spare": 50}))

    run_round(grid, strategy)

    assert (strategy.last_report.asked, strategy.last_report.unmasked) == (5, 5)


def test_train_handler_error_counts_as_a_dropout(grid_factory: type) -> None:
    app = make_app()
    inner = app._registered_funcs["train.default"]

    def flaky(msg: Message, ctxt) -> Message:
        if ctxt.node_id == 104:
            raise RuntimeError("out of memory")
        return inner(msg, ctxt)

    app._registered_funcs["train.default"] = flaky
    grid = grid_factory(app, 5)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=5), config=CFG)

    (arrays, _), _ = run_round(grid, strategy)

    assert_close(arrays, expected([0, 1, 2, 4], initial()), CFG.encoding.error_bound)


def test_below_threshold_aborts_and_the_model_stays(grid_factory: type) -> None:
    # 6 nodes, threshold 4: in round 1 three fail to send their masked input; round 2 is complete
    seen: dict[int, int] = {}

    def drop(stage: str, node: int) -> bool:
        if stage != wire.MASKED_INPUT:
            return False
        seen[node] = seen.get(node, 0) + 1
        return seen[node] == 1 and node in (101, 102, 103)

    grid = grid_factory(make_app(), 6, drop=drop)
    strategy = SecAggStrategy(
        FedAvg(min_available_nodes=6),
        config=SecAggConfig(enabled=True, adversary="semi-honest", threshold=4, timeout=0.2),
    )
    reasons = []
    original = strategy.aggregate_train

    def spy(server_round: int, replies):
        out = original(server_round, replies)
        reasons.append((out[0] is None, strategy.last_abort_reason))
        return out

    strategy.aggregate_train = spy
    result = strategy.start(grid, initial(), num_rounds=2)

    assert reasons[0][0] and "masked input: only 3 nodes left, below the threshold of 4" in reasons[0][1]
    assert reasons[1] == (False, None)
    assert 1 not in result.train_metrics_clientapp
    # round 2 started from the unchanged initial model: one step of the full mean away from it
    assert_close(result.arrays, expected(list(range(6)), initial()), strategy.config.encoding.error_bound)


def test_abort_in_key_stage_sends_no_train_message(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 4, drop=lambda s, node: s == wire.SHARE_KEYS and node != 101)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG)

    (arrays, metrics), msgs = run_round(grid, strategy)

    assert msgs == [] and arrays is None and metrics is None
    assert "share keys" in strategy.last_abort_reason


def test_too_many_nodes_for_the_modulus_abort(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 3)
    cfg = SecAggConfig(enabled=True, adversary="semi-honest", threshold=2, max_nodes=2)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=3, min_train_nodes=3), config=cfg)

    (arrays, _), msgs = run_round(grid, strategy)

    assert arrays is None and msgs == []
    assert "max_nodes=2" in strategy.last_abort_reason


# --- composition with other strategies and mods ---------------------------------------------------
def test_two_rounds_reuse_channel_keys(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 4)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG)

    strategy.start(grid, initial(), num_rounds=2)

    assert strategy.last_report.advertised == 0  # round 2 reused round 1's channel keys
    assert strategy.last_report.pipelined  # and its share-keys stage rode on round 1's TRAIN messages
    # (a node that restarts in between: test_secagg_restart.py)


def test_pipelined_share_keys_across_rounds(grid_factory: type) -> None:
    # node 104 misses round 2's TRAIN message (which also carries round 3's share-keys stage)
    seen: dict[int, int] = {}

    def drop(stage: str, node: int) -> bool:
        seen[node] = seen.get(node, 0) + (stage == wire.MASKED_INPUT)
        return node == 104 and stage == wire.MASKED_INPUT and seen[node] == 2

    grid = grid_factory(make_app(), 4, drop=drop)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG)
    arrays, reports = initial(), []
    for r in (1, 2, 3, 4):
        (arrays, _), _ = run_round(grid, strategy, arrays, server_round=r)
        reports.append(strategy.last_report)

    assert [rep.pipelined for rep in reports] == [False, True, False, True]
    assert [rep.masked for rep in reports] == [4, 3, 4, 4]  # round 3 shared keys afresh to bring 104 back
    assert [wire.SHARE_KEYS in rep.seconds for rep in reports] == [True, False, True, False]
    want = initial()
    for pids in ([0, 1, 2, 3], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]):
        want = ArrayRecord({k: Array(v) for k, v in expected(pids, want).items()})
    assert_close(arrays, {k: v.numpy() for k, v in want.items()}, 4 * CFG.encoding.error_bound)


def test_a_restarted_coordinator_can_resume_an_earlier_round(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 4)
    first = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG)
    run_round(grid, first, server_round=1)
    run_round(grid, first, server_round=2)  # nodes now hold pipelined sessions for round 3

    resumed = SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG)  # crash; resume from round 2
    (arrays, _), _ = run_round(grid, resumed, server_round=2)

    assert arrays is not None and resumed.last_report.masked == 4
    assert resumed.last_report.advertised == 4  # fresh coordinator: keys again, stale sessions dropped


def test_validate_reply_tells_masked_replies_from_anything_else(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 3)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=3), config=CFG)
    msgs = list(strategy.configure_train(1, initial(), ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    plain = Message(RecordDict({"arrays": initial(), "metrics": MetricRecord({"num-examples": 1})}), reply_to=msgs[0])

    assert [strategy.validate_reply(r) for r in replies] == ["", "", ""]
    assert "no masked input" in strategy.validate_reply(plain)
    strategy.aggregate_train(1, replies)
    assert "no secure-aggregation round" in strategy.validate_reply(replies[0])


def test_pipelining_can_be_turned_off(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 3)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=3), config=CFG, pipeline=False)

    strategy.start(grid, initial(), num_rounds=2)

    assert not strategy.last_report.pipelined and wire.SHARE_KEYS in strategy.last_report.seconds
    assert not any(wire.RECORD_NEXT in m.content.config_records for m in grid.sent)


def test_fedadam_applies_its_optimizer_to_the_unmasked_mean(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 4)
    plain = FedAdam(min_available_nodes=4, eta=0.1)
    secure = SecAggStrategy(FedAdam(min_available_nodes=4, eta=0.1), config=CFG)
    avg = expected(list(range(4)), initial())
    fake = Message(
        RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in avg.items()}), "metrics": MetricRecord({"num-examples": 1})}
        ),
        dst_node_id=1,
        message_type="train",
    )
    plain.configure_train(1, initial(), ConfigRecord(), grid)
    want, _ = plain.aggregate_train(1, [fake])

    (got, _), _ = run_round(grid, secure)

    assert_close(got, {k: v.numpy() for k, v in want.items()}, 1e-4)  # Adam's step amplifies the small error


def test_client_side_dp_wrapper_outside_secagg(grid_factory: type) -> None:
    from flwr.clientapp.mod import fixedclipping_mod

    grid = grid_factory(make_app([secagg_mod, fixedclipping_mod]), 4)
    strategy = DifferentialPrivacyClientSideFixedClipping(
        SecAggStrategy(FedAvg(min_available_nodes=4), config=CFG),
        noise_multiplier=0.0,
        clipping_norm=1e-3,
        num_sampled_clients=4,
    )

    result = strategy.start(grid, initial(), num_rounds=1)

    step = sum(np.sum((result.arrays[k].numpy() - a.numpy()) ** 2) for k, a in initial().items()) ** 0.5
    assert 0 < step <= 1e-3 + 1e-4  # every node clipped to 1e-3 before masking; the mean is no longer


def test_mod_passes_plain_train_through_and_strict_mod_refuses_it(grid_factory: type) -> None:
    plain_grid = grid_factory(make_app(), 3)
    result = FedAvg(min_available_nodes=3).start(plain_grid, initial(), num_rounds=1)
    assert_close(result.arrays, expected([0, 1, 2], initial()), 1e-6)

    strict_grid = grid_factory(make_app([strict_secagg_mod]), 3)
    FedAvg(min_available_nodes=3).start(strict_grid, initial(), num_rounds=1)
    assert all(
        r.has_error() and "secure aggregation" in r.error.reason
        for r in strict_grid.received
        if r.metadata.message_type == "train"
    )


def test_mod_refuses_a_late_share_keys_message_of_an_earlier_round(grid_factory: type) -> None:
    grid = grid_factory(make_app(), 3)
    strategy = SecAggStrategy(FedAvg(min_available_nodes=3), config=CFG)
    strategy.configure_train(2, initial(), ConfigRecord(), grid)
    sent = next(m for m in grid.sent if stage_of(m) == wire.SHARE_KEYS and m.metadata.dst_node_id == 101)
    late = dict(sent.content[wire.RECORD]) | {wire.ROUND: 1}

    replies = grid.send_and_receive([Message(RecordDict({wire.RECORD: ConfigRecord(late)}), 101, "train")])

    assert replies[0].has_error() and "stale share-keys message of round 1" in replies[0].error.reason


def test_wrap_strategy_and_constructor_checks() -> None:
    inner = FedAvg()
    assert wrap_strategy(inner, SecAggConfig(enabled=False)) is inner
    assert isinstance(wrap_strategy(inner, SecAggConfig(enabled=True)), SecAggStrategy)
    with pytest.raises(ValueError, match="Strategy"):
        SecAggStrategy(object(), config=CFG)
    with pytest.raises(ValueError, match="SecAggConfig"):
        SecAggStrategy(inner, config={"enabled": True})


def test_aggregate_without_configure_returns_nothing() -> None:
    strategy = SecAggStrategy(FedAvg(), config=CFG)

    assert strategy.aggregate_train(3, []) == (None, None)
    assert "not configured" in strategy.last_abort_reason


def test_client_level_dp_wrapper_composes_under_secagg(grid_factory: type, monkeypatch) -> None:
    """SecAgg(ClientDP(FedAvg)): the wrapper noises the unmasked sum, as it noises a plain round's sum."""
    import privacy.client_dp_strategy as client_dp_strategy
    from privacy.client_dp import ClientDPConfig, add_noise_to_sum
    from privacy.client_dp_strategy import ClientDPStrategy

    def noise(summed, **kwargs):
        return add_noise_to_sum(summed, rng=np.random.default_rng(5), **kwargs)

    monkeypatch.setattr(client_dp_strategy, "add_noise_to_sum", noise)

    def app_with(mods: list) -> ClientApp:  # nodes send weight 1 under client-level DP
        app = ClientApp(mods=mods)

        @app.train()
        def train(msg: Message, context) -> Message:
            pid = int(context.node_config["partition-id"])
            new = {k: Array(v.numpy() + _delta(pid, k, v.numpy().shape)) for k, v in msg.content["arrays"].items()}
            metrics = MetricRecord({"num-examples": 1, "loss": float(pid)})
            return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

        return app

    class Counting(FedAvg):
        seen: list[int] = []

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            self.seen.append(len(replies))
            return super().aggregate_train(server_round, replies)

    cdp = ClientDPConfig(noise_multiplier=1.0, clipping_norm=0.05)
    secure = SecAggStrategy(ClientDPStrategy(Counting(min_available_nodes=4), config=cdp), config=CFG)
    plain = ClientDPStrategy(FedAvg(min_available_nodes=4), config=cdp)

    (got, metrics), _ = run_round(grid_factory(app_with([secagg_mod]), 4), secure)
    want = plain.start(grid_factory(app_with([]), 4), initial(), num_rounds=1).arrays

    assert Counting.seen == [1]  # the inner strategy saw one reply: the noised mean
    assert secure.weighted_by_key == "num-examples" and metrics["loss"] == pytest.approx(1.5)
    assert_close(got, {k: v.numpy() for k, v in want.items()}, CFG.encoding.error_bound)
    noiseless = 0.25 + sum(_delta(p, "emb", SHAPES["emb"]) for p in range(4)) / 4
    assert not np.allclose(got["emb"].numpy(), noiseless, atol=1e-3)  # noise of std 0.05 / 4 on the mean
