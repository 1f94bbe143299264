"""Opacus's ``PrivacyEngine`` for a node's training, and the :class:`PrivateTraining` it yields.

Two checks here keep the ledger truthful: Opacus must have chosen exactly the noise
multiplier the plan (and so the ledger's budget check) used, and every optimizer step must
be accounted with the planned ``(noise_multiplier, sample_rate)``; either mismatch is a
``RuntimeError``, never a silently different spend. The guarantee itself is stated in
:mod:`privacy.dp`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader

from privacy.accounting import HistoryEntry
from privacy.dp_config import DPConfig
from privacy.dp_losses import BackwardLoss
from privacy.dp_plan import TrainingPlan
from privacy.dp_training import PrivateTraining

__all__ = ["PrivateRandomness", "poisson_loader", "new_engine", "finish_private"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivateRandomness:
    """Where a training's private randomness comes from: Poisson sampling (CPU) and noise (the parameters' device).

    Never the run seed: anyone who knows the seed (the coordinator does) could recompute
    which users each step sampled, which removes the amplification the accountant counts
    on, and a retrained round would draw the same noise again.
    """

    sampling: torch.Generator
    noise: torch.Generator

    @classmethod
    def from_os(cls, device: torch.device | str | None) -> PrivateRandomness:
        """Two generators, each seeded with 64 bits from ``os.urandom``: fresh and secret for every training.

        They are PyTorch's generators (not a CSPRNG: Opacus's secure mode with torchcsprng is
        that), seeded so that nothing outside this process knows or repeats the stream.
        """
        noise_device = torch.device(device) if device is not None else torch.device("cpu")
        return cls(
            sampling=torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little")),
            noise=torch.Generator(device=noise_device).manual_seed(int.from_bytes(os.urandom(8), "little")),
        )


def poisson_loader(data_loader: DataLoader, rng: PrivateRandomness | None) -> DataLoader:
    """Opacus's Poisson-sampling loader over ``data_loader``'s dataset, drawing from ``rng.sampling``.

    Without ``rng`` (Opacus secure mode) the engine's own generator is used by the caller.
    """
    return DPDataLoader.from_data_loader(data_loader, generator=rng.sampling if rng is not None else None)


def new_engine(config: DPConfig) -> PrivacyEngine:
    """Opacus's engine with ``config``'s accountant and RNG; ``RuntimeError`` if secure RNG is unavailable."""
    with warnings.catch_warnings():
        # Opacus warns on every engine without secure RNG; the choice is in DPConfig.secure_rng.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        try:
            return PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_rng)
        except ImportError as e:
            raise RuntimeError(
                "secure_rng=True needs the torchcsprng package (Opacus secure mode); install it or set secure_rng=false"
            ) from e


def finish_private(
    engine: PrivacyEngine,
    config: DPConfig,
    plan: TrainingPlan,
    prior: tuple[HistoryEntry, ...],
    module: nn.Module,
    private_module: nn.Module,
    private_opt: Any,
    loss_fn: Callable[[torch.Tensor], BackwardLoss],
    private_loader: DataLoader,
) -> PrivateTraining:
    """The :class:`PrivateTraining` of a private mode, from the objects Opacus (or bk) built.

    Seeds the engine's accountant with ``prior`` (the dataset's spend so far) and counts
    every step it accounts; refuses a noise multiplier other than the plan's.
    """
    if not math.isclose(private_opt.noise_multiplier, plan.noise_multiplier, rel_tol=1e-12):
        raise RuntimeError(
            f"Opacus chose noise_multiplier {private_opt.noise_multiplier}, the plan said {plan.noise_multiplier}"
        )
    accountant = engine.accountant
    accountant.history = list(prior)  # after make_private*: the plan starts from zero spend
    pt = PrivateTraining(
        module=private_module,
        optimizer=private_opt,
        data_loader=private_loader,
        loss_fn=loss_fn,
        accountant=accountant,
        noise_multiplier=float(private_opt.noise_multiplier),
        sample_rate=plan.sample_rate,
        is_private=True,
        max_grad_norm=config.max_grad_norm,
        delta=plan.delta,
        accountant_name=config.accountant,
        grad_sample_mode=config.grad_sample_mode,
        plan=plan,
        base_module=module,
        prior_history=prior,
    )
    _count_steps(pt)
    log.info(
        "DP-SGD (%s, %s): noise_multiplier %.4f, max_grad_norm %g, sample_rate %.5f, %d steps planned, delta %.3g",
        config.mode,
        config.grad_sample_mode,
        pt.noise_multiplier,
        config.max_grad_norm,
        pt.sample_rate,
        plan.steps,
        plan.delta,
    )
    return pt


def _count_steps(pt: PrivateTraining) -> None:
    """Chain a counter after Opacus's accountant hook, and check each step is accounted
    with the planned parameters (the ledger records what the accountant saw)."""
    opt = pt.optimizer
    accountant_hook = opt.step_hook  # type: ignore[attr-defined]
    expected = (pt.noise_multiplier, pt.sample_rate)

    def hook(optim: torch.optim.Optimizer) -> None:
        accountant_hook(optim)
        assert pt.accountant is not None
        recorded = tuple(pt.accountant.history[-1][:2])
        if recorded != expected:
            raise RuntimeError(f"accountant recorded (noise, rate) {recorded}, expected {expected}")
        pt.steps_taken += 1

    opt.attach_step_hook(hook)  # type: ignore[attr-defined]
