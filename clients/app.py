"""The node's ClientApp (Flower Message API). This file only wires; the work is in
:mod:`clients.node` (data) and :mod:`clients.trainer` (training and evaluation).

* ``train``: load the received global weights, fine-tune for ``local_epochs`` on the
  node's own sequences, reply with the new weights and the number of users trained;
* ``evaluate``: score the global model on the node's held-out items (leave-one-out);
* ``query.hello``: tell the coordinator the node's name and how much data it has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.guard import fault_mod, update_guard_mod
from clients.node import NodeData, NodeRefused, ReplyCache, load_node, model_skeleton
from clients.trainer import (
    OptimConfig,
    evaluate,
    make_loader,
    make_optimizer,
    seed_everything,
    train_epoch_private,
)
from federation import wire
from federation.device import select_device
from federation.globalmodel import get_weights, set_weights
from federation.runconfig import unflatten
from privacy.client_dp import clip_update
from privacy.dp import DPConfig, make_private, plan_training
from privacy.ledger import PrivacyLedger
from privacy.secagg import secagg_mod

__all__ = ["app", "build_client_app"]

log = logging.getLogger(__name__)

DEFAULT_NODE_MAX_EPSILON = 10.0  # a deployed node that configured no budget gets this one


def _settings(context: Context, fixed: dict[str, Any] | None) -> dict[str, Any]:
    return unflatten(fixed if fixed is not None else dict(context.run_config))


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def round_seed(seed: int, server_round: int, node_name: str) -> int:
    """Per (run seed, round, node) seed: a resumed run repeats the same local training."""
    digest = hashlib.sha256(f"{seed}:{server_round}:{node_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _node(context: Context, settings: dict[str, Any]) -> NodeData:
    return load_node(dict(context.node_config), settings)


def dp_config(settings: dict[str, Any]) -> DPConfig:
    """The privacy group of the run config as a validated :class:`DPConfig` (off when absent)."""
    return DPConfig.from_mapping(settings.get("privacy") or {})


def node_budget(context: Context, settings: dict[str, Any]) -> float | None:
    """The node's own ``max_epsilon``.

    In a deployment (the node has its own ``data-dir``) only the node's config counts
    (``--max-epsilon`` of ``fedmart node``): whatever the coordinator sends is ignored. In
    simulation the run's ``privacy.max_epsilon`` stands in for every simulated node's config.
    """
    if context.node_config.get("data-dir"):
        value = context.node_config.get("max-epsilon", DEFAULT_NODE_MAX_EPSILON)
    else:
        value = (settings.get("privacy") or {}).get("max_epsilon")
    return None if value in (None, "", "inf") else float(value)


def _declined(msg: Message, decision, node: NodeData) -> Message:
    reason = {"code": decision.code, "message": decision.reason, "node": node.name,
              "epsilon_now": decision.epsilon_now, "epsilon_after": decision.epsilon_after}  # fmt: skip
    log.warning("node %s declines: %s", node.name, decision.reason)
    return Message(Error(code=wire.ERR_DECLINED, reason=json.dumps(reason)), reply_to=msg)


def local_train(msg: Message, context: Context, settings: dict[str, Any]) -> Message:
    t0 = time.perf_counter()
    node = _node(context, settings)
    cfg = msg.content[wire.CONFIG]
    server_round = int(cfg[wire.SERVER_ROUND])
    run = str(cfg.get(wire.RUN, "") or "run")
    fed, data_cfg = settings["federation"], settings["data"]
    epochs = int(fed["local_epochs"])
    max_steps = int(fed.get("local_steps") or 0) or None  # 0: whole epochs
    device = select_device(str(settings.get("device", "auto")))
    dpc = dp_config(settings)
    replay = ReplyCache(node.state_dir / "replies")
    incoming = arrays_to_numpy(msg.content[wire.ARRAYS])
    cached = replay.get(run, server_round, incoming)
    if cached is not None:
        # A restarted coordinator asks again for a round this node already answered: send
        # the same (already released) update. Re-sending costs no privacy; retraining would.
        log.info("node %s: replaying its round-%d update of run %s", node.name, server_round, run)
        weights, metrics = cached
        return _train_reply(msg, weights, metrics)
    seed = round_seed(int(settings.get("seed", 0)), server_round, node.name)
    seed_everything(seed)
    model = model_skeleton(node, settings["model"], int(data_cfg["max_len"]))
    set_weights(model, incoming)
    model.train()  # the cached skeleton may come from an evaluation; Opacus checks the mode
    dataset = node.train_dataset(int(data_cfg["max_len"]))
    if len(dataset) == 0:
        # A silo can be too thin (a rare genre: every user has < 2 events left after the
        # held-out ones). Say so instead of failing inside the data loader.
        users = node.split.train.num_users
        reason = f"node {node.name} has no training example: none of its {users} users has 2 training events"
        log.warning(reason)
        return Message(Error(code=wire.ERR_NO_TRAINING_DATA, reason=reason), reply_to=msg)
    optim = OptimConfig(**settings["train"])
    opt = make_optimizer(model, optim)
    loader = make_loader(dataset, optim.batch_size, seed)
    ledger = None
    history: list = []
    if dpc.is_private:
        ledger = PrivacyLedger(node.state_dir / "privacy-ledger.json", dataset_id=node.dataset_id)
        plan = plan_training(
            dpc,
            data_loader=loader,
            epochs=epochs,
            total_epochs_planned=epochs * int(fed["num_rounds"]),
            max_steps=max_steps,
        )
        decision = ledger.check(
            max_epsilon=node_budget(context, settings),
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            delta=plan.delta,
            accountant=plan.accountant,
        )
        if not decision.allowed:
            return _declined(msg, decision, node)
        history = ledger.history
    t_setup = time.perf_counter() - t0
    losses, steps = [], 0
    with make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        config=dpc,
        epochs=epochs,
        total_epochs_planned=epochs * int(fed["num_rounds"]),
        accountant_history=history,
        device=device,
        max_steps=max_steps,
    ) as pt:
        for _ in range(epochs):
            left = None if max_steps is None else max_steps - steps
            if left is not None and left <= 0:
                break
            stats = train_epoch_private(pt, device, max_steps=left)
            losses.append(stats["loss"])
            steps += stats["steps"]
        metrics: dict[str, float] = {}
        if pt.is_private:
            # Persist the spend before the update leaves the node (atomic write).
            ledger.record(*pt.spent(), round=server_round, run=run, training_id=pt.training_id)
            metrics.update(epsilon=pt.epsilon(), delta=pt.delta, noise_multiplier=pt.noise_multiplier)
    t_train = time.perf_counter() - t0 - t_setup
    metrics.update(
        {
            wire.NUM_EXAMPLES: len(dataset),
            "train_loss": float(np.mean(losses)) if losses else 0.0,
            "steps": steps,
            "train_seconds": t_train,
            "setup_seconds": t_setup,
        }
    )
    weights = get_weights(model)
    client_dp = client_dp_clip(fed)
    if wire.ITEM_HOLDERS in incoming:
        # Under either DP layer the holder set must not depend on the node's data.
        weights = with_item_holders(weights, incoming, node, private=dpc.is_private or client_dp is not None)
    if client_dp is not None:
        # Client-level DP (privacy/client_dp.py): the node bounds its contribution to the sum
        # (the coordinator adds the noise) and every node weighs the same: a weight that
        # depended on the node's size would change the sum's sensitivity.
        update, norm = clip_update(
            {k: weights[k] - incoming[k] for k in weights if k in incoming and k != wire.ITEM_HOLDERS},
            max_norm=client_dp,
        )
        weights = {k: incoming[k] + update[k] if k in update else v for k, v in weights.items()}
        log.info("node %s: update norm %.4g clipped to %g (client-level DP)", node.name, norm, client_dp)
        metrics.update({wire.NUM_EXAMPLES: 1, "users_trained": len(dataset)})
    replay.put(run, server_round, incoming, weights, metrics)
    return _train_reply(msg, weights, metrics)


def client_dp_clip(fed: dict[str, Any]) -> float | None:
    """The clipping norm C of client-level DP (``federation.client_dp``), None when it is off."""
    c = fed.get("client_dp") or {}
    return float(c["clipping_norm"]) if c.get("enabled") else None


def item_holders(node: NodeData, private: bool) -> np.ndarray:
    """Which item rows this node's update speaks for (1.0) — see federation/aggregation.py.

    Without DP: the items in the node's training data. With DP the set must not depend on
    private data, so it comes from the public catalog: the items of the department the node
    is named after (department silos), else every item (plain FedAvg on item rows).
    """
    rows = len(node.catalog.item_id) + 1
    if not private:
        held = np.zeros(rows, dtype=np.float32)
        held[node.split.train.items] = 1.0
        return held
    own = np.asarray(node.catalog.department).astype(str) == node.name
    if own.any():  # a department node: its department's items
        return np.concatenate([[0.0], own]).astype(np.float32)
    return np.ones(rows, dtype=np.float32)


def with_item_holders(
    weights: dict[str, np.ndarray], incoming: dict[str, np.ndarray], node: NodeData, *, private: bool
) -> dict[str, np.ndarray]:
    """The update plus its ``ITEM_HOLDERS`` array.

    The item rows outside the holder set are reset to the incoming global rows: a node
    speaks only for the items it holds, so the coordinator's holder-normalised mean of a
    row is a convex combination of its holders' updates and never amplifies anyone's.
    (Keeping non-holders' head updates and dividing them by the holders' share diverged
    on MovieLens genre silos, where a rare item's holders carry a tiny share.) Under DP the
    set is public, so the reset is post-processing with no privacy cost.
    """
    held = item_holders(node, private)
    out = dict(weights)
    outside = held == 0
    for key in wire.ITEM_ROW_KEYS:
        if key in out:
            out[key] = out[key].copy()
            out[key][outside] = incoming[key][outside]
    out[wire.ITEM_HOLDERS] = held
    return out


def _train_reply(msg: Message, weights: dict[str, np.ndarray], metrics: dict[str, float]) -> Message:
    content = RecordDict({wire.ARRAYS: numpy_to_arrays(weights), wire.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def local_evaluate(msg: Message, context: Context, settings: dict[str, Any]) -> Message:
    node = _node(context, settings)
    device = select_device(str(settings.get("device", "auto")))
    model = model_skeleton(node, settings["model"], int(settings["data"]["max_len"]))
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


def hello(msg: Message, context: Context, settings: dict[str, Any]) -> Message:
    node = _node(context, settings)
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
    """Turn a node's refusal (bad data) into a machine-readable error reply, not a crash."""

    def run(msg: Message, context: Context) -> Message:
        settings = _settings(context, fixed)
        try:
            return handler(msg, context, settings)
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
