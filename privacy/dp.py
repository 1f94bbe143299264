"""DP-SGD for a node's local training: one façade over Opacus, the same object in every mode.

``make_private(...)`` takes the module, optimizer and data loader a node would train
with and returns a :class:`PrivateTraining` that holds their private counterparts
(Opacus's ``GradSampleModule``, ``DPOptimizer``, Poisson ``DPDataLoader``), the loss
function to call on the model's per-example loss, and the accountant. With
``mode="off"`` it returns the originals in the same shape of object, so the training
loop never branches on privacy::

    with make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1) as pt:
        for x, y in pt.data_loader:
            if len(x) == 0:          # Poisson sampling drew nobody: a noise-only step
                pt.noise_step()
                continue
            pt.optimizer.zero_grad(set_to_none=True)
            _, per_example = pt.module(x, y, reduction="none")   # (b,)
            loss = pt.loss_fn(per_example)
            loss.backward()
            pt.optimizer.step()
    ledger.record(*pt.spent(), round=r, run=run_id, training_id=pt.training_id)

This module is the public entry point and re-exports what a caller needs. The parts live
beside it, one concern each: :mod:`privacy.dp_config` (``DPConfig``, the modes),
:mod:`privacy.dp_plan` (``plan_training``: what a training will spend, for the ledger's
check), :mod:`privacy.dp_training` (``PrivateTraining``), :mod:`privacy.dp_losses` (the
per-example loss per mode), :mod:`privacy.dp_engine` (Opacus's engine and step counting)
and :mod:`privacy.dp_bk` (mode ``bk``: one-pass clipping inside Opacus).

The guarantee and the assumptions it rests on
---------------------------------------------
**Unit of privacy.** One example of ``data_loader.dataset`` must be *all* the data of
one person at this node (in fedmart: one user's whole interaction history at the
node, ``clients.sequences.TrainDataset``). Opacus bounds the influence of one
*example*; only because one example is one user is that a per-user guarantee. If a
user had several examples (e.g. one per session) the guarantee would degrade to a
group guarantee of that size.

**Mechanism.** Every step draws a batch by Poisson sampling (each user independently
with probability ``sample_rate``), clips each user's gradient to L2 norm
``max_grad_norm`` (over all trainable parameters, flat clipping), sums, and adds
Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm``. A step on an
empty batch still releases noise (:meth:`PrivateTraining.noise_step`): skipping it would
leak that nobody was sampled. The RDP (default) or PRV accountant composes the steps
into ``(epsilon, delta)``-DP under add/remove-one-user adjacency.

**What is protected, against whom.** Everything computed from the node's data during
training (every intermediate model, hence the update sent to the coordinator and any
model derived from it) is ``(epsilon, delta)``-DP with respect to any one user of the
node, against an adversary who sees all of it, including the coordinator and other
nodes. Post-processing (averaging, secure aggregation, serving) cannot weaken it.
Metrics computed on the data *outside* DP-SGD (a training loss reported in plain
text, evaluation on held-out items) are *not* covered; report them only aggregated
or accept that they leak.

**What composes.** Successive trainings on the same dataset compose: the node's
:class:`privacy.ledger.PrivacyLedger` keeps the whole history and its epsilon is the
user's total at this node. Across nodes, if a user's data lives at only one node
(merchant silos keyed by user), the federation's guarantee for that user is that
node's epsilon (parallel composition). If one person's data is spread over several
nodes (department silos), that person's guarantee is the composition of the per-node
guarantees: at most the *sum* of those nodes' epsilons (and deltas).

**Sampling.** ``poisson_sampling=False`` keeps the caller's shuffled loader; the
accountant's numbers then assume a sampling scheme that was not used and are an
approximation, not a guarantee (a warning is logged).

**Randomness.** Poisson sampling and noise come from two generators seeded from
``os.urandom`` for every training (:class:`~privacy.dp_engine.PrivateRandomness`), never
from the run seed or PyTorch's global generator: whoever knows the run seed (the
coordinator) can neither recompute which users a step sampled nor predict the noise, and
a retrained round draws fresh noise. ``secure_rng=True`` uses Opacus's secure mode
instead (a CSPRNG; needs ``torchcsprng``).

**Model requirements** (checked by Opacus or by :meth:`PrivateTraining.loss_fn`): every
trainable parameter must be used inside a module Opacus supports (an ``h @ W.T`` outside
a module escapes clipping), the loss given to ``loss_fn`` must be per example (shape
``(b,)``), and ghost clipping needs untied weights. A tied table
(:class:`privacy.tied.TiedEmbedding`, rows used at the input and at the output) is clipped
exactly by mode ``bk`` only; the other modes refuse it.

Devices: pass ``device`` to move the module before wrapping (CUDA when the caller
chose it). The data loader stays on the CPU; move batches as usual. Noise is drawn on
the parameters' device; the guarantee is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from privacy.accounting import validate_history
from privacy.bookkeeping import is_hooked
from privacy.dp_bk import make_private_bk
from privacy.dp_config import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, MODES, DPConfig
from privacy.dp_engine import PrivateRandomness, finish_private, new_engine, poisson_loader
from privacy.dp_losses import BackwardLoss, PerExampleLoss, plain_mean, private_mean
from privacy.dp_plan import TrainingPlan, plan_training
from privacy.dp_training import PrivateTraining
from privacy.tied import TiedEmbedding

__all__ = [
    "MODES",
    "GRAD_SAMPLE_MODES",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "DPConfig",
    "TrainingPlan",
    "PrivateTraining",
    "plan_training",
    "make_private",
    "PrivateRandomness",
]

log = logging.getLogger(__name__)


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    config: DPConfig,
    epochs: int,
    total_epochs_planned: int | None = None,
    accountant_history: Iterable[Sequence[float]] | None = None,
    device: torch.device | str | None = None,
    max_steps: int | None = None,
    rng: PrivateRandomness | None = None,
) -> PrivateTraining:
    """Make a node's local training differentially private (or not, in mode ``off``).

    Parameters
    ----------
    module : nn.Module
        The model; its ``forward`` must be able to return a per-example loss (b,).
    optimizer : torch.optim.Optimizer
        Built over the module's trainable parameters.
    data_loader : DataLoader
        One example = one user's whole history at this node (the unit of privacy); its
        ``batch_size`` sets the expected Poisson batch size.
    config : DPConfig
    epochs : int
        Local epochs of this training (sets the planned steps).
    total_epochs_planned : int or None
        Mode ``target``: local epochs summed over all planned rounds, so that the whole
        federated training reaches ``target_epsilon`` (default: ``epochs``).
    max_steps : int or None
        Cap on this training's optimizer steps (see :func:`plan_training`); the caller's
        loop must stop there (``train_epoch_private(..., max_steps=...)``).
    accountant_history : iterable of (noise_multiplier, sample_rate, steps) or None
        What this dataset already spent (``PrivacyLedger.history``), so that
        ``PrivateTraining.epsilon()`` is the total. It does not change the noise.
    device : torch.device, str or None
        Move the module there before wrapping (the caller's choice: CUDA or CPU).
    rng : PrivateRandomness or None
        For tests only: inject the sampling and noise generators. By default every call
        draws new ones from the operating system.

    Returns
    -------
    PrivateTraining
        Same shape of object in every mode. Call ``close()`` (or use ``with``) when done.

    Raises
    ------
    ValueError
        Bad arguments, or a budget that ``target`` mode cannot meet.
    """
    if not isinstance(config, DPConfig):
        raise ValueError(f"config must be a DPConfig, got {type(config).__name__}")
    if any(hasattr(p, "_forward_counter") for p in module.parameters()) or is_hooked(module):
        raise ValueError(
            "the module still carries Opacus hooks from an earlier make_private; call close() on that "
            "PrivateTraining (or use it as a context manager) before wrapping the module again"
        )
    prior = tuple(validate_history(accountant_history or ()))
    plan = plan_training(
        config, data_loader=data_loader, epochs=epochs, total_epochs_planned=total_epochs_planned, max_steps=max_steps
    )
    if device is not None:
        module.to(device)  # in place: the optimizer's parameters stay the same objects
    if not config.is_private:
        return PrivateTraining(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            loss_fn=plain_mean,
            accountant=None,
            noise_multiplier=0.0,
            sample_rate=plan.sample_rate,
            is_private=False,
            max_grad_norm=None,
            delta=plan.delta,
            accountant_name=config.accountant,
            grad_sample_mode=None,
            plan=plan,
            base_module=module,
            prior_history=prior,
        )
    if not config.poisson_sampling:
        log.warning(
            "poisson_sampling=False: the accountant's epsilon assumes Poisson sampling and is only an approximation"
        )
    engine = new_engine(config)
    if rng is None and not config.secure_rng:
        rng = PrivateRandomness.from_os(next(module.parameters()).device)
    if config.grad_sample_mode == "bk":
        private_module, private_opt, loss_fn, private_loader = make_private_bk(
            engine, module=module, optimizer=optimizer, data_loader=data_loader, config=config, plan=plan, rng=rng
        )
        return finish_private(engine, config, plan, prior, module, private_module, private_opt, loss_fn, private_loader)
    _refuse_tied(module, config.grad_sample_mode)
    criterion = PerExampleLoss()
    # Poisson sampling from our own generator: Opacus's engine would fall back to the
    # loader's generator (seeded from the run seed) unless in secure mode.
    own_sampling = config.poisson_sampling and not config.secure_rng
    common: dict[str, Any] = {
        "module": module,
        "optimizer": optimizer,
        "data_loader": poisson_loader(data_loader, rng) if own_sampling else data_loader,
        "criterion": criterion,
        "max_grad_norm": config.max_grad_norm,
        "poisson_sampling": config.poisson_sampling and not own_sampling,
        "grad_sample_mode": config.grad_sample_mode,
        "loss_reduction": "mean",
    }
    if rng is not None:
        common["noise_generator"] = rng.noise
    # Mode target: make_private_with_epsilon is get_noise_multiplier + make_private. We run
    # the two parts ourselves so the noise multiplier the ledger checked (plan) is the one
    # used, the seconds-long search runs once (cached), and it is calibrated at the rate
    # and step count the accountant records (Opacus's own call uses 1 / len(loader), which
    # differs from the recorded rate on float edges and would overshoot the target).
    out = engine.make_private(noise_multiplier=plan.noise_multiplier, **common)
    if config.grad_sample_mode == "ghost":
        private_module, private_opt, dp_loss, private_loader = out
        loss_fn: Callable[[torch.Tensor], BackwardLoss] = dp_loss
    else:
        private_module, private_opt, private_loader = out
        loss_fn = private_mean
    return finish_private(engine, config, plan, prior, module, private_module, private_opt, loss_fn, private_loader)


def _refuse_tied(module: nn.Module, mode: str) -> None:
    """Opacus's modes cannot clip a tied table (used at the input and the output): only ``bk`` can."""
    for name, m in module.named_modules():
        if isinstance(m, TiedEmbedding) and any(p.requires_grad for p in m.parameters()):
            raise ValueError(
                f"grad_sample_mode {mode!r} cannot clip the tied table {name!r} (its rows are used at the input "
                "and at the output); use grad_sample_mode 'bk' (privacy.grad_sample_mode=bk)"
            )
