"""The node's ClientApp (Flower Message API). This file only wires; the work is in
:mod:`clients.local_round` (a training round), :mod:`clients.node` (data and state) and
:mod:`clients.trainer` (training and evaluation loops).

* ``train``: load the received global weights, fine-tune for ``local_epochs`` on the
  node's own sequences, reply with the new weights and the number of users trained;
* ``evaluate``: score the global model on the node's held-out items (leave-one-out);
* ``query.hello``: tell the coordinator the node's name and how much data it has;
* ``query.audit``: after the run, the node's own privacy audit of the final model with its
  canary users, when its policy has one (:mod:`clients.audit_round`).

Settings enter here and only here: the run config as :class:`conf.settings.RunSettings`
(model shape, batch, learning rate: nothing the node's privacy rests on), each TRAIN
message's :class:`privacy.policy.TrainingRequest` (what the coordinator asks, round by
round), and the node's own ``node_config`` as :class:`conf.settings.NodeSettings` with
its :class:`privacy.policy.NodePolicy` (what the node decides). The request and the
policy meet in :func:`privacy.policy.decide`, inside :func:`clients.local_round.train_round`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.audit_round import audit_node
from clients.canaries import with_canaries
from clients.canary_node import CanaryNode, canary_dir, is_canary_node
from clients.guard import fault_mod, update_guard_mod
from clients.local_round import train_round
from clients.node import NodeData, NodeRefused, check_catalog, load_node, model_skeleton
from clients.node_policy import demo_identity, policy_secagg_mod, refuse, resolve_identity, resolve_policy
from clients.trainer import evaluate, seed_everything
from conf.settings import NodeSettings, RunSettings
from federation import wire
from federation.device import select_device
from federation.globalmodel import set_weights
from federation.runconfig import unflatten
from privacy.policy import NodePolicy, TrainingRequest
from privacy.secagg import make_secagg_mod
from privacy.secagg.identity import NodeIdentity

__all__ = ["app", "build_client_app", "arrays_to_numpy", "numpy_to_arrays", "round_seed"]

log = logging.getLogger(__name__)


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def release_key(seed: int, incoming: dict[str, np.ndarray], request: TrainingRequest) -> str:
    """What decides a non-private update: the round seed, the incoming weights and the request."""
    h = hashlib.sha256(f"{seed}:{sorted(request.to_config().items())}".encode())
    for key in sorted(incoming):
        h.update(key.encode())
        h.update(np.ascontiguousarray(incoming[key]).tobytes())
    return h.hexdigest()


def round_seed(seed: int, server_round: int, node_name: str) -> int:
    """Per (run seed, round, node) seed: a resumed run repeats the same local training."""
    digest = hashlib.sha256(f"{seed}:{server_round}:{node_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def local_train(msg: Message, node: NodeData, policy: NodePolicy, settings: RunSettings) -> Message:
    cfg = msg.content[wire.CONFIG]
    server_round = int(cfg[wire.SERVER_ROUND])
    run = str(cfg.get(wire.RUN, "") or "run")
    try:
        request = TrainingRequest.from_config(cfg)
    except ValueError as exc:
        return refuse(msg, f"policy.request: {exc}")
    # A round asked again (a restarted coordinator, or one that replays) is trained again,
    # with fresh DP randomness and a fresh spend in the ledger: the node never puts the
    # same update into two secure sums, whose difference would reveal it exactly. Without
    # DP a retraining repeats the same update (the run seed and the incoming weights decide
    # it, whatever the run is called), so a non-private node declines what it already released.
    try:
        # The node's canaries (its own policy) train like real users; see clients/canaries.py.
        node = with_canaries(node, policy.audit, settings.data.max_len)
    except ValueError as exc:
        return refuse(msg, f"policy.audit: node {node.name}: {exc}")
    seed = round_seed(settings.seed, server_round, node.name)
    incoming = arrays_to_numpy(msg.content[wire.ARRAYS])
    release = release_key(seed, incoming, request) if not request.is_private else None
    if release is not None and node.released(release):
        return refuse(
            msg,
            f"policy.require_dp: node {node.name} trains without DP and already released this update (round "
            f"{server_round}, the same weights); a second secure sum with it would reveal it",
        )
    seed_everything(seed)
    if len(node.train_dataset(settings.data.max_len)) == 0:
        # A silo can be too thin (a rare genre: every user has < 2 events left after the
        # held-out ones). Say so instead of failing inside the data loader.
        users = node.split.train.num_users
        reason = f"node {node.name} has no training example: none of its {users} users has 2 training events"
        log.warning(reason)
        return Message(Error(code=wire.ERR_NO_TRAINING_DATA, reason=reason), reply_to=msg)
    result = train_round(node, settings, request, policy, incoming, server_round=server_round, run=run, seed=seed)
    if result.refused is not None:
        return refuse(msg, f"node {node.name}: {result.refused.reason}")
    if result.declined is not None:
        d = result.declined
        # max_epsilon: the node's own budget, so that the coordinator's report can state it even for
        # a node that declined every round it was asked (it is no secret: it is in every round's metrics).
        reason = {"code": d.code, "message": d.reason, "node": node.name, "epsilon_now": d.epsilon_now,
                  "epsilon_after": d.epsilon_after, "max_epsilon": policy.max_epsilon}  # fmt: skip
        log.warning("node %s declines: %s", node.name, d.reason)
        return Message(Error(code=wire.ERR_DECLINED, reason=json.dumps(reason)), reply_to=msg)
    assert result.weights is not None and result.metrics is not None
    if release is not None:
        node.record_release(release)
    log.info(
        "node %s: trained round %d of run %s (epsilon %s)",
        node.name,
        server_round,
        run,
        f"{result.metrics['epsilon']:.4f}" if "epsilon" in result.metrics else "n/a, no DP",
    )
    return _train_reply(msg, result.weights, result.metrics)


def _train_reply(msg: Message, weights: dict[str, np.ndarray], metrics: dict[str, float]) -> Message:
    content = RecordDict({wire.ARRAYS: numpy_to_arrays(weights), wire.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def local_evaluate(msg: Message, node: NodeData, policy: NodePolicy, settings: RunSettings) -> Message:
    if policy.evaluation != "plain":
        # Exact metrics on held-out users, for any weights the coordinator chooses, are an
        # unlimited query oracle on the node's data; the default policy does not answer.
        return refuse(
            msg,
            f"policy.evaluation: node {node.name} does not answer federated evaluation "
            f"(evaluation: {policy.evaluation}); set evaluation: plain in its policy to allow exact metrics",
        )
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


def local_audit(msg: Message, node: NodeData, policy: NodePolicy, settings: RunSettings) -> Message:
    if not policy.audit.enabled:
        return refuse(msg, f"policy.audit: node {node.name} has no canaries (audit.canaries: 0)")
    try:
        result = audit_node(node, policy, settings, arrays_to_numpy(msg.content[wire.ARRAYS]))
    except ValueError as exc:
        return refuse(msg, f"policy.audit: node {node.name}: {exc}")
    if "mia_auc" in result and policy.evaluation != "plain":
        # An exact statistic of real users' losses, for weights the coordinator picks: the same
        # query oracle as plain evaluation, so it leaves the node only where its policy allows that.
        log.info("node %s: membership AUC %.4f (kept on the node: evaluation %s)", node.name,
                 result.pop("mia_auc"), policy.evaluation)  # fmt: skip
        result.pop("mia_users", None)
    metrics = {k: v for k, v in result.items() if isinstance(v, int | float)}
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


def hello(msg: Message, node: NodeData, policy: NodePolicy, settings: RunSettings) -> Message:
    info = ConfigRecord(
        {
            "name": node.name,
            "dataset-id": node.population_id,  # random: a content hash would allow a confirmation attack
            "evaluation": policy.evaluation,
            # Whether the node audits itself, never how many canaries are in.
            "audit": bool(policy.audit.enabled),
            "users": int(node.real_users),
            "events": int(len(node.interactions)),
            "catalog-version": node.catalog.version,
            **ledger_summary(node, policy),
        }
    )
    return Message(RecordDict({"node": info}), reply_to=msg)


def ledger_summary(node: NodeData, policy: NodePolicy) -> dict[str, Any]:
    """What the node's ledger already holds: ε spent (at its pinned δ and accountant), its budget, runs.

    The coordinator learns the same from each round's metrics; saying it in ``hello`` lets it warn,
    before anything trains, that a new run from scratch spends on top of earlier ones.
    """
    from privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(node.state_dir / "privacy-ledger.json", population_id=node.population_id)
    out: dict[str, Any] = {"budget-epsilon": float(policy.max_epsilon), "spent-epsilon": 0.0, "spent-runs": 0}
    if ledger.entries and ledger.pinned_delta is not None:
        out["spent-epsilon"] = float(ledger.epsilon(ledger.pinned_delta, accountant=ledger.pinned_accountant or "rdp"))
        out["spent-runs"] = len({e.run for e in ledger.entries})
    return out


def _canary(kind: str, msg: Message, node_cfg: NodeSettings, settings: RunSettings) -> Message:
    """A simulated canary node's answer (clients/canary_node.py): it holds no data."""
    canary = CanaryNode(canary_dir(node_cfg, settings))
    if kind == "train":
        incoming = arrays_to_numpy(msg.content[wire.ARRAYS])
        weights = canary.train(incoming, settings.federation.client_dp.clipping_norm)
        return _train_reply(msg, weights, {wire.NUM_EXAMPLES: 1, "canary_node": 1})
    if kind == "audit":
        if not canary.trained:
            return refuse(msg, f"policy.audit: {canary.name} was never sampled: no reference model to score against")
        score = canary.score(arrays_to_numpy(msg.content[wire.ARRAYS]))
        metrics = {"canary_node": 1, "canary_in": int(canary.included), "canary_score": score}
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)
    if kind == "hello":
        info = {"name": canary.name, "dataset-id": canary.population_id, "evaluation": "decline", "audit": True,
                "canary-node": True, "users": 0, "events": 0, "catalog-version": ""}  # fmt: skip
        return Message(RecordDict({"node": ConfigRecord(info)}), reply_to=msg)
    return refuse(msg, f"policy.evaluation: {canary.name} is a canary node and holds no data to evaluate")


