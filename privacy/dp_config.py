"""How a node's local training is made private: the ``privacy`` Hydra group as a validated dataclass.

:class:`DPConfig` only describes the mechanism; what it guarantees, and under which
assumptions, is stated in :mod:`privacy.dp` (the façade that applies it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from privacy.accounting import ACCOUNTANTS, default_delta

__all__ = ["MODES", "GRAD_SAMPLE_MODES", "DEFAULT_GRAD_SAMPLE_MODE", "DPConfig"]

MODES = ("off", "dp", "target")
GRAD_SAMPLE_MODES = ("hooks", "ghost", "bk")
DEFAULT_GRAD_SAMPLE_MODE = "bk"
"""Chosen by measurement (``bench/dp_overhead.py``, BENCHMARKS.md "DP overhead"): on the
2-layer, 64-wide SASRec over ~2000 items on a quiet 2-core CPU, with trimmed batches, bk ran
750 examples/s (0.69x the non-private path), ghost 436 and hooks 372 (medians of 3), with the
same guarantee and the least training memory (250 vs 405 and 545 MiB above setup). Models
with layers bk does not support must choose ghost or hooks (make_private says so)."""


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
