"""What a DP-SGD training will spend, known before it runs: the noise, the sampling rate, the steps.

The node's ledger checks the plan against its budget before training
(:meth:`privacy.ledger.PrivacyLedger.check`), and :func:`privacy.dp.make_private` trains
with exactly the planned noise multiplier, so the budget check and the spend agree. The
plan mirrors Opacus's Poisson loader and accountant (see :func:`plan_training`); the
epsilon it implies holds under the assumptions listed in :mod:`privacy.dp`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DataLoader

from privacy.accounting import noise_multiplier_for
from privacy.dp_config import DPConfig

__all__ = ["TrainingPlan", "plan_training"]


@dataclass(frozen=True)
class TrainingPlan:
    """What a training will spend, known before it runs (for the ledger's check).

    ``steps`` is the number of optimizer steps of this training (``epochs`` passes of
    ``steps_per_epoch`` Poisson batches, empty ones included). Off mode has
    ``is_private=False`` and ``noise_multiplier=0``.
    """

    is_private: bool
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    steps: int
    delta: float
    accountant: str
    num_examples: int


def plan_training(
    config: DPConfig,
    *,
    data_loader: DataLoader,
    epochs: int,
    total_epochs_planned: int | None = None,
    max_steps: int | None = None,
) -> TrainingPlan:
    """The noise multiplier, sampling rate and step count ``make_private`` will use.

    Mirrors Opacus exactly: the Poisson loader runs ``int(1 / (1 / len(data_loader)))``
    steps per epoch and the accountant records ``sample_rate = 1 / steps_per_epoch``.
    In mode ``target`` the noise multiplier is Opacus's ``get_noise_multiplier`` (the
    search ``make_private_with_epsilon`` runs) for ``total_epochs_planned`` epochs
    (default: ``epochs``) at the rate and step count the accountant will record, so the
    ledger of a fresh dataset reaches ``target_epsilon`` (within Opacus's tolerance of
    0.01, never above) after exactly the planned epochs.

    ``max_steps`` caps this training's steps (a node's bounded local work per round);
    in mode ``target`` the planned total is then ``steps × total_epochs_planned / epochs``
    (the same capped training, once per planned round).
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if total_epochs_planned is not None and total_epochs_planned < epochs:
        raise ValueError(f"total_epochs_planned ({total_epochs_planned}) must be >= epochs of this training ({epochs})")
    num_examples = len(data_loader.dataset)  # type: ignore[arg-type]
    if num_examples < 1 or len(data_loader) < 1:
        raise ValueError("the data loader is empty: a node needs at least one training example")
    # Opacus's Poisson loader runs int(1 / (1 / len)) steps per epoch (one fewer than len
    # on some float edges) and its accountant records 1 / steps_per_epoch.
    steps_per_epoch = int(1 / (1 / len(data_loader))) if config.poisson_sampling else len(data_loader)
    sample_rate = 1 / steps_per_epoch
    delta = config.resolve_delta(num_examples)
    steps = steps_per_epoch * epochs if max_steps is None else min(steps_per_epoch * epochs, max_steps)
    if config.mode == "off":
        sigma = 0.0
    elif config.mode == "dp":
        assert config.noise_multiplier is not None
        sigma = float(config.noise_multiplier)
    else:
        assert config.target_epsilon is not None
        planned = total_epochs_planned if total_epochs_planned is not None else epochs
        sigma = noise_multiplier_for(
            target_epsilon=config.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps * planned // epochs,
            accountant=config.accountant,
        )
    return TrainingPlan(
        is_private=config.is_private,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        steps=steps,
        delta=delta,
        accountant=config.accountant,
        num_examples=num_examples,
    )
