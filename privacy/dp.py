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

**Randomness.** With ``secure_rng=False`` noise and sampling come from PyTorch's
pseudo-random generator, fine for research; ``secure_rng=True`` uses Opacus's
secure mode (needs ``torchcsprng``).

**Model requirements** (checked by Opacus or by :meth:`PrivateTraining.loss_fn`): every
trainable parameter must be used inside a module Opacus supports (an ``h @ W.T`` outside
a module escapes clipping), the loss given to ``loss_fn`` must be per example (shape
``(b,)``), and ghost clipping needs untied weights.

Devices: pass ``device`` to move the module before wrapping (CUDA when the caller
chose it). The data loader stays on the CPU; move batches as usual. Noise is drawn on
the parameters' device; the guarantee is the same.
"""

from __future__ import annotations

import logging
import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any, Literal, Protocol

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from privacy.accounting import (
    ACCOUNTANTS,
    HistoryEntry,
    default_delta,
    epsilon,
    noise_multiplier_for,
    validate_history,
)
from privacy.bookkeeping import BookKeeping, is_hooked

__all__ = [
    "MODES",
    "GRAD_SAMPLE_MODES",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "DPConfig",
    "TrainingPlan",
    "PrivateTraining",
    "plan_training",
    "make_private",
]

log = logging.getLogger(__name__)

MODES = ("off", "dp", "target")
GRAD_SAMPLE_MODES = ("hooks", "ghost", "bk")
DEFAULT_GRAD_SAMPLE_MODE = "bk"
"""Chosen by measurement (``bench/dp_overhead.py``, BENCHMARKS.md "DP overhead"): on the
2-layer, 64-wide SASRec over ~2000 items on a quiet 2-core CPU, with trimmed batches, bk ran
750 examples/s (0.69x the non-private path), ghost 436 and hooks 372 (medians of 3), with the
same guarantee and the least training memory (250 vs 405 and 545 MiB above setup). Models
with layers bk does not support must choose ghost or hooks (make_private says so)."""


class BackwardLoss(Protocol):
    """What ``PrivateTraining.loss_fn`` returns: a scalar tensor, or Opacus's ghost-clipping
    loss, which runs both backward passes in ``.backward()``."""

    def backward(self) -> None: ...

    def item(self) -> float: ...


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """How a node's local training is made private.

    Parameters
    ----------
    mode : {"off", "dp", "target"}
        ``off``: no privacy. ``dp``: DP-SGD with the given ``noise_multiplier``.
        ``target``: DP-SGD with the noise multiplier Opacus computes so that the whole
        planned training (``total_epochs_planned``) reaches ``target_epsilon`` (as
        ``PrivacyEngine.make_private_with_epsilon``; see :func:`plan_training`).
    noise_multiplier : float or None
        Noise standard deviation over ``max_grad_norm``; > 0 in mode ``dp``, unused
        (may be None) in the other modes.
    max_grad_norm : float
        Per-user clipping bound C on the flat L2 norm of the gradient; > 0.
    delta : float or None
        Target delta in (0, 1); ``None`` means ``1 / number of users`` of the node's
        dataset (see :func:`privacy.accounting.default_delta` for why smaller is better).
    target_epsilon : float or None
        Mode ``target`` only; > 0.
    accountant : {"rdp", "prv"}
        Opacus accountant; RDP by default.
    grad_sample_mode : {"hooks", "ghost", "bk"}
        Opacus per-sample gradients (``hooks``), Opacus ghost clipping (``ghost``:
        per-sample norms without per-sample gradients, two backward passes), or
        fedmart's book-keeping clipping (``bk``, :mod:`privacy.bookkeeping`: one backward
        pass; Opacus still samples, noises and accounts). Same guarantee.
    poisson_sampling : bool
        Required for the accountant's guarantee; ``False`` makes epsilon an approximation.
    secure_rng : bool
        Cryptographically secure noise and sampling (Opacus secure mode, needs ``torchcsprng``).
    """

    mode: Literal["off", "dp", "target"] = "off"
    noise_multiplier: float | None = 1.0
    max_grad_norm: float = 1.0
    delta: float | None = None
    target_epsilon: float | None = None
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["hooks", "ghost", "bk"] = DEFAULT_GRAD_SAMPLE_MODE
    poisson_sampling: bool = True
    secure_rng: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, not {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, not {self.grad_sample_mode!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        sigma = self.noise_multiplier
        if self.mode == "dp" and not (sigma is not None and math.isfinite(sigma) and sigma > 0):
            raise ValueError(
                f"noise_multiplier must be > 0 in mode 'dp' (0 gives no privacy: use mode='off'), "
                f"got {self.noise_multiplier}"
            )
        if self.delta is not None and not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1) or None (= 1/number of users), got {self.delta}")
        if self.mode == "target":
            if self.target_epsilon is None or not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
                raise ValueError(f"mode 'target' needs target_epsilon > 0, got {self.target_epsilon}")
        elif self.target_epsilon is not None:
            raise ValueError(f"target_epsilon is only used with mode='target' (mode is {self.mode!r})")
        if not isinstance(self.poisson_sampling, bool) or not isinstance(self.secure_rng, bool):
            raise ValueError("poisson_sampling and secure_rng must be booleans")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, ignore: Iterable[str] = ("max_epsilon",)) -> DPConfig:
        """Build from a config mapping (the Hydra ``privacy`` group), refusing unknown keys.

        Keys in ``ignore`` belong to the same group but not to DP-SGD (``max_epsilon`` is
        the node's budget, read by the node from its own configuration).
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names - set(ignore))
        if unknown:
            raise ValueError(f"unknown privacy settings {unknown}; expected some of {sorted(names)}")
        return cls(**{k: values[k] for k in names if k in values})

    @property
    def is_private(self) -> bool:
        return self.mode != "off"

    def resolve_delta(self, num_examples: int) -> float:
        """The delta to account at: the configured one, else ``1 / num_examples``."""
        return self.delta if self.delta is not None else default_delta(num_examples)


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


