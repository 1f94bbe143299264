"""Client-level DP: an optional second layer that protects a whole node's contribution.

DP-SGD (:mod:`privacy.dp`) protects each *user* of a node. This layer protects each
*node* (a merchant or department as a whole) in the released global model, the
DP-FedAvg recipe of McMahan et al. (2018):

1. a node clips what it contributes to the aggregate, ``u = clip(x, C)`` with
   ``x`` its (possibly weighted, ``n * delta``) model update, so ``||u||_2 <= C``
   (:func:`clip_update`, to be called by a client mod just before secure aggregation
   masks the reply);
2. the coordinator adds ``N(0, (sigma * C)^2 I)`` to the *sum* of the clipped
   contributions, before dividing by anything and before any server optimizer
   (:func:`add_noise_to_sum`, applied by the strategy wrapper
   :class:`privacy.client_dp_strategy.ClientDPStrategy`); dividing and FedAvg/FedAdam
   steps are then post-processing;
3. the coordinator reports :func:`client_level_epsilon` over the rounds, separately
   from the nodes' user-level epsilons.

Guarantee and assumptions
-------------------------
Adjacency is add/remove one node. Per round the released noisy sum is a Gaussian
mechanism with sensitivity ``C``; over rounds the RDP accountant composes them. With
``node_sampling_rate = q < 1`` the bound assumes each node takes part in a round
independently with probability ``q`` (Poisson sampling of nodes); Flower's samplers pick a
fixed number of nodes, for which ``q = 1`` (no amplification, Flower's own
"no-amplification" setting) is the valid choice. The divisor of the noisy sum must not
depend on private data: the number of sampled nodes, or a public total weight. A FedAvg
weight ``n_k`` (users per node) sent in plain text reveals node sizes, which this layer
does not hide. The coordinator adds the noise and sees the noiseless sum: this layer
protects against everyone who sees the *global model* (other nodes, services, the
public), not against the coordinator (secure aggregation already hides the individual
contributions from it, and DP-SGD protects each user even from it).

Why not Flower's ``DifferentialPrivacyClientSideFixedClipping``: it adds noise of
standard deviation ``sigma * C / m`` to the *output of the wrapped strategy*. That is a
valid Gaussian mechanism only for an unweighted mean of full-model replies; with
FedAvg weighted by users per node the sensitivity of the weighted mean is up to
``n_k C / sum n`` (one big node dominates), and with FedAdam the noise lands after the
adaptive step, whose sensitivity is unbounded. Its ``fixedclipping_mod`` also expects
plain weights in the reply, not a masked sum. Here the noise goes on the clipped sum
itself, which works with any strategy and with secure aggregation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from privacy.accounting import ACCOUNTANTS, epsilon

__all__ = [
    "ClientDPConfig",
    "update_norm",
    "clip_update",
    "add_noise_to_sum",
    "client_level_epsilon",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClientDPConfig:
    """Client-level DP settings (the coordinator's; reported apart from user-level epsilon).

    Parameters
    ----------
    noise_multiplier : float
        sigma: noise standard deviation on the sum over ``clipping_norm``; > 0.
    clipping_norm : float
        C: bound on the L2 norm of each node's contribution; > 0.
    node_sampling_rate : float
        q in (0, 1]: probability that a node takes part in a round, for amplification
        by sampling. Keep 1.0 unless nodes are Poisson-sampled.
    delta : float
        Client-level delta in (0, 1); below 1 / number of nodes.
    accountant : {"rdp", "prv"}
    """

    noise_multiplier: float
    clipping_norm: float
    node_sampling_rate: float = 1.0
    delta: float = 1e-3
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"clipping_norm must be > 0, got {self.clipping_norm}")
        if not (0 < self.node_sampling_rate <= 1):
            raise ValueError(f"node_sampling_rate must be in (0, 1], got {self.node_sampling_rate}")
        if not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, not {self.accountant!r}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the sum."""
        return self.noise_multiplier * self.clipping_norm

    def epsilon(self, rounds: int) -> float:
        """Client-level epsilon after ``rounds`` released aggregates."""
        return client_level_epsilon(
            noise_multiplier=self.noise_multiplier,
            node_sampling_rate=self.node_sampling_rate,
            rounds=rounds,
            delta=self.delta,
            accountant=self.accountant,
        )


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """Flat L2 norm over all arrays of ``update`` (float64 accumulation)."""
    return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in update.values())))


def clip_update(update: Mapping[str, np.ndarray], *, max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` so its flat L2 norm is at most ``max_norm`` (unchanged if already).

    Parameters
    ----------
    update : mapping of name -> array
        What the node contributes to the aggregate sum: ``delta`` (unweighted) or
        ``n * delta`` (FedAvg-weighted); the bound is on exactly what is summed.
    max_norm : float
        C, > 0.

    Returns
    -------
    clipped : dict of name -> array
        New arrays (inputs untouched), each in its input dtype; the scale is computed in
        float64 and shrunk by one ulp-scale margin so float32 rounding cannot exceed C.
    norm : float
        The norm before clipping. It depends on the node's data: keep it local (logs),
        never send it.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValueError("the update has a non-finite entry; refusing to clip or send it")
    scale = 1.0 if norm <= max_norm else (max_norm / norm) * (1 - 1e-6)
    clipped = {k: (np.asarray(v, dtype=np.float64) * scale).astype(np.asarray(v).dtype) for k, v in update.items()}
    return clipped, norm


def add_noise_to_sum(
    summed: Mapping[str, np.ndarray],
    *,
    noise_multiplier: float,
    clipping_norm: float,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The Gaussian mechanism on the sum of clipped contributions.

    Adds independent ``N(0, (noise_multiplier * clipping_norm)^2)`` to every coordinate
    of the *sum* (not the mean: divide afterwards, by a divisor that does not depend on
    private data). ``rng`` defaults to a generator seeded from OS entropy; pass one only
    in tests, a predictable seed voids the guarantee.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ValueError(f"clipping_norm must be > 0, got {clipping_norm}")
    gen = rng if rng is not None else np.random.default_rng()
    std = noise_multiplier * clipping_norm
    out = {}
    for k, v in summed.items():
        a = np.asarray(v)
        out[k] = (a.astype(np.float64) + gen.normal(0.0, std, size=a.shape)).astype(a.dtype)
    log.info("client-level DP: Gaussian noise with std %.4g added to the aggregate sum", std)
    return out


def client_level_epsilon(
    *,
    noise_multiplier: float,
    node_sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Client-level epsilon after ``rounds`` noisy aggregates (subsampled Gaussian, composed).

    The same Opacus accountant as DP-SGD, with one "step" per round and the node
    sampling rate as the sampling rate; see the module docstring for when ``q < 1`` is valid.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    return epsilon([(noise_multiplier, node_sampling_rate, rounds)], delta=delta, accountant=accountant)
