"""Mode ``bk``: fedmart's one-pass per-user clipping (:mod:`privacy.bookkeeping`) inside Opacus's DP-SGD.

Opacus still draws the Poisson batches, adds the noise, scales and accounts (its
``DPDataLoader``, ``DPOptimizerFastGradientClipping`` and accountant hook); only the
clipped per-user gradient sum comes from :class:`privacy.bookkeeping.BookKeeping`. The
guarantee is that of :mod:`privacy.dp` and rests on the same assumptions, plus the ones
bk states itself: every trainable parameter sits in a supported layer (``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``) called once per forward pass, so each user's clipped
contribution is exactly what the optimizer noises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from privacy.bookkeeping import BookKeeping
from privacy.dp_config import DPConfig
from privacy.dp_engine import PrivateRandomness, poisson_loader
from privacy.dp_losses import BackwardLoss, check_per_example
from privacy.dp_plan import TrainingPlan

__all__ = ["make_private_bk"]


class _BookKeepingLoss:
    """``loss_fn``'s result in mode ``bk``: ``backward()`` writes the clipped sum to ``p.grad``."""

    def __init__(self, bk: BookKeeping, per_example: torch.Tensor) -> None:
        self._bk, self._per_example = bk, check_per_example(per_example)

    def backward(self) -> None:
        self._bk.clip_and_sum(self._per_example)

    def item(self) -> float:
        return float(self._per_example.detach().mean())


class _BookKeepingModule(nn.Module):
    """The module a ``bk`` training calls: the caller's model, plus ``cleanup()`` for ``close()``."""

    def __init__(self, module: nn.Module, bk: BookKeeping) -> None:
        super().__init__()
        self._module = module
        self._bk = bk

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._bk.discard()  # a forward pass without its backward (an exception) must not linger
        return self._module(*args, **kwargs)

    def packed_loss(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own packed per-example loss (rows tagged by ``tag_rows``), where it has one."""
        self._bk.discard()
        return self._module.packed_loss(*args, **kwargs)

    @property
    def has_packed_loss(self) -> bool:
        return callable(getattr(self._module, "packed_loss", None))

    def cleanup(self) -> None:
        self._bk.remove()


def make_private_bk(
    engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    config: DPConfig,
    plan: TrainingPlan,
    rng: PrivateRandomness | None,
) -> tuple[nn.Module, Any, Callable[[torch.Tensor], BackwardLoss], DataLoader]:
    """Opacus's sampler, noise and accountant around fedmart's one-pass clipping.

    The same objects ``PrivacyEngine.make_private(grad_sample_mode="ghost")`` builds,
    except the module wrapper: ghost clipping's optimizer takes ``p.grad`` as the
    clipped sum and only noises, scales and accounts, which is what ``bk`` provides.
    """
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in trainable:
                raise ValueError("Module parameters are different than optimizer Parameters")
    bk = BookKeeping(module, max_grad_norm=config.max_grad_norm)
    if config.poisson_sampling:
        loader = (
            DPDataLoader.from_data_loader(data_loader, generator=engine.secure_rng)
            if config.secure_rng
            else poisson_loader(data_loader, rng)
        )
    else:
        loader = data_loader
    sample_rate = 1 / len(loader)
    opt = DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=int(len(data_loader.dataset) * sample_rate),  # type: ignore[arg-type]
        loss_reduction="mean",
        generator=engine.secure_rng if config.secure_rng else (rng.noise if rng is not None else None),
        secure_mode=config.secure_rng,
    )
    opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return _BookKeepingModule(module, bk), opt, lambda per_example: _BookKeepingLoss(bk, per_example), loader
