"""The node's ClientApp (Flower Message API). This file only wires; the work is in
:mod:`clients.local_round` (a training round), :mod:`clients.node` (data and state) and
:mod:`clients.trainer` (training and evaluation loops).

* ``train``: load the received global weights, fine-tune for ``local_epochs`` on the
  node's own sequences, reply with the new weights and the number of users trained;
* ``evaluate``: score the global model on the node's held-out items (leave-one-out);
* ``query.hello``: tell the coordinator the node's name and how much data it has.

Settings enter here and only here: the run config (the coordinator's request) as
:class:`conf.settings.RunSettings`, the node's own ``node_config`` as
:class:`conf.settings.NodeSettings`; both are validated once per message.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.guard import fault_mod, update_guard_mod
from clients.local_round import train_round
from clients.node import NodeData, NodeRefused, ReplyCache, load_node, model_skeleton
from clients.trainer import evaluate, seed_everything
from conf.settings import NodeSettings, RunSettings
from federation import wire
from federation.device import select_device
from federation.globalmodel import set_weights
from federation.runconfig import unflatten
from privacy.secagg import secagg_mod

__all__ = ["app", "build_client_app", "arrays_to_numpy", "numpy_to_arrays", "round_seed", "node_budget"]

log = logging.getLogger(__name__)

DEFAULT_NODE_MAX_EPSILON = 10.0  # a deployed node that configured no budget gets this one


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def round_seed(seed: int, server_round: int, node_name: str) -> int:
    """Per (run seed, round, node) seed: a resumed run repeats the same local training."""
    digest = hashlib.sha256(f"{seed}:{server_round}:{node_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def node_budget(node: NodeSettings, settings: RunSettings) -> float | None:
    """The node's own ``max_epsilon``.

    In a deployment (the node has its own ``data-dir``) only the node's config counts
    (``--max-epsilon`` of ``fedmart node``): whatever the coordinator sends is ignored. In
    simulation the run's ``privacy.max_epsilon`` stands in for every simulated node's config.
    """
    if node.data_dir:
        value = node.max_epsilon if node.max_epsilon is not None else DEFAULT_NODE_MAX_EPSILON
    else:
        value = settings.privacy.max_epsilon
    return None if value is None or value == float("inf") else float(value)


def local_train(msg: Message, node: NodeData, node_cfg: NodeSettings, settings: RunSettings) -> Message:
    cfg = msg.content[wire.CONFIG]
    server_round = int(cfg[wire.SERVER_ROUND])
    run = str(cfg.get(wire.RUN, "") or "run")
    replay = ReplyCache(node.state_dir / "replies")
    incoming = arrays_to_numpy(msg.content[wire.ARRAYS])
    cached = replay.get(run, server_round, incoming)
    if cached is not None:
        # A restarted coordinator asks again for a round this node already answered: send
        # the same (already released) update. Re-sending costs no privacy; retraining would.
        log.info("node %s: replaying its round-%d update of run %s", node.name, server_round, run)
        return _train_reply(msg, *cached)
    seed = round_seed(settings.seed, server_round, node.name)
    seed_everything(seed)
    if len(node.train_dataset(settings.data.max_len)) == 0:
        # A silo can be too thin (a rare genre: every user has < 2 events left after the
        # held-out ones). Say so instead of failing inside the data loader.
        users = node.split.train.num_users
        reason = f"node {node.name} has no training example: none of its {users} users has 2 training events"
        log.warning(reason)
        return Message(Error(code=wire.ERR_NO_TRAINING_DATA, reason=reason), reply_to=msg)
    result = train_round(
        node,
        settings,
        incoming,
        server_round=server_round,
        run=run,
        budget=node_budget(node_cfg, settings),
        seed=seed,
    )
    if result.declined is not None:
        d = result.declined
        reason = {"code": d.code, "message": d.reason, "node": node.name,
                  "epsilon_now": d.epsilon_now, "epsilon_after": d.epsilon_after}  # fmt: skip
        log.warning("node %s declines: %s", node.name, d.reason)
        return Message(Error(code=wire.ERR_DECLINED, reason=json.dumps(reason)), reply_to=msg)
    assert result.weights is not None and result.metrics is not None
    replay.put(run, server_round, incoming, result.weights, result.metrics)
    return _train_reply(msg, result.weights, result.metrics)


def _train_reply(msg: Message, weights: dict[str, np.ndarray], metrics: dict[str, float]) -> Message:
    content = RecordDict({wire.ARRAYS: numpy_to_arrays(weights), wire.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def local_evaluate(msg: Message, node: NodeData, node_cfg: NodeSettings, settings: RunSettings) -> Message:
    device = select_device(settings.device)
    model = model_skeleton(node, settings.model, settings.data.max_len)
    set_weights(model, arrays_to_numpy(msg.content[wire.ARRAYS]))
    model.to(device)
    val = evaluate(model, node.split, "valid", device)
    test = evaluate(model, node.split, "test", device)
    metrics = {
        wire.NUM_EXAMPLES: int(test["users"]),
        "valid_ndcg@10": val["ndcg@10"],
        "valid_hr@10": val["hr@10"],
        "test_ndcg@10": test["ndcg@10"],
        "test_hr@10": test["hr@10"],
    }
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


def hello(msg: Message, node: NodeData, node_cfg: NodeSettings, settings: RunSettings) -> Message:
    info = ConfigRecord(
        {
            "name": node.name,
            "dataset-id": node.dataset_id,
            "users": int(node.interactions.num_users),
            "events": int(len(node.interactions)),
            "catalog-version": node.catalog.version,
        }
    )
    return Message(RecordDict({"node": info}), reply_to=msg)


def _guarded(handler, fixed: dict[str, Any] | None):
    """Validate the settings, load the node, and turn a refusal (bad data) into an error reply."""

    def run(msg: Message, context: Context) -> Message:
        settings = RunSettings.from_dict(unflatten(fixed if fixed is not None else dict(context.run_config)))
        node_cfg = NodeSettings.from_node_config(dict(context.node_config))
        try:
            return handler(msg, load_node(node_cfg, settings), node_cfg, settings)
        except NodeRefused as exc:
            log.error("node refuses to take part: %s", exc)
            return Message(Error(code=wire.ERR_BAD_DATA, reason=str(exc)), reply_to=msg)

    return run


def build_client_app(fixed_run_config: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``fixed_run_config`` replaces ``context.run_config`` (in-process simulation)."""
    # secagg_mod answers the secure-aggregation stages and masks the training reply when
    # the coordinator runs secure aggregation; other messages pass through untouched.
    # update_guard_mod refuses to send a malformed update (NaN/Inf, shape, dtype, range): under
    # secure aggregation only the node can still check the values. fault_mod is test-only and
    # a no-op unless the node's own config sets `fault` (clients/guard.py).
    client_app = ClientApp(mods=[secagg_mod, update_guard_mod, fault_mod])
    client_app.train()(_guarded(local_train, fixed_run_config))
    client_app.evaluate()(_guarded(local_evaluate, fixed_run_config))
    client_app.query("hello")(_guarded(hello, fixed_run_config))
    return client_app


app = build_client_app()
