"""A node's empirical privacy audit: score its canaries with the final model and bound ε from below.

The coordinator sends the final global model (``query.audit``) after the last round. The
node scores its canaries (:mod:`clients.canaries`), guesses "in" for the ``k`` highest scores
and "out" for the ``k`` lowest (``k`` from its policy, fixed before the run), and computes the
one-run lower bound of Steinke, Nasr and Jagielski (:mod:`privacy.empirical_bound`) at its own
δ and its policy's confidence. Beside it goes the accountant's ε from the node's ledger (all
spends on this population, which is what the canaries have been part of). Only counts and
the bound leave the node; the scores and inclusion bits stay.

A lower bound above the accountant's ε is evidence of a bug in the mechanism (too little
noise, clipping that does not bound a user, a user counted twice): the node logs it as an
error and the coordinator's report says so. A bound below it is evidence, not proof, that the
mechanism is right: the audit sees only what the final model reveals about these canaries.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from clients.canaries import csprng_sample, load_canaries, load_holdout, score_canaries, score_sequences
from clients.node import NodeData, model_skeleton
from conf.settings import RunSettings
from federation.device import select_device
from federation.globalmodel import set_weights
from privacy.empirical_bound import audit, membership_auc
from privacy.ledger import PrivacyLedger
from privacy.policy import AuditPolicy, NodePolicy, policy_delta

__all__ = ["audit_node"]

log = logging.getLogger(__name__)


def audit_node(node: NodeData, policy: NodePolicy, settings: RunSettings, weights: dict[str, np.ndarray]) -> dict:
    """The node's audit of ``weights`` (the final global model): counts, the bound and the accountant's ε.

    ``node`` is the node without canaries (its real users); ``epsilon`` is ``inf`` when the
    ledger records no private training of this population (then no DP claim is made).
    """
    pol = policy.audit
    max_len = settings.data.max_len
    device = select_device(settings.device)
    model = model_skeleton(node, settings.model, max_len)
    set_weights(model, weights)
    ledger = PrivacyLedger(node.state_dir / "privacy-ledger.json", population_id=node.population_id)
    delta = ledger.pinned_delta or policy_delta(policy, node.real_users)
    spent = bool(ledger.entries)  # no private training of this population: no DP claim to check
    epsilon = ledger.epsilon(delta, accountant=ledger.pinned_accountant or "rdp") if spent else math.inf
    out: dict = {"epsilon": epsilon, "delta": delta}
    if pol.holdout:
        out["mia_auc"] = _membership_auc(node, pol.holdout, model, max_len, device)
        out["mia_users"] = pol.holdout
    if not pol.canaries:
        return out
    canaries = load_canaries(node, pol, max_len)
    scores = score_canaries(model, canaries, max_len, pol.score, device)
    result = audit(scores, canaries.included, pol.k, delta=delta, confidence=pol.confidence)
    out.update(
        canaries=result.canaries,
        guesses=result.guesses,
        correct=result.correct,
        confidence=result.confidence,
        epsilon_lower_bound=result.epsilon_lower_bound,
    )
    if result.epsilon_lower_bound > epsilon:
        log.error(
            "node %s: PRIVACY AUDIT FAILED: the empirical lower bound %.3f exceeds the accountant's epsilon %.3f "
            "(%d of %d guesses correct): the mechanism is broken",
            node.name,
            result.epsilon_lower_bound,
            epsilon,
            result.correct,
            result.guesses,
        )
    else:
        log.info(
            "node %s: privacy audit: %d of %d guesses correct, epsilon >= %.3f at %.0f%% (accountant: %.3f)",
            node.name,
            result.correct,
            result.guesses,
            result.epsilon_lower_bound,
            100 * result.confidence,
            epsilon,
        )
    return out


def _membership_auc(node: NodeData, n: int, model, max_len: int, device) -> float:
    """AUC of the loss attack: ``n`` withheld users against ``n`` trained real users drawn by the CSPRNG."""
    held = load_holdout(node, AuditPolicy(holdout=n))
    withheld = set(held.tolist())
    trained = [u for u in np.flatnonzero(node.split.train.lengths() >= 2).tolist() if u not in withheld]
    members = csprng_sample(trained, min(n, len(trained)))
    train = node.split.train
    score = score_sequences(model, [train.of(int(u)) for u in members], max_len, "loglik", device)
    other = score_sequences(model, [train.of(int(u)) for u in held], max_len, "loglik", device)
    return membership_auc(score, other)
