"""Scoring (serving/scoring.py): padding, jobs, the top-k of a batch and of the fallback, the traced scorer."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from federation.model import SASRec, SASRecConfig, create
from serving import scoring
from serving.scoring import Job, fallback_top, fast_scorer, fit, left_pad, make_job, rank_batch

CPU = torch.device("cpu")


def test_left_pad_keeps_the_newest_items_last():
    assert left_pad(np.array([4, 5]), 4).tolist() == [0, 0, 4, 5]
    assert left_pad(np.array([1, 2, 3, 4, 5]), 3).tolist() == [3, 4, 5]


def test_fit_returns_a_sequence_of_the_right_length_as_is():
    seq = np.array([0, 7, 8], dtype=np.int64)

    assert fit(seq, 3) is seq
    assert fit(seq, 5).tolist() == [0, 0, 0, 7, 8]
    assert fit(seq, 2).tolist() == [7, 8]


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_make_job_pads_the_history_and_excludes_it_when_asked(exclude_seen):
    known = np.array([3, 9], dtype=np.int64)

    job = make_job(known, 4, k=5, exclude_seen=exclude_seen, department="D")

    assert job.seq.tolist() == [0, 0, 3, 9] and job.seq.dtype == np.int64
    assert (job.exclude is known) if exclude_seen else job.exclude is None
    assert (job.k, job.department) == (5, "D")


def _snapshot_scoring(scores: list[float], max_len: int = 4) -> SimpleNamespace:
    """A stand-in snapshot whose model gives every sequence the same scores (column 0 is padding)."""
    row = torch.tensor([-math.inf, *scores])

    def infer(seq: torch.Tensor) -> torch.Tensor:
        assert seq.shape[1] == max_len
        return row.repeat(seq.shape[0], 1)

    return SimpleNamespace(max_len=max_len, infer=infer)


def test_rank_batch_gives_each_job_its_own_top_k_without_excluded_or_foreign_items():
    snap = _snapshot_scoring([0.1, 0.5, 0.9, 0.3, 0.7])  # items 1..5; best first: 3, 5, 2, 4, 1
    outside = {"odd": torch.tensor([True, False, True, False, True, False])}  # keeps items 1, 3, 5
    jobs = [
        Job(np.array([0, 0, 0, 1]), exclude=None, department=None, k=3),
        Job(np.array([0, 0, 3, 1]), exclude=np.array([3, 1]), department=None, k=2),
        Job(np.array([0, 0, 0, 2]), exclude=None, department="odd", k=5),
        Job(np.array([0, 0, 9, 9, 9, 2]), exclude=np.array([5]), department="odd", k=1),  # longer: cut to max_len
    ]

    out = rank_batch(snap, jobs, outside, CPU)

    assert [idx.tolist() for idx, _ in out] == [[3, 5, 2], [5, 2], [3, 5, 1], [3]]
    assert out[0][1] == pytest.approx([0.9, 0.7, 0.5])
    assert all(np.isfinite(s).all() for _, s in out)  # only 3 items in "odd": k=5 gives 3, not -inf filler


def test_fallback_top_filters_department_and_exclusions_in_fallback_order():
    snap = SimpleNamespace(fallback_order=np.array([4, 2, 1, 3]), fallback_scores=np.array([0.0, 2.0, 3.0, 1.0, 4.0]))
    even = np.array([False, False, True, False, True])

    assert fallback_top(snap, k=3, department=None, exclude=None)[0].tolist() == [4, 2, 1]
    top, scores = fallback_top(snap, k=3, department=even, exclude=np.array([4]))
    assert top.tolist() == [2] and scores.tolist() == [3.0]


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    cfg = SASRecConfig(num_items=30, hidden=16, layers=1, heads=1, max_len=8, dropout=0.0, attn_dropout=0.0)
    return SASRec(cfg).eval()


def test_the_traced_scorer_matches_score_last_on_padded_batches(model):
    infer, path = fast_scorer(model, CPU)
    seq = torch.zeros(3, 8, dtype=torch.long)
    seq[0, 5:] = torch.tensor([4, 9, 2])
    seq[1, 7:] = torch.tensor([30])
    seq[2, :] = torch.arange(1, 9)

    with torch.inference_mode():
        got, want = infer(seq), model.score_last(seq)

    assert path == "traced, trimmed"
    assert torch.allclose(got[:, 1:], want[:, 1:], rtol=1e-4, atol=1e-4)
    assert torch.isneginf(got[:, 0]).all()


def test_the_id_only_model_with_title_text_takes_the_traced_path():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(31, 12), dim=-1)
    text[0] = 0
    cfg = SASRecConfig(
        num_items=30, hidden=16, layers=1, heads=1, max_len=8, dropout=0.0, attn_dropout=0.0, text_dim=12
    )
    model = SASRec(cfg, text_embeddings=text).eval()

    _, path = fast_scorer(model, CPU)

    assert path == "traced, trimmed"


def _tower(item_bias: bool) -> SASRec:
    """A small text tower (``model=sasrec_text``): random unit text rows, residuals and biases off zero."""
    torch.manual_seed(0)
    n, f = 40, 24
    text = torch.nn.functional.normalize(torch.randn(n + 1, f), dim=-1)
    text[0] = 0  # the padding row, as federation.text gives it
    dims = {"hidden": 16, "layers": 2, "heads": 2, "max_len": 8, "dropout": 0.0, "attn_dropout": 0.0}
    cfg = SASRecConfig(num_items=n, **dims, text_dim=f, tower=True, item_bias=item_bias)
    model = create(cfg, text)
    with torch.no_grad():  # away from the zero start, so the residual and bias count in the check
        model.tower.residual[1:].normal_(std=0.3)
        if model.tower.bias is not None:
            model.tower.bias[1:].normal_(std=0.5)
    return model.eval()


@pytest.mark.parametrize("item_bias", [True, False])
def test_the_text_tower_is_traced_with_its_item_table_precomputed(item_bias):
    model = _tower(item_bias)

    infer, path = fast_scorer(model, CPU)

    assert path == "traced, trimmed"
    g = torch.Generator().manual_seed(3)
    for b, lengths in [(1, [8]), (1, [1]), (2, [3, 5]), (5, [1, 2, 4, 7, 8]), (32, [6] * 32)]:
        seq = torch.zeros(b, 8, dtype=torch.long)
        for i, k in enumerate(lengths):
            seq[i, 8 - k :] = torch.randint(1, 41, (k,), generator=g)
        with torch.inference_mode():
            got, want = infer(seq), model.score_last(seq)
        assert got.shape == want.shape == (b, 41)
        assert torch.isneginf(got[:, 0]).all()
        assert torch.allclose(got[:, 1:], want[:, 1:], rtol=1e-4, atol=1e-4)


def test_the_traced_tower_scorer_works_outside_inference_mode():
    model = _tower(True)
    infer, _ = fast_scorer(model, CPU)
    seq = torch.tensor([[0, 0, 0, 0, 0, 3, 9, 40]])

    with torch.no_grad():
        got, want = infer(seq), model.score_last(seq)

    assert torch.allclose(got[:, 1:], want[:, 1:], rtol=1e-4, atol=1e-4)


def test_a_scorer_that_cannot_be_traced_falls_back_to_the_eager_model(model, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("tracer says no")

    monkeypatch.setattr(scoring.torch.jit, "trace", broken)

    with caplog.at_level(logging.WARNING, logger="serving.scoring"):
        infer, path = fast_scorer(model, CPU)

    assert path == "eager" and infer == model.score_last
    assert "tracer says no" in caplog.text
