"""The objects a node trains with, private or not: :class:`PrivateTraining`, what ``make_private`` returns.

The guarantee and its assumptions are stated in :mod:`privacy.dp`. This module adds two
that the training loop must keep: every optimizer step, an empty Poisson batch included
(:meth:`PrivateTraining.noise_step`), releases noise and is counted; and the spend recorded
in the ledger is :meth:`PrivateTraining.spent`, the steps the accountant saw.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import torch
from opacus.accountants import IAccountant
from torch import nn
from torch.utils.data import DataLoader

from privacy.accounting import HistoryEntry, epsilon
from privacy.dp_losses import BackwardLoss
from privacy.dp_plan import TrainingPlan

__all__ = ["PrivateTraining"]


@dataclass
class PrivateTraining:
    """The training objects a node uses, private or not; see the module docstring.

    Attributes
    ----------
    module, optimizer, data_loader
        Opacus's wrappers (private modes) or the originals (off). Parameters are shared
        with the module passed in: read trained weights from ``base_module``.
    loss_fn
        ``loss_fn(per_example)`` with ``per_example`` of shape (b,) gives what
        ``.backward()`` needs: a mean (off, hooks) or Opacus's ghost-clipping loss.
    accountant
        Opacus accountant seeded with ``accountant_history`` and advanced by every step
        (None when off); ``epsilon()`` is the dataset's total so far.
    noise_multiplier, sample_rate, max_grad_norm, delta
        The mechanism's parameters (``noise_multiplier=0``, ``max_grad_norm=None`` when off).
    is_private
        False in mode ``off``.
    training_id
        Unique id of this training, for the ledger's idempotent ``record``.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    loss_fn: Callable[[torch.Tensor], BackwardLoss]
    accountant: IAccountant | None
    noise_multiplier: float
    sample_rate: float
    is_private: bool
    max_grad_norm: float | None
    delta: float
    accountant_name: str
    grad_sample_mode: str | None
    plan: TrainingPlan
    base_module: nn.Module
    prior_history: tuple[HistoryEntry, ...] = ()
    training_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    steps_taken: int = 0
    _closed: bool = False

    def spent(self) -> HistoryEntry:
        """``(noise_multiplier, sample_rate, steps)`` of this training so far, for
        ``PrivacyLedger.record``. Counts every noised step, empty batches included."""
        if not self.is_private:
            raise ValueError("spent() is only defined for a private training (mode 'off' spends nothing)")
        return (self.noise_multiplier, self.sample_rate, self.steps_taken)

    def epsilon(self) -> float:
        """Total epsilon at ``delta`` of ``accountant_history`` plus this training (0 when off).

        Computed from exactly the entries the ledger will hold after ``record(*spent())``,
        so the two agree; equal to ``accountant.get_epsilon(delta)`` (RDP: bit for bit).
        """
        if not self.is_private:
            return 0.0
        return epsilon([*self.prior_history, self.spent()], delta=self.delta, accountant=self.accountant_name)

    def noise_step(self) -> None:
        """One DP-SGD step for an empty Poisson batch: noise only, counted by the accountant.

        The analysis of Poisson sampling assumes every step releases a noised sum, even
        when no one was sampled; skipping the step would reveal that the batch was empty.
        Our model cannot run on a batch of size 0, so the zero clipped-gradient sum is
        made here. A no-op when not private.
        """
        if not self.is_private:
            return
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        for p in opt.params:  # type: ignore[attr-defined]
            if self.grad_sample_mode in ("ghost", "bk"):
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        opt.step()

    def close(self) -> nn.Module:
        """Remove Opacus's hooks from the module (idempotent); returns ``base_module``.

        Call it before wrapping the same module again (next round), or use the object as
        a context manager.
        """
        if not self._closed and self.is_private:
            cleanup = getattr(self.module, "cleanup", None)
            if callable(cleanup):
                cleanup()
        self._closed = True
        return self.base_module

    def __enter__(self) -> PrivateTraining:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
