"""The node-side update guard and the test-only fault injector (clients/guard.py).

The guard is the last check before a node's update leaves it (under secure aggregation the
coordinator only ever sees a masked vector), so each test plays a training handler that
returns a given update and asserts what the node sends: the same reply, or an
``ERR_BAD_UPDATE`` error that carries no weights at all.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clients.guard import FAULTS, fault_mod, parse_fault, update_guard_mod
from federation import wire

ROWS = 6  # item rows, row 0 is padding
GLOBAL = {
    "item_emb.weight": np.linspace(-1, 1, ROWS * 4, dtype=np.float32).reshape(ROWS, 4),
    "head.bias": np.zeros(ROWS, np.float32),
    wire.ITEM_HOLDERS: np.zeros(ROWS, np.float32),  # zeros from the coordinator
}
MAX_ABS = 1e6  # the largest magnitude an update may carry


def _trained() -> dict[str, np.ndarray]:
    """What an honest node sends back: every value moved a little, its holder vector filled in."""
    out = {k: v + np.float32(0.25) for k, v in GLOBAL.items()}
    out[wire.ITEM_HOLDERS] = np.array([0, 1, 1, 0, 1, 0], np.float32)
    return out


class Handler:
    """The training handler the mods wrap: replies with ``weights`` and remembers that reply."""

    def __init__(self, weights: dict[str, np.ndarray] | None = None, *, error: Error | None = None) -> None:
        self.weights, self.error = weights, error
        self.reply: Message | None = None
        self.called_at: float | None = None

    def __call__(self, msg: Message, ctxt) -> Message:
        self.called_at = time.monotonic()
        if self.error is not None:
            self.reply = Message(self.error, reply_to=msg)
        else:
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.weights.items()})
            content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 3})})
            self.reply = Message(content, reply_to=msg)
        return self.reply


def _numpy(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content[wire.ARRAYS].items()}


def _assert_refused(out: Message, msg: Message) -> None:
    assert out.has_error(), "a malformed update must not leave the node"
    assert out.error.code == wire.ERR_BAD_UPDATE
    assert "malformed update refused by the node" in out.error.reason
    assert not out.has_content(), "the refusal carries no weights"
    assert out.metadata.reply_to_message_id == msg.metadata.message_id
    assert out.metadata.message_type == msg.metadata.message_type


def _guard(msg: Message, ctxt, weights: dict[str, np.ndarray]) -> tuple[Message, Handler]:
    handler = Handler(weights)
    return update_guard_mod(msg, ctxt, handler), handler


# --- update_guard_mod: what passes ------------------------------------------------------------


def test_a_well_formed_update_is_sent_as_the_handler_built_it(train_message, node_context):
    msg = train_message(GLOBAL)

    out, handler = _guard(msg, node_context(), _trained())

    assert out is handler.reply


_FINITE = st.floats(-MAX_ABS, MAX_ABS, width=32)


@settings(max_examples=40, deadline=None)
@given(
    emb=hnp.arrays(np.float32, GLOBAL["item_emb.weight"].shape, elements=_FINITE),
    bias=hnp.arrays(np.float32, ROWS, elements=_FINITE),
    holders=hnp.arrays(np.float32, ROWS, elements=st.floats(0, 1, width=32)),
)
def test_any_finite_in_range_update_with_shares_in_0_1_passes(train_message, node_context, emb, bias, holders):
    msg = train_message(GLOBAL)
    weights = {"item_emb.weight": emb, "head.bias": bias, wire.ITEM_HOLDERS: holders}

    out, handler = _guard(msg, node_context(), weights)

    assert out is handler.reply


def test_the_handlers_own_error_reply_passes_untouched(train_message, node_context):
    msg = train_message(GLOBAL)
    handler = Handler(error=Error(code=wire.ERR_DECLINED, reason='{"code": "budget_exhausted"}'))

    out = update_guard_mod(msg, node_context(), handler)

    assert out is handler.reply and out.error.code == wire.ERR_DECLINED


@pytest.mark.parametrize(
    "message_type",
    ["evaluate", "query.hello"],
)
def test_messages_other_than_train_are_not_inspected(train_message, node_context, message_type):
    msg = train_message(GLOBAL, message_type=message_type)
    bad = {k: np.full_like(v, np.nan) for k, v in GLOBAL.items()}

    out, handler = _guard(msg, node_context(), bad)

    assert out is handler.reply


def test_a_train_message_without_weights_is_not_inspected(flower_task, node_context):
    # e.g. a secure-aggregation key stage: a TRAIN message with a config record only
    msg = Message(RecordDict({"stage": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="train")

    out, handler = _guard(msg, node_context(), {"w": np.array([np.nan], np.float32)})

    assert out is handler.reply


# --- update_guard_mod: what is refused --------------------------------------------------------


def _with(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    out = _trained()
    out[key] = value
    return out


def _poke(key: str, index: int, value: float) -> dict[str, np.ndarray]:
    arr = _trained()[key].copy()
    arr.flat[index % arr.size] = value
    return _with(key, arr)


@settings(max_examples=30, deadline=None)
@given(
    key=st.sampled_from(sorted(GLOBAL)), index=st.integers(0, 10**6), value=st.sampled_from([np.nan, np.inf, -np.inf])
)
def test_a_single_non_finite_value_anywhere_is_refused(train_message, node_context, key, index, value):
    msg = train_message(GLOBAL)

    out, _ = _guard(msg, node_context(), _poke(key, index, value))

    _assert_refused(out, msg)
    assert f"non-finite values in {key}" in out.error.reason


@settings(max_examples=30, deadline=None)
@given(
    key=st.sampled_from(["item_emb.weight", "head.bias"]),
    index=st.integers(0, 10**6),
    magnitude=st.floats(MAX_ABS, float(np.finfo(np.float32).max), width=32, exclude_min=True),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_a_single_value_beyond_the_range_is_refused(train_message, node_context, key, index, magnitude, sign):
    msg = train_message(GLOBAL)

    out, _ = _guard(msg, node_context(), _poke(key, index, sign * magnitude))

    _assert_refused(out, msg)
    assert f"values out of range in {key}" in out.error.reason


@pytest.mark.parametrize("share", [-0.5, -1e-30, 1.0000001, 2.0])
def test_a_holder_share_outside_0_1_is_refused(train_message, node_context, share):
    msg = train_message(GLOBAL)

    out, _ = _guard(msg, node_context(), _poke(wire.ITEM_HOLDERS, 2, share))

    _assert_refused(out, msg)
    assert "item holder shares outside [0, 1]" in out.error.reason


def _renamed() -> dict[str, np.ndarray]:
    out = _trained()
    out["head.bias.renamed"] = out.pop("head.bias")
    return out


@pytest.mark.parametrize(
    ("weights", "why"),
    [
        pytest.param({k: v for k, v in _trained().items() if k != "head.bias"}, "wrong parameter names", id="missing"),
        pytest.param({**_trained(), "extra": np.zeros(2, np.float32)}, "wrong parameter names", id="extra"),
        pytest.param(_renamed(), "wrong parameter names", id="renamed"),
        pytest.param(_with("item_emb.weight", np.zeros((ROWS - 1, 4), np.float32)), "wrong shape", id="row-less"),
        pytest.param(_with("item_emb.weight", np.zeros((4, ROWS), np.float32)), "wrong shape", id="transposed"),
        pytest.param(_with("head.bias", np.zeros(ROWS, np.float64)), "wrong dtype", id="float64"),
        pytest.param(_with("head.bias", np.zeros(ROWS, np.float16)), "wrong dtype", id="float16"),
    ],
)
def test_an_update_that_does_not_fit_the_global_model_is_refused(train_message, node_context, weights, why):
    msg = train_message(GLOBAL)

    out, _ = _guard(msg, node_context(), weights)

    _assert_refused(out, msg)
    assert why in out.error.reason


# --- fault_mod ---------------------------------------------------------------------------------


@pytest.mark.parametrize("node_config", [{}, {"fault": ""}])
def test_without_a_fault_in_the_node_config_fault_mod_does_nothing(train_message, node_context, node_config):
    msg = train_message(GLOBAL)
    handler = Handler(_trained())

    out = fault_mod(msg, node_context(**node_config), handler)

    assert out is handler.reply


def test_the_coordinator_cannot_switch_a_fault_on(train_message, node_context):
    msg = train_message(GLOBAL)
    ctxt = node_context()
    ctxt.run_config["fault"] = "nan-update"  # what the coordinator controls
    handler = Handler(_trained())

    out = fault_mod(msg, ctxt, handler)

    assert out is handler.reply


def _differences(out: Message) -> dict[str, np.ndarray]:
    """Per array, the flat positions where the sent update differs from the honest one."""
    sent, honest = _numpy(out), _trained()
    return {k: np.flatnonzero(sent[k].ravel() != honest[k].ravel()) for k in honest if sent[k].shape == honest[k].shape}


@pytest.mark.parametrize(("fault", "check"), [("nan-update", np.isnan), ("inf-update", np.isposinf)])
def test_a_value_fault_corrupts_exactly_one_value_and_keeps_the_rest(train_message, node_context, fault, check):
    msg = train_message(GLOBAL)

    out = fault_mod(msg, node_context(fault=fault), Handler(_trained()))

    changed = {k: idx for k, idx in _differences(out).items() if idx.size}
    assert list(changed) == ["item_emb.weight"] and changed["item_emb.weight"].tolist() == [0]
    assert check(_numpy(out)["item_emb.weight"].flat[0])
    assert out.content[wire.METRICS][wire.NUM_EXAMPLES] == 3  # the rest of the reply is kept
    assert out.metadata.reply_to_message_id == msg.metadata.message_id


def test_the_shape_fault_drops_the_last_row_of_one_array(train_message, node_context):
    msg = train_message(GLOBAL)

    out = fault_mod(msg, node_context(fault="bad-shape"), Handler(_trained()))

    sent, honest = _numpy(out), _trained()
    np.testing.assert_array_equal(sent["item_emb.weight"], honest["item_emb.weight"][:-1])
    for key in ("head.bias", wire.ITEM_HOLDERS):
        np.testing.assert_array_equal(sent[key], honest[key])


def test_the_slow_fault_delays_training_and_changes_nothing_else(train_message, node_context):
    msg = train_message(GLOBAL)
    handler = Handler(_trained())
    t0 = time.monotonic()

    out = fault_mod(msg, node_context(fault="slow:0.2"), handler)

    assert handler.called_at - t0 >= 0.2, "the straggler sleeps before it trains"
    assert out is handler.reply


@pytest.mark.parametrize("fault", ["nan-update", "bad-shape", "slow:5"])
def test_a_fault_never_touches_other_messages(train_message, node_context, fault):
    msg = train_message(GLOBAL, message_type="evaluate")
    handler = Handler(_trained())
    t0 = time.monotonic()

    out = fault_mod(msg, node_context(fault=fault), handler)

    assert out is handler.reply and time.monotonic() - t0 < 1.0


def test_a_fault_leaves_an_error_reply_alone(train_message, node_context):
    handler = Handler(error=Error(code=wire.ERR_NO_TRAINING_DATA, reason="no training example"))

    out = fault_mod(train_message(GLOBAL), node_context(fault="nan-update"), handler)

    assert out is handler.reply


def test_an_unknown_fault_fails_before_training(train_message, node_context):
    handler = Handler(_trained())

    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        fault_mod(train_message(GLOBAL), node_context(fault="explode"), handler)

    assert handler.called_at is None


@pytest.mark.parametrize("fault", ["nan-update", "inf-update", "bad-shape"])
def test_in_the_apps_mod_order_the_guard_refuses_every_corrupting_fault(train_message, node_context, fault):
    app = ClientApp(mods=[update_guard_mod, fault_mod])  # clients/app.py's order, without secure aggregation
    app.train()(Handler(_trained()))
    msg = train_message(GLOBAL)

    out = app(msg, node_context(fault=fault))

    _assert_refused(out, msg)


# --- parse_fault --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [f for f in FAULTS if f != "slow"])
def test_parse_fault_names_take_no_argument(name):
    assert parse_fault(name) == (name, 0.0)


@given(seconds=st.floats(0, 1e6, allow_nan=False))
def test_parse_fault_reads_the_straggler_delay(seconds):
    assert parse_fault(f"slow:{seconds!r}") == ("slow", seconds)


@pytest.mark.parametrize("bad", ["slow", "slow:", "slow:soon", "explode", "NAN-UPDATE", ""])
def test_parse_fault_rejects_what_it_does_not_know(bad):
    with pytest.raises(ValueError, match="fault"):
        parse_fault(bad)


@pytest.mark.parametrize("bad", ["slow:-1", "slow:nan", "slow:inf"])
def test_parse_fault_rejects_a_delay_no_node_can_sleep(bad):
    # `fedmart node --fault` is checked with parse_fault at start-up; what passes must not crash every round
    with pytest.raises(ValueError, match="fault"):
        parse_fault(bad)
