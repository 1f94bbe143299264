"""Canary users: how a node audits its own privacy guarantee from the final model.

The node's policy (``audit:`` in :class:`privacy.policy.NodePolicy`) asks for ``m`` canaries.
Each canary is a synthetic user whose history is a random sequence of the node's own items
(items outside its holder set would be erased by the holder rule), and each is included in
training with probability ½. Both the sequences and the inclusion bits are drawn once, from
the operating system's CSPRNG (:mod:`secrets`), and kept in the node's state directory
(``.fedmart/canaries.npz``, mode 0600) beside its ledger: the coordinator never learns which
canaries are in, and a later run on the same population trains the same ones, so the audit
covers what the ledger covers (every run on those users).

Included canaries go through the same data path as real users: one training example per
user, user-level clipping, Poisson sampling and the ledger. What they must not change: the
node's δ (computed from its real users), and what the node tells the coordinator about its
size (``hello`` and the training metrics count real users only). One thing does depend on
how many canaries are in: Opacus's sampling rate is ``1 / ceil(N / batch)`` over the
``N`` examples trained, so the ε a node reports can reveal whether ``N`` crossed a multiple of
the batch size; it says nothing about *which* canaries are in.

After the run the coordinator sends the final global model (``query.audit``), the node scores
its canaries (:func:`score_canaries`), guesses, and replies with counts and the bound only
(:mod:`privacy.empirical_bound`); the scores and bits never leave the node.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, replace

import numpy as np
import torch

from clients.interactions import Interactions
from clients.node import NodeData, _make
from clients.sequences import _left_pad
from federation.model import SASRec
from privacy.policy import AuditPolicy

__all__ = [
    "CANARY_PREFIX",
    "CanarySet",
    "canary_items",
    "csprng_sample",
    "load_canaries",
    "load_holdout",
    "score_canaries",
    "score_sequences",
    "with_canaries",
]

log = logging.getLogger(__name__)

CANARY_PREFIX = "canary-"
_FILE = "canaries.npz"


@dataclass(frozen=True)
class CanarySet:
    """A node's canaries: ``sequences[i]`` is canary i's history; ``included[i]`` whether it trains."""

    sequences: np.ndarray  # (m, length) int64 item indices (1-based)
    included: np.ndarray  # (m,) bool: the node's secret

    @property
    def m(self) -> int:
        return len(self.included)

    @property
    def num_included(self) -> int:
        return int(self.included.sum())


def canary_items(node: NodeData) -> np.ndarray:
    """The items a canary may use: the node's DP holder set, which is public.

    Under DP a department node speaks only for its department's catalog items
    (:func:`clients.release.item_holders`): a canary made of other items would have its rows
    reset before release and could never be detected. Any other node speaks for every item.
    Never the items its users touched: that set depends on private data, and one user could
    then change every canary.
    """
    dept = np.asarray(node.catalog.department).astype(str) == node.name
    if dept.any():
        return np.flatnonzero(dept).astype(np.int64) + 1  # 1-based model indices
    return np.arange(1, len(node.catalog.item_id) + 1, dtype=np.int64)


def _draw(pool: np.ndarray, m: int, length: int) -> CanarySet:
    """Sequences of ``pool`` items without repeats inside a sequence (when the pool allows), and the bits."""
    seqs = np.empty((m, length), dtype=np.int64)
    for i in range(m):
        if len(pool) >= length:
            # A partial Fisher-Yates shuffle driven by the CSPRNG.
            idx = list(range(len(pool)))
            for j in range(length):
                r = j + secrets.randbelow(len(pool) - j)
                idx[j], idx[r] = idx[r], idx[j]
            seqs[i] = pool[idx[:length]]
        else:
            seqs[i] = [pool[secrets.randbelow(len(pool))] for _ in range(length)]
    included = np.array([secrets.randbits(1) == 1 for _ in range(m)], dtype=bool)
    return CanarySet(sequences=seqs, included=included)


def load_canaries(node: NodeData, policy: AuditPolicy, max_len: int) -> CanarySet:
    """The node's canaries, drawn on first use and kept in its state directory.

    A history of ``max_len + 3`` items: after leave-one-out (two held out) exactly one
    training window of ``max_len + 1`` remains, so a canary's example is the same every time.
    A stored set whose size differs from the policy's is an error (it would change the audit
    of spends already in the ledger); the node's operator removes the file to start over.
    """
    path = node.state_dir / _FILE
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            found = CanarySet(sequences=z["sequences"], included=z["included"].astype(bool))
        if found.sequences.shape[1] != max_len + 3:
            raise ValueError(
                f"{path} holds canaries of {found.sequences.shape[1]} items but data.max_len {max_len} needs "
                f"{max_len + 3}; run with data.max_len={found.sequences.shape[1] - 3}, or delete the file to draw "
                "new ones (only for a new population)"
            )
        if found.m != policy.canaries:
            raise ValueError(
                f"{path} holds {found.m} canaries but the node's policy asks for {policy.canaries}; keep "
                f"audit.canaries at {found.m}, or delete the file to draw new ones (only for a new population)"
            )
        return found
    pool = canary_items(node)
    if len(pool) == 0:
        raise ValueError(f"node {node.name} has no items to build canaries from; turn its audit off")
    found = _draw(pool, policy.canaries, max_len + 3)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, sequences=found.sequences, included=found.included)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    log.info("node %s: drew %d canaries for its privacy audit", node.name, found.m)
    return found


def load_holdout(node: NodeData, policy: AuditPolicy) -> np.ndarray:
    """The real users (codes into ``node.interactions``) the node withholds for its membership test.

    Drawn once by the CSPRNG among users with a training example, kept by user id in the
    node's state (``.fedmart/membership-holdout.npz``, 0600), so later runs withhold the same.
    """
    path = node.state_dir / "membership-holdout.npz"
    ids = node.interactions.user_ids.astype(str)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            kept = z["user_ids"].astype(str)
        codes = np.flatnonzero(np.isin(ids, kept))
        if len(kept) != policy.holdout:
            raise ValueError(
                f"{path} withholds {len(kept)} users but the node's policy asks for {policy.holdout}; keep "
                f"audit.holdout at {len(kept)}, or delete the file (only for a new population)"
            )
        return codes
    eligible = np.flatnonzero(node.split.train.lengths() >= 2).tolist()
    if policy.holdout * 2 > len(eligible):
        raise ValueError(
            f"audit.holdout {policy.holdout} needs {2 * policy.holdout} users with a training example; node "
            f"{node.name} has {len(eligible)}: lower it"
        )
    picked = csprng_sample(eligible, policy.holdout)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, user_ids=ids[picked])
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return np.sort(np.asarray(picked, dtype=np.int64))


def csprng_sample(population: list[int], n: int) -> list[int]:
    """``n`` distinct elements by the CSPRNG (a partial Fisher-Yates shuffle)."""
    pool = list(population)
    for j in range(n):
        r = j + secrets.randbelow(len(pool) - j)
        pool[j], pool[r] = pool[r], pool[j]
    return pool[:n]


_WITH: dict[tuple, NodeData] = {}


def with_canaries(node: NodeData, policy: AuditPolicy, max_len: int) -> NodeData:
    """``node`` with its included canaries added as users (cached per process); ``node`` itself is unchanged."""
    if not policy.enabled:
        return node
    # The node's identity, not id(node): a collected NodeData's id can be reused by another.
    key = (str(node.directory), node.name, node.dataset_id, policy.canaries, policy.holdout, max_len)
    if key in _WITH:
        return _WITH[key]
    inter = node.interactions
    if policy.holdout:  # the membership test's non-members never train
        held = np.zeros(inter.num_users, dtype=bool)
        held[load_holdout(node, policy)] = True
        inter = inter.take(np.flatnonzero(~held[inter.user]))
    canaries = load_canaries(node, policy, max_len) if policy.canaries else None
    rows = canaries.sequences[canaries.included] if canaries is not None else np.zeros((0, max_len + 3), np.int64)
    n_in, length = rows.shape
    # Random ids: a canary's id says nothing, and never collides with a real user's.
    ids = np.array([CANARY_PREFIX + secrets.token_hex(8) for _ in range(n_in)])
    t0 = int(inter.timestamp.max()) + 1 if len(inter) else 0
    extra = Interactions(
        user=np.repeat(np.arange(n_in, dtype=np.int64) + inter.num_users, length),
        item=rows.reshape(-1),
        timestamp=np.tile(np.arange(length, dtype=np.int64) + t0, n_in),
        user_ids=ids,
        event=None if inter.event is None else np.full(n_in * length, "canary"),
        user_attrs={},
    )
    merged = Interactions(
        user=np.concatenate([inter.user, extra.user]),
        item=np.concatenate([inter.item, extra.item]),
        timestamp=np.concatenate([inter.timestamp, extra.timestamp]),
        user_ids=np.concatenate([inter.user_ids.astype(str), ids]),
        event=None if inter.event is None else np.concatenate([inter.event.astype(str), extra.event]),
        user_attrs={},  # silo attributes are not used after partitioning
    )
    out = replace(
        _make(node.name, node.directory, node.catalog, merged, node.report),
        canary_users=n_in,
        withheld_users=node.interactions.num_users - inter.num_users,
    )
    out.dataset_id = node.dataset_id
    _WITH[key] = out
    return out


def score_canaries(model: SASRec, canaries: CanarySet, max_len: int, score: str, device: torch.device) -> np.ndarray:
    """One score per canary under ``model``; higher means "more likely trained on".

    The canary's training window (its history without the two held-out items, as a member
    trains on it): ``loglik`` is minus the mean next-item cross-entropy over its positions,
    ``rank`` minus the mean log of each next item's rank among all items.
    """
    return score_sequences(model, list(canaries.sequences[:, :-2]), max_len, score, device)


@torch.no_grad()
def score_sequences(
    model: SASRec, train: list[np.ndarray], max_len: int, score: str, device: torch.device
) -> np.ndarray:
    """The score of :func:`score_canaries` for any users' training sequences (their last window)."""
    model.eval()
    model.to(device)
    window = [t[-(max_len + 1) :] for t in train]
    inputs = torch.from_numpy(np.stack([_left_pad(w[:-1], max_len) for w in window])).to(device)
    targets = torch.from_numpy(np.stack([_left_pad(w[1:], max_len) for w in window])).to(device)
    out = []
    for start in range(0, len(inputs), 256):
        x, y = inputs[start : start + 256], targets[start : start + 256]
        logits, loss = model(x, y, reduction="none")  # logits (b, t', n + 1); loss (b,)
        if score == "loglik":
            out.append(-loss.float().cpu().numpy())
            continue
        y = y[:, x.shape[1] - logits.shape[1] :]
        logits = logits.float()
        logits[..., 0] = float("-inf")
        true = logits.gather(-1, y.clamp(min=0).unsqueeze(-1))  # (b, t', 1)
        rank = (logits > true).sum(-1).float() + 1.0  # (b, t')
        valid = (y > 0).float()
        out.append((-(torch.log(rank) * valid).sum(1) / valid.sum(1).clamp(min=1)).cpu().numpy())
    return np.concatenate(out)
