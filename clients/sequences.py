"""Chronological per-user sequences, the leave-one-out split, and the batches built from them.

One training example is one user's whole history at this node: that is what makes
Opacus's per-example guarantee a per-user guarantee (see :mod:`privacy.dp`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from clients.interactions import Interactions

__all__ = [
    "Sequences",
    "Split",
    "build_sequences",
    "leave_one_out",
    "TrainDataset",
    "EvalBatch",
    "eval_batches",
]


@dataclass
class Sequences:
    """Users' item sequences in CSR form, oldest first.

    ``items[offsets[u]:offsets[u + 1]]`` is user ``u``'s chronological history.
    """

    items: np.ndarray  # (n,) int64 item indices
    offsets: np.ndarray  # (u + 1,) int64
    user_ids: np.ndarray  # (u,) str

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def of(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]


def build_sequences(data: Interactions) -> Sequences:
    """Sort events by (user, timestamp), ties kept in input order (stable sort)."""
    order = np.lexsort((data.timestamp, data.user))  # last key is primary
    counts = np.bincount(data.user, minlength=data.num_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Sequences(items=data.item[order].astype(np.int64), offsets=offsets, user_ids=data.user_ids)


@dataclass
class Split:
    """Leave-one-out by time: last item test, second-last validation, the rest training.

    Users with fewer than 3 events keep everything for training and have no
    validation/test target (``valid_target``/``test_target`` = 0).
    """

    train: Sequences
    valid_target: np.ndarray  # (u,) item index or 0
    test_target: np.ndarray  # (u,) item index or 0

    @property
    def eval_users(self) -> np.ndarray:
        return np.flatnonzero(self.test_target > 0)

    def item_counts(self, num_items: int) -> np.ndarray:
        """Training-set popularity, (num_items + 1,) with index 0 = padding."""
        return np.bincount(self.train.items, minlength=num_items + 1)


def leave_one_out(seqs: Sequences) -> Split:
    lengths = seqs.lengths()
    has_eval = lengths >= 3
    ends = seqs.offsets[1:]
    test_t = np.where(has_eval, seqs.items[np.maximum(ends - 1, 0)], 0)
    valid_t = np.where(has_eval, seqs.items[np.maximum(ends - 2, 0)], 0)
    keep = np.ones(len(seqs.items), dtype=bool)
    keep[(ends - 1)[has_eval]] = False
    keep[(ends - 2)[has_eval]] = False
    new_len = lengths - 2 * has_eval
    offsets = np.concatenate([[0], np.cumsum(new_len)]).astype(np.int64)
    train = Sequences(items=seqs.items[keep], offsets=offsets, user_ids=seqs.user_ids)
    return Split(train=train, valid_target=valid_t.astype(np.int64), test_target=test_t.astype(np.int64))


def _left_pad(x: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    x = x[-length:]
    if len(x):
        out[-len(x) :] = x
    return out


class TrainDataset(Dataset):
    """One example per user: (input, target), both (max_len,), left-padded with 0.

    ``target[t]`` is the item after ``input[t]``: every position is a next-item
    prediction, as in SASRec. Users with fewer than 2 training items are skipped
    (they have no next-item pair); ``users`` lists those kept.

    With ``random_window`` a history longer than ``max_len + 1`` contributes a
    random window of it each time it is drawn (from torch's RNG, so seeded runs
    repeat), instead of always its most recent part: over epochs the whole history
    is used, and one example is still one user's data.
    """

    def __init__(self, train: Sequences, max_len: int, *, random_window: bool = True) -> None:
        self.train = train
        self.max_len = max_len
        self.random_window = random_window
        self.users = np.flatnonzero(train.lengths() >= 2)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.train.of(int(self.users[i]))
        span = self.max_len + 1
        end = len(seq)
        if self.random_window and len(seq) > span:
            end = int(torch.randint(span, len(seq) + 1, ()).item())
        window = seq[max(0, end - span) : end]
        return (
            torch.from_numpy(_left_pad(window[:-1], self.max_len)),
            torch.from_numpy(_left_pad(window[1:], self.max_len)),
        )


@dataclass
class EvalBatch:
    inputs: torch.Tensor  # (b, max_len) history, left-padded
    targets: torch.Tensor  # (b,) held-out item
    seen: list[np.ndarray]  # items to mask from ranking, per row


def eval_batches(split: Split, which: str, max_len: int, batch_size: int = 256):
    """Yield evaluation batches for ``which`` in {"valid", "test"}.

    The validation input is the training history; the test input is the training
    history plus the validation item. Already-seen items (the input history) are
    masked from the ranking.
    """
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', not {which!r}")
    users = split.eval_users
    for start in range(0, len(users), batch_size):
        us = users[start : start + batch_size]
        hists = []
        for u in us:
            h = split.train.of(int(u))
            if which == "test":
                h = np.append(h, split.valid_target[u])
            hists.append(h)
        inputs = torch.from_numpy(np.stack([_left_pad(h, max_len) for h in hists]))
        target = split.valid_target[us] if which == "valid" else split.test_target[us]
        yield EvalBatch(inputs=inputs, targets=torch.from_numpy(target), seen=hists)
