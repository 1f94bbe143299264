"""A node's privacy policy, the coordinator's request, and the one function that compares them.

The threat model is that a node need not trust the coordinator. So the node's privacy
is decided by the node: its :class:`NodePolicy` is read from the node's own configuration
(``fedmart node --policy FILE``; in simulation, each simulated node's ``node_config``
from the ``conf/node/`` Hydra group), never from the run config. What the coordinator
sends is only a :class:`TrainingRequest`, carried in every TRAIN message's config, so a
dishonest coordinator can vary it freely round by round. :func:`decide` is where the two
meet; every refusal names the policy key that refused and how the node could change it.

What the request can never change: the node's δ (the policy's, or ``1 / (10 × users)``),
the accountant its ledger is pinned to, its budget, and its randomness (drawn from the
operating system for every training, :func:`privacy.dp.make_private`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "ACCOUNTANTS",
    "AUDIT_SCORES",
    "AuditPolicy",
    "EVALUATION_MODES",
    "NodePolicy",
    "PolicyDecision",
    "TrainingRequest",
    "REQUEST_PREFIX",
    "decide",
    "policy_delta",
]

ACCOUNTANTS = ("rdp", "prv")
# How a node answers federated evaluation: not at all, or exact metrics in the clear
# (only where the policy says so: exact per-node metrics on held-out users are an
# unlimited query oracle for a dishonest coordinator).
EVALUATION_MODES = ("decline", "plain")
THREAT_MODELS = ("active", "semi-honest")
REQUEST_PREFIX = "request."  # the TRAIN config keys of a TrainingRequest: request.<field>
AUDIT_SCORES = ("loglik", "rank")


@dataclass(frozen=True)
class AuditPolicy:
    """The node's empirical privacy audit (docs/privacy.md, "Empirical privacy audit").

    The node adds ``canaries`` synthetic users, each included with probability ½ by its own
    CSPRNG; after the run it scores them with the final global model, guesses "in" for the
    ``guesses`` highest scores and "out" for the ``guesses`` lowest, and turns the number of
    correct guesses into a lower bound on ε at ``confidence`` (Steinke, Nasr and Jagielski
    2023; :mod:`privacy.empirical_bound`). ``score`` and ``guesses`` are fixed before the run
    (chosen on other seeds, BENCHMARKS.md): choosing them on the audited run voids the
    confidence level. ``canaries: 0`` turns the audit off.

    Parameters
    ----------
    canaries : int
        m, the number of canary users (each in with probability ½).
    confidence : float
        The confidence of the lower bound, e.g. 0.95.
    score : {"loglik", "rank"}
        How a canary is scored: the mean log-likelihood of its sequence under the final model,
        or minus the mean log-rank of each next item.
    guesses : int
        k, the guesses on each side (2k in all, 2k <= canaries); 0 = canaries // 4.
    holdout : int
        Real users the node withholds from training (drawn once by its CSPRNG), so that it can
        measure a loss-based membership-inference attack on its real users as context: the
        AUC of telling ``holdout`` trained users from the ``holdout`` withheld ones. 0 = off.
    """

    canaries: int = 0
    confidence: float = 0.95
    score: str = "loglik"
    guesses: int = 0
    holdout: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or self.canaries < 0:
            raise ValueError(f"policy audit.canaries must be an integer >= 0, not {self.canaries!r}")
        if not (0 < self.confidence < 1):
            raise ValueError(f"policy audit.confidence must be in (0, 1), e.g. 0.95, not {self.confidence}")
        if self.score not in AUDIT_SCORES:
            raise ValueError(f"policy audit.score must be one of {AUDIT_SCORES}, not {self.score!r}")
        if isinstance(self.guesses, bool) or not isinstance(self.guesses, int) or self.guesses < 0:
            raise ValueError(f"policy audit.guesses must be an integer >= 0 (0 = canaries // 4), not {self.guesses!r}")
        if self.canaries and 2 * self.guesses > self.canaries:
            raise ValueError(
                f"policy audit.guesses {self.guesses} is more than half of audit.canaries {self.canaries}; "
                "lower it (the guesses are the k highest and the k lowest scores)"
            )
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0:
            raise ValueError(
                f"policy audit.holdout must be an integer >= 0 (0 = no membership test), not {self.holdout!r}"
            )
        if self.canaries == 1:
            raise ValueError("policy audit.canaries must be 0 (off) or at least 2")

    @property
    def enabled(self) -> bool:
        return self.canaries > 0 or self.holdout > 0

    @property
    def k(self) -> int:
        """Guesses on each side."""
        return self.guesses or max(1, self.canaries // 4)


@dataclass(frozen=True)
class NodePolicy:
    """What a node accepts. The defaults are the private node fedmart recommends.

    Parameters
    ----------
    require_dp : bool
        Train only under user-level DP-SGD. False also allows non-private training.
    max_epsilon : float
        The node's whole budget at its own δ, over every round of every run on its users.
    delta : float or None
        The node's δ. None: ``1 / (10 × users at the node)``. docs/privacy.md calls
        ``1 / users`` the loosest acceptable value; a δ of that order permits a mechanism
        that publishes one user's history outright.
    accountants : list of str
        Accountants the node accepts a request to use (its ledger is pinned to the first
        one it records with).
    require_poisson : bool
        Refuse a request without Poisson sampling: the accountant's amplification by
        sampling assumes it.
    min_noise_multiplier : float
        A floor on σ, whatever ε the accountant would project.
    require_secagg : bool
        Refuse TRAIN messages that are not under secure aggregation.
    secagg_threat_model : {"active", "semi-honest"}
        The coordinator the node's secure aggregation must withstand. ``active`` (the
        default): the node takes part only in the active-adversary mode (signed keys against
        its roster, a consistency check, t > 2n/3) and refuses a semi-honest session;
        ``semi-honest`` also takes part in a semi-honest one.
    evaluation : {"decline", "plain"}
        How the node answers federated evaluation.
    audit : AuditPolicy
        The node's empirical privacy audit with canary users (off by default).
    """

    require_dp: bool = True
    max_epsilon: float = 10.0
    delta: float | None = None
    accountants: list[str] = field(default_factory=lambda: list(ACCOUNTANTS))
    require_poisson: bool = True
    min_noise_multiplier: float = 0.0
    require_secagg: bool = True
    secagg_threat_model: str = "active"
    evaluation: str = "decline"
    audit: AuditPolicy = field(default_factory=AuditPolicy)

    def __post_init__(self) -> None:
        if isinstance(self.audit, Mapping):  # from a policy file or an OmegaConf node
            object.__setattr__(self, "audit", _audit_from_mapping(self.audit))
        if not isinstance(self.audit, AuditPolicy):
            raise ValueError(f"policy audit must be a mapping of {[f.name for f in fields(AuditPolicy)]}")
        if not (self.max_epsilon > 0):
            raise ValueError(f"policy max_epsilon must be > 0, not {self.max_epsilon}")
        if self.delta is not None and not (0 < self.delta < 1):
            raise ValueError(f"policy delta must be in (0, 1) or null (= 1 / (10 x users)), not {self.delta}")
        unknown = sorted(set(self.accountants) - set(ACCOUNTANTS))
        if not self.accountants or unknown:
            raise ValueError(f"policy accountants must be a non-empty subset of {ACCOUNTANTS}, not {self.accountants}")
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise ValueError(f"policy min_noise_multiplier must be >= 0, not {self.min_noise_multiplier}")
        if self.secagg_threat_model not in THREAT_MODELS:
            raise ValueError(f"policy secagg_threat_model must be one of {THREAT_MODELS}")
        if self.evaluation not in EVALUATION_MODES:
            raise ValueError(f"policy evaluation must be one of {EVALUATION_MODES}, not {self.evaluation!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodePolicy:
        """From the node's policy file or ``conf/node/`` group, refusing unknown keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown node policy keys {unknown}; known: {sorted(names)}")
        kwargs = dict(values)
        if "accountants" in kwargs:
            kwargs["accountants"] = list(kwargs["accountants"])
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a value of the wrong type, e.g. max_epsilon: ten
            raise ValueError(f"node policy: a value has the wrong type ({exc})") from exc


