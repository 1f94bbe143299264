"""Full-ranking metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from federation.metrics import RankingMetrics, popularity_scores, ranks


def test_ranks_by_hand():
    # columns: pad, 1..5
    scores = torch.tensor([[9.0, 0.5, 0.9, 0.1, 0.7, 0.3], [9.0, 0.2, 0.2, 0.8, 0.1, 0.0]])
    # row 0: target 4 (0.7) beaten by item 2 (0.9) -> rank 1; padding never counts
    # row 1: target 1 (0.2) beaten by 3 (0.8), tied with 2 (ties count against) -> rank 2
    assert ranks(scores, torch.tensor([4, 1])).tolist() == [1, 2]


def test_seen_items_are_masked_but_not_the_target():
    scores = torch.tensor([[0.0, 0.5, 0.9, 0.1, 0.7, 0.3]])
    assert ranks(scores, torch.tensor([4]), [np.array([2])]).tolist() == [0]
    # a repeat item (target in history) is still ranked by its own score
    assert ranks(scores, torch.tensor([4]), [np.array([2, 4])]).tolist() == [0]


def test_metric_values_by_hand():
    m = RankingMetrics(ks=(1, 10))
    m.update(torch.tensor([0, 1, 9, 10]))
    out = m.compute()
    assert out["hr@1"] == pytest.approx(0.25)
    assert out["hr@10"] == pytest.approx(0.75)
    expect = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 4
    assert out["ndcg@10"] == pytest.approx(expect)
    assert out["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 4)
    assert out["users"] == 4


def test_constant_scorer_gets_no_credit():
    scores = torch.zeros(3, 101)
    r = ranks(scores, torch.tensor([1, 50, 100]))
    assert r.tolist() == [99, 99, 99]


def test_popularity_breaks_ties_deterministically():
    s = popularity_scores(np.array([0, 5, 5, 1]), batch=2)
    assert s.shape == (2, 4)
    assert s[0, 1] > s[0, 2] > s[0, 3]
