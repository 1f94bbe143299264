"""One local training round at a node: budget check, (private) training, spend recorded, update built.

The steps, in the order that makes the privacy guarantee hold:

1. With DP on, :func:`privacy.dp.plan_training` says what the round will spend (noise,
   sampling rate, steps) and the node's :class:`~privacy.ledger.PrivacyLedger` checks the
   ε after it against the node's own ``max_epsilon``; over budget, the node declines.
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

__all__ = ["RoundResult", "dp_config", "train_round"]

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]


@dataclass
class RoundResult:
    """What a training round produced: an update to release, or the ledger's refusal."""

    weights: Weights | None = None
    metrics: dict[str, float] | None = None
    declined: Decision | None = None


def dp_config(settings: RunSettings) -> DPConfig:
    """The privacy group of the run config as the mechanism's validated :class:`DPConfig`."""
    return DPConfig.from_mapping(settings.privacy.dp_fields())


def train_round(
    node: NodeData,
    settings: RunSettings,
    incoming: Weights,
    *,
    server_round: int,
    run: str,
    budget: float | None,
    seed: int,
) -> RoundResult:
    """Fine-tune the global weights ``incoming`` on the node's data; see the module docstring.

    The caller has seeded the RNGs with ``seed`` (which also shuffles the loader) and made
    sure the node has training examples.
    """
    t0 = time.perf_counter()
    fed, max_len = settings.federation, settings.data.max_len
    epochs, max_steps = fed.local_epochs, fed.max_steps
    planned = epochs * fed.num_rounds
    dpc = dp_config(settings)
    model = model_skeleton(node, settings.model, max_len)
    set_weights(model, incoming)
    model.train()  # the cached skeleton may come from an evaluation; Opacus checks the mode
    dataset = node.train_dataset(max_len)
    opt = make_optimizer(model, settings.train)
    loader = make_loader(dataset, settings.train.batch_size, seed)
    ledger = None
    history: list = []
    if dpc.is_private:
        ledger = PrivacyLedger(node.state_dir / "privacy-ledger.json", dataset_id=node.dataset_id)
        plan = plan_training(dpc, data_loader=loader, epochs=epochs, total_epochs_planned=planned, max_steps=max_steps)
        decision = ledger.check(
            max_epsilon=budget,
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
            assert ledger is not None
            # Persist the spend before the update leaves the node (atomic write).
            ledger.record(*pt.spent(), round=server_round, run=run, training_id=pt.training_id)
            metrics.update(epsilon=pt.epsilon(), delta=pt.delta, noise_multiplier=pt.noise_multiplier)
    metrics.update(
        {
            wire.NUM_EXAMPLES: len(dataset),
            "train_loss": float(np.mean(losses)) if losses else 0.0,
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
    if client_dp is not None:
        # Every node weighs the same: a weight that depended on the node's size would
        # change the sum's sensitivity.
        weights = clip_for_client_dp(weights, incoming, max_norm=client_dp, node_name=node.name)
        metrics.update({wire.NUM_EXAMPLES: 1, "users_trained": len(dataset)})
    return RoundResult(weights=weights, metrics=metrics)