def _audit_from_mapping(values: Mapping[str, Any]) -> AuditPolicy:
    names = {f.name for f in fields(AuditPolicy)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown node policy keys audit.{unknown}; known: {sorted(names)}")
    try:
        return AuditPolicy(**dict(values))
    except TypeError as exc:
        raise ValueError(f"node policy audit: a value has the wrong type ({exc})") from exc


def policy_delta(policy: NodePolicy, num_users: int) -> float:
    """The node's δ: the policy's, else ``1 / (10 × users)``."""
    if policy.delta is not None:
        return policy.delta
    return 1.0 / (10.0 * max(int(num_users), 1))


@dataclass(frozen=True)
class TrainingRequest:
    """What the coordinator asks of one training round (all of it may be a lie).

    ``mode``, ``noise_multiplier`` or ``target_epsilon``, ``max_grad_norm``,
    ``accountant``, ``poisson_sampling`` and ``grad_sample_mode`` configure DP-SGD;
    ``local_epochs``, ``local_steps`` and ``planned_rounds`` the amount of training (the
    target-ε calibration spreads ``target_epsilon`` over ``planned_rounds × local_epochs``).
    The expected batch (hence the sampling rate) is the run's ``train.batch_size``.
    """

    mode: str = "off"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    poisson_sampling: bool = True
    grad_sample_mode: str = "bk"
    local_epochs: int = 1
    local_steps: int = 0
    planned_rounds: int = 1

    def to_config(self) -> dict[str, bool | int | float | str]:
        """Flat TRAIN-config entries (``None`` as the empty string: Flower has no null)."""
        out: dict[str, bool | int | float | str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[REQUEST_PREFIX + f.name] = "" if value is None else value
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainingRequest:
        """From a TRAIN message's config; a missing or malformed key is a ``ValueError`` naming it."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = REQUEST_PREFIX + f.name
            if key not in config:
                raise ValueError(f"the TRAIN message has no {key!r}: not a fedmart coordinator's request")
            value = config[key]
            kwargs[f.name] = None if value == "" else value
        for name in ("local_epochs", "local_steps", "planned_rounds"):
            value = kwargs[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 0:
                raise ValueError(f"{REQUEST_PREFIX}{name} must be an integer >= 0, not {value!r}")
            kwargs[name] = int(value)
        for name in ("noise_multiplier", "target_epsilon", "max_grad_norm"):
            value = kwargs[name]
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{REQUEST_PREFIX}{name} must be a number, not {value!r}")
            kwargs[name] = float(value)
        return cls(**kwargs)

    @property
    def is_private(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class PolicyDecision:
    """The node's answer to a request: allowed, or which policy key refused and why."""

    allowed: bool
    key: str = ""
    reason: str = ""

    @classmethod
    def refuse(cls, key: str, reason: str) -> PolicyDecision:
        return cls(False, key, f"policy.{key}: {reason}")


def decide(request: TrainingRequest, policy: NodePolicy, *, noise_multiplier: float | None) -> PolicyDecision:
    """May the node train as ``request`` asks? Everything but the budget, which the ledger checks.

    ``noise_multiplier`` is σ as the node itself resolved it (for a target-ε request, the
    calibrated one), ``None`` when the request is non-private.
    """
    if not request.is_private:
        if policy.require_dp:
            return PolicyDecision.refuse(
                "require_dp", "the coordinator asked for training without DP; this node trains only under DP-SGD"
            )
        return PolicyDecision(True)
    if request.accountant not in policy.accountants:
        return PolicyDecision.refuse(
            "accountants",
            f"the coordinator asked for the {request.accountant!r} accountant; this node accepts "
            f"{', '.join(policy.accountants)}",
        )
    if policy.require_poisson and not request.poisson_sampling:
        return PolicyDecision.refuse(
            "require_poisson", "the coordinator asked for training without Poisson sampling, which the ε assumes"
        )
    sigma = noise_multiplier if noise_multiplier is not None else 0.0
    if not (sigma > 0) or sigma < policy.min_noise_multiplier:
        return PolicyDecision.refuse(
            "min_noise_multiplier",
            f"the requested training has noise multiplier {sigma:.4g}; this node needs at least "
            f"{max(policy.min_noise_multiplier, 0.0):.4g} (and > 0)",
        )
    return PolicyDecision(True)
