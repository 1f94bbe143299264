"""One local training round at a node: policy and budget checks, (private) training, spend recorded.

The steps, in the order that makes the privacy guarantee hold:

1. The coordinator's :class:`~privacy.policy.TrainingRequest` becomes a DP-SGD config at
   the node's own δ and pinned accountant; :func:`privacy.dp.plan_training` says what the
   round will spend (noise, sampling rate, steps); :func:`privacy.policy.decide` compares the
   request with the node's :class:`~privacy.policy.NodePolicy` and the node's
   :class:`~privacy.ledger.PrivacyLedger` checks the ε after it against the policy's
   ``max_epsilon``. Either refusal ends the round for this node.
2. :func:`privacy.dp.make_private` wraps model, optimizer and loader (the same objects
   when DP is off) and :func:`clients.trainer.train_epoch_private` runs ``local_epochs``,
   stopped after ``local_steps`` optimizer steps when that is set.
3. The spend is written to the ledger (atomically) **before** the update is built, so a
   crash after release can never leave a released update unaccounted.
4. The update is post-processed for release (:mod:`clients.release`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from clients.node import NodeData, model_skeleton
from clients.release import clip_for_client_dp, with_item_holders
from clients.trainer import make_loader, make_optimizer, train_epoch_private
from conf.settings import RunSettings
from federation import wire
from federation.device import select_device
from federation.globalmodel import get_weights, set_weights
from privacy.dp import DPConfig, make_private, plan_training
from privacy.ledger import Decision, PrivacyLedger
from privacy.policy import NodePolicy, PolicyDecision, TrainingRequest, decide, policy_delta

__all__ = ["RoundResult", "dp_config", "train_round"]

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]


@dataclass
class RoundResult:
    """What a training round produced: an update to release, or the policy's or the ledger's refusal."""

    weights: Weights | None = None
    metrics: dict[str, float] | None = None
    declined: Decision | None = None  # the budget
    refused: PolicyDecision | None = None  # the policy


def dp_config(request: TrainingRequest, *, delta: float, accountant: str) -> DPConfig:
    """The request as DP-SGD at the node's own δ and accountant (``off`` when not private)."""
    if not request.is_private:
        return DPConfig(mode="off")
    return DPConfig(
        mode=request.mode,  # type: ignore[arg-type]  # validated by DPConfig
        noise_multiplier=request.noise_multiplier if request.mode == "dp" else None,
        max_grad_norm=request.max_grad_norm,
        delta=delta,
        target_epsilon=request.target_epsilon if request.mode == "target" else None,
        accountant=accountant,  # type: ignore[arg-type]
        grad_sample_mode=request.grad_sample_mode,  # type: ignore[arg-type]
        poisson_sampling=request.poisson_sampling,
    )