class _PerExampleLoss(nn.Module):
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
        return _check_per_example(per_example)


def _check_per_example(per_example: torch.Tensor) -> torch.Tensor:
    if per_example.dim() != 1:
        raise ValueError(
            f"loss_fn needs the per-example loss of shape (b,), got shape {tuple(per_example.shape)}; "
            "call the model with reduction='none'"
        )
    return per_example


def _private_mean(per_example: torch.Tensor) -> torch.Tensor:
    # Mean over the drawn batch: Opacus's hooks multiply the backprops by the batch size,
    # so each per-sample gradient is that of one example's own loss.
    return _check_per_example(per_example).mean()


def _plain_mean(loss: torch.Tensor) -> torch.Tensor:
    # Off mode: a (b,) per-example loss or an already-reduced scalar.
    return loss.mean()


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
            loss_fn=_plain_mean,
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
    engine = _engine(config)
    if config.grad_sample_mode == "bk":
        private_module, private_opt, loss_fn, private_loader = _make_private_bk(
            engine, module=module, optimizer=optimizer, data_loader=data_loader, config=config, plan=plan
        )
        return _finish(engine, config, plan, prior, module, private_module, private_opt, loss_fn, private_loader)
    criterion = _PerExampleLoss()
    common: dict[str, Any] = {
        "module": module,
        "optimizer": optimizer,
        "data_loader": data_loader,
        "criterion": criterion,
        "max_grad_norm": config.max_grad_norm,
        "poisson_sampling": config.poisson_sampling,
        "grad_sample_mode": config.grad_sample_mode,
        "loss_reduction": "mean",
    }
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
        loss_fn = _private_mean
    return _finish(engine, config, plan, prior, module, private_module, private_opt, loss_fn, private_loader)


def _finish(
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


class _BookKeepingLoss:
    """``loss_fn``'s result in mode ``bk``: ``backward()`` writes the clipped sum to ``p.grad``."""

    def __init__(self, bk: BookKeeping, per_example: torch.Tensor) -> None:
        self._bk, self._per_example = bk, _check_per_example(per_example)

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

    def cleanup(self) -> None:
        self._bk.remove()


def _make_private_bk(
    engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    config: DPConfig,
    plan: TrainingPlan,
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
    loader = (
        DPDataLoader.from_data_loader(data_loader, generator=engine.secure_rng if config.secure_rng else None)
        if config.poisson_sampling
        else data_loader
    )
    sample_rate = 1 / len(loader)
    opt = DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=int(len(data_loader.dataset) * sample_rate),  # type: ignore[arg-type]
        loss_reduction="mean",
        generator=engine.secure_rng if config.secure_rng else None,
        secure_mode=config.secure_rng,
    )
    opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return _BookKeepingModule(module, bk), opt, lambda per_example: _BookKeepingLoss(bk, per_example), loader


def _engine(config: DPConfig) -> PrivacyEngine:
    with warnings.catch_warnings():
        # Opacus warns on every engine without secure RNG; the choice is in DPConfig.secure_rng.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        try:
            return PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_rng)
        except ImportError as e:
            raise RuntimeError(
                "secure_rng=True needs the torchcsprng package (Opacus secure mode); install it or set secure_rng=false"
            ) from e


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
