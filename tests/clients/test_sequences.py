"""Chronological sequences and the leave-one-out split on hand-made histories."""

from __future__ import annotations

import numpy as np
import torch

from clients.interactions import Interactions
from clients.sequences import TrainDataset, build_sequences, eval_batches, leave_one_out


def _inter() -> Interactions:
    # user 0: items 5,3,9,2 at t=40,10,30,20 -> chronological 3,2,9,5
    # user 1: items 1,4 (too short to evaluate); user 2: 7,8,6
    return Interactions(
        user=np.array([0, 0, 0, 0, 1, 1, 2, 2, 2]),
        item=np.array([5, 3, 9, 2, 1, 4, 7, 8, 6]),
        timestamp=np.array([40, 10, 30, 20, 5, 6, 1, 2, 3]),
        user_ids=np.array(["a", "b", "c"]),
    )


def test_sequences_are_chronological():
    seqs = build_sequences(_inter())
    assert seqs.of(0).tolist() == [3, 2, 9, 5]
    assert seqs.of(1).tolist() == [1, 4]
    assert seqs.of(2).tolist() == [7, 8, 6]


def test_ties_keep_input_order():
    inter = Interactions(
        user=np.array([0, 0, 0]), item=np.array([4, 2, 3]), timestamp=np.array([7, 7, 7]), user_ids=np.array(["a"])
    )
    assert build_sequences(inter).of(0).tolist() == [4, 2, 3]


def test_leave_one_out():
    split = leave_one_out(build_sequences(_inter()))
    assert split.train.of(0).tolist() == [3, 2]
    assert split.valid_target.tolist() == [9, 0, 8]
    assert split.test_target.tolist() == [5, 0, 6]
    assert split.train.of(1).tolist() == [1, 4]  # too short: all training, not evaluated
    assert split.train.of(2).tolist() == [7]
    assert split.eval_users.tolist() == [0, 2]


def test_train_dataset_shifts_targets_and_left_pads():
    split = leave_one_out(build_sequences(_inter()))
    ds = TrainDataset(split.train, max_len=4, random_window=False)
    assert ds.users.tolist() == [0, 1]  # user 2 has a single training item: no next-item pair
    x, y = ds[0]
    assert x.tolist() == [0, 0, 0, 3]
    assert y.tolist() == [0, 0, 0, 2]


def test_random_window_stays_inside_the_history():
    seq_items = np.arange(1, 21)
    inter = Interactions(
        user=np.zeros(20, dtype=np.int64), item=seq_items, timestamp=np.arange(20), user_ids=np.array(["a"])
    )
    split = leave_one_out(build_sequences(inter))
    ds = TrainDataset(split.train, max_len=5)
    torch.manual_seed(0)
    for _ in range(50):
        x, y = ds[0]
        assert (x > 0).all()
        assert (y - x == 1).all()  # consecutive items: target is the next one
        assert y.max() <= 18  # never the validation (19) or test (20) item


def test_eval_batches_inputs_and_seen():
    split = leave_one_out(build_sequences(_inter()))
    (valid,) = list(eval_batches(split, "valid", max_len=3))
    assert valid.inputs.tolist() == [[0, 3, 2], [0, 0, 7]]
    assert valid.targets.tolist() == [9, 8]
    (test,) = list(eval_batches(split, "test", max_len=3))
    assert test.inputs.tolist() == [[3, 2, 9], [0, 7, 8]]
    assert [s.tolist() for s in test.seen] == [[3, 2, 9], [7, 8]]