def train_round(
    node: NodeData,
    settings: RunSettings,
    request: TrainingRequest,
    policy: NodePolicy,
    incoming: Weights,
    *,
    server_round: int,
    run: str,
    seed: int,
) -> RoundResult:
    """Fine-tune the global weights ``incoming`` on the node's data; see the module docstring.

    ``settings`` supplies only what is not private (model shape, batch size, learning
    rate, item rows); everything DP comes from ``request`` and ``policy``. The caller has
    seeded the non-private RNGs with ``seed`` (dropout, and the loader's shuffle when DP is
    off) and made sure the node has training examples.
    """
    t0 = time.perf_counter()
    fed, max_len = settings.federation, settings.data.max_len
    epochs, max_steps = request.local_epochs, request.local_steps or None
    planned = epochs * request.planned_rounds
    ledger = PrivacyLedger(node.state_dir / "privacy-ledger.json", population_id=node.population_id)
    users = node.real_users  # canaries must not shift δ (clients/canaries.py)
    delta = ledger.pinned_delta or policy_delta(policy, users)
    if request.is_private and delta > 1.0 / max(users, 1):
        # (0, 1/n)-DP allows publishing one user's whole history: no delta may be looser.
        return RoundResult(
            refused=PolicyDecision.refuse("delta", f"delta {delta:.3g} is looser than 1/users = {1 / users:.3g}")
        )
    accountant = ledger.pinned_accountant or request.accountant
    try:
        dpc = dp_config(request, delta=delta, accountant=accountant)
    except ValueError as exc:
        return RoundResult(refused=PolicyDecision.refuse("request", f"a malformed request: {exc}"))
    model = model_skeleton(node, settings.model, max_len)
    set_weights(model, incoming)
    model.train()  # the cached skeleton may come from an evaluation; Opacus checks the mode
    dataset = node.train_dataset(max_len)
    opt = make_optimizer(model, settings.train)
    loader = make_loader(dataset, settings.train.batch_size, seed)
    history: list = []
    plan = None
    if dpc.is_private:
        plan = plan_training(dpc, data_loader=loader, epochs=epochs, total_epochs_planned=planned, max_steps=max_steps)
    verdict = decide(request, policy, noise_multiplier=plan.noise_multiplier if plan is not None else None)
    if not verdict.allowed:
        return RoundResult(refused=verdict)
    if plan is not None:
        decision = ledger.check(
            max_epsilon=policy.max_epsilon,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            delta=plan.delta,
            accountant=plan.accountant,
        )
        if not decision.allowed:
            return RoundResult(declined=decision)
        history = ledger.history
    t_setup = time.perf_counter() - t0
    device = select_device(settings.device)
    losses, steps = [], 0
    metrics: dict[str, float] = {}
    with make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        config=dpc,
        epochs=epochs,
        total_epochs_planned=planned,
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
        if pt.is_private:
            # Persist the spend before the update leaves the node (atomic write), pinning the
            # node's δ and accountant at first use: the ledger never reads with another δ.
            ledger.record(
                *pt.spent(), round=server_round, run=run, training_id=pt.training_id, delta=delta, accountant=accountant
            )
            metrics.update(
                epsilon=pt.epsilon(),
                delta=pt.delta,
                noise_multiplier=pt.noise_multiplier,
                max_epsilon=policy.max_epsilon,
            )
    if not dpc.is_private:  # under DP the exact loss is a statistic of private data outside the mechanism
        metrics["train_loss"] = float(np.mean(losses)) if losses else 0.0
    else:
        log.info("node %s: local training loss %.4f (kept on the node)", node.name, np.mean(losses) if losses else 0.0)
    # Real users only: how many canaries are in is the node's secret (clients/canaries.py).
    real_examples = len(dataset) - node.canary_users
    metrics.update(
        {
            wire.NUM_EXAMPLES: real_examples,
            "steps": steps,
            "train_seconds": time.perf_counter() - t0 - t_setup,
            "setup_seconds": t_setup,
        }
    )
    weights = get_weights(model)
    client_dp = fed.client_dp.clipping_norm if fed.client_dp.enabled else None
    if fed.item_rows == "holders":
        # Under either DP layer the holder set must not depend on the node's data.
        weights = with_item_holders(weights, incoming, node, private=dpc.is_private or client_dp is not None)
        # Every node weighs 1 in the sum, so the averaged holder vector is each item's holder
        # *count* over the number of nodes: with distinct weights, the coordinator could
        # decode from the averaged shares which nodes hold which items (subset sums).
        metrics.update({wire.NUM_EXAMPLES: 1, "users_trained": real_examples})
    if client_dp is not None:
        # Every node weighs the same: a weight that depended on the node's size would
        # change the sum's sensitivity.
        weights = clip_for_client_dp(weights, incoming, max_norm=client_dp, node_name=node.name)
        metrics.update({wire.NUM_EXAMPLES: 1, "users_trained": real_examples})
    return RoundResult(weights=weights, metrics=metrics)