def _guarded(handler, fixed: dict[str, Any] | None, policy_of):
    """Validate the settings, load the node, and turn a refusal (bad data) into an error reply."""
    kind = {local_train: "train", local_evaluate: "evaluate", hello: "hello", local_audit: "audit"}[handler]

    def run(msg: Message, context: Context) -> Message:
        settings = RunSettings.from_dict(unflatten(fixed if fixed is not None else dict(context.run_config)))
        node_cfg = NodeSettings.from_node_config(dict(context.node_config))
        if is_canary_node(node_cfg, settings):
            return _canary(kind, msg, node_cfg, settings)
        try:
            node = load_node(node_cfg, settings)
            check_catalog(node, settings.sim.catalog_version)  # at join (hello) and on every message after
            return handler(msg, node, policy_of(context), settings)
        except NodeRefused as exc:
            log.error("node refuses to take part: %s", exc)
            return Message(Error(code=wire.ERR_BAD_DATA, reason=str(exc)), reply_to=msg)

    return run


def build_client_app(
    fixed_run_config: dict[str, Any] | None = None,
    node_policy: dict[str, Any] | None = None,
    node_identity: dict[str, Any] | None = None,
) -> ClientApp:
    """The ClientApp.

    ``fixed_run_config`` replaces ``context.run_config`` (in-process simulation).
    ``node_policy`` is the simulated nodes' own policy (``conf/node/``): it stands in for the
    policy file a deployed node reads (``fedmart node --policy``), and never comes from the
    coordinator. ``node_identity`` is the simulated nodes' roster and where their own roster
    keys are (``{"roster": path, "nodes-dir": dir}``, made per run by ``fedmart simulate``): it
    stands in for ``fedmart node --roster --roster-key``.
    """

    def policy_of(context: Context) -> NodePolicy:
        return resolve_policy(NodeSettings.from_node_config(dict(context.node_config)), node_policy)

    def identity_of(context: Context) -> NodeIdentity | None:
        node = NodeSettings.from_node_config(dict(context.node_config))
        policy = policy_of(context)
        identity = resolve_identity(node, policy, node_identity)
        if identity is None and node_identity is None and not node.data_dir:
            settings = RunSettings.from_dict(unflatten(fixed_run_config or dict(context.run_config)))
            if not settings.sim.nodes_dir:  # `flwr run .` on the built-in synthetic data (clients/node.py)
                return demo_identity(settings.seed, node.num_partitions, node.partition_id, policy.secagg_threat_model)
        return identity

    # policy_secagg_mod refuses a plain TRAIN message when the node's policy requires secure
    # aggregation, and a semi-honest session when it demands the active mode. The secagg mod
    # (with the node's own roster identity) answers the secure-aggregation stages and masks the training
    # reply. update_guard_mod refuses to send a malformed update (NaN/Inf, shape, dtype,
    # range): under secure aggregation only the node can still check the values. fault_mod is
    # test-only and a no-op unless the node's own config sets `fault` (clients/guard.py).
    client_app = ClientApp(
        mods=[policy_secagg_mod(policy_of), make_secagg_mod(identity_of), update_guard_mod, fault_mod]
    )
    client_app.train()(_guarded(local_train, fixed_run_config, policy_of))
    client_app.evaluate()(_guarded(local_evaluate, fixed_run_config, policy_of))
    client_app.query("hello")(_guarded(hello, fixed_run_config, policy_of))
    client_app.query("audit")(_guarded(local_audit, fixed_run_config, policy_of))
    return client_app


app = build_client_app()
