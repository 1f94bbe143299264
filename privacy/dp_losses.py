"""The loss a DP-SGD training backpropagates, per clipping mode, from the model's per-example loss.

Every mode needs the loss of each example (one user, the unit of privacy) on its own: the
model returns it with shape ``(b,)`` (``reduction="none"``) and these helpers check that
before anything is reduced, so a loss averaged over the batch inside the model (which would
mix users before clipping) is refused rather than silently clipped as one example.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = ["BackwardLoss", "PerExampleLoss", "check_per_example", "private_mean", "plain_mean"]


class BackwardLoss(Protocol):
    """What ``PrivateTraining.loss_fn`` returns: a scalar tensor, or Opacus's ghost-clipping
    loss, which runs both backward passes in ``.backward()``."""

    def backward(self) -> None: ...

    def item(self) -> float: ...


class PerExampleLoss(nn.Module):
    """The 'criterion' Opacus's ghost clipping wraps: the model already computed the
    per-example loss in ``forward``, so the criterion only checks and passes it through.

    ``DPLossFastGradientClipping`` sets ``reduction`` to "none" while calling it and
    reduces the (b,) result itself ("mean" for the first backward pass, the clipping
    coefficients for the second).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, per_example: torch.Tensor) -> torch.Tensor:
        return check_per_example(per_example)


def check_per_example(per_example: torch.Tensor) -> torch.Tensor:
    """``per_example`` itself if it has shape (b,), else a ``ValueError`` that says how to get it."""
    if per_example.dim() != 1:
        raise ValueError(
            f"loss_fn needs the per-example loss of shape (b,), got shape {tuple(per_example.shape)}; "
            "call the model with reduction='none'"
        )
    return per_example


def private_mean(per_example: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` of mode ``hooks``: the mean of a checked (b,) per-example loss."""
    # Mean over the drawn batch: Opacus's hooks multiply the backprops by the batch size,
    # so each per-sample gradient is that of one example's own loss.
    return check_per_example(per_example).mean()


def plain_mean(loss: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` of mode ``off``: the mean, of a (b,) loss or of an already-reduced one."""
    # Off mode: a (b,) per-example loss or an already-reduced scalar.
    return loss.mean()
