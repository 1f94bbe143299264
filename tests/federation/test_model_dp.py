"""The real SASRec under Opacus: one DP-SGD step runs, changes the weights, and clips per user."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from federation.model import SASRec, SASRecConfig
from privacy.dp import DPConfig, make_private

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _model(dropout: float = 0.2) -> SASRec:
    torch.manual_seed(0)
    return SASRec(
        SASRecConfig(num_items=40, max_len=8, hidden=16, layers=2, heads=2, dropout=dropout, attn_dropout=dropout)
    )


def _batch(n: int = 6, t: int = 8, min_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, 41, (n, t + 1), generator=g)
    for i in range(n):  # left padding of varying length, as TrainDataset makes it
        seq[i, : i % 4 + min_pad] = 0
    inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    targets[inputs == 0] = 0
    return inputs, targets


MODES = ["hooks", "ghost", "bk"]


def _per_example(module, inputs, targets, mode: str):
    # bk scores only the positions with a target (packed head); Opacus's modes cannot
    if mode == "bk":
        return module.packed_loss(inputs, targets)
    return module(inputs, targets, reduction="none")[1]


@pytest.mark.parametrize("trimmed", [False, True], ids=["full-width", "trimmed"])
@pytest.mark.parametrize("mode", MODES)
def test_one_dp_sgd_step_on_sasrec_runs_and_changes_the_weights(mode, trimmed):
    """``trimmed``: every row starts with padding, so the model drops leading columns and
    works on a column slice of the batch (Opacus once failed to view() it)."""
    model = _model()
    inputs, targets = _batch(min_pad=2 if trimmed else 0)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = DPConfig(mode="dp", noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, delta=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1) as pt:
        pt.module.train()
        pt.optimizer.zero_grad(set_to_none=True)
        per_example = _per_example(pt.module, inputs, targets, mode)
        assert per_example.shape == (len(inputs),)
        loss = pt.loss_fn(per_example)
        loss.backward()
        pt.optimizer.step()
        assert pt.steps_taken == 1 and pt.accountant.history == [(1.0, 0.5, 1)]
        assert math.isfinite(pt.epsilon()) and pt.epsilon() > 0
    after = model.state_dict()  # keys unprefixed: read weights from the model passed in
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every trainable tensor moved, the frozen one did not
    assert "encoder.embeddings.word_embeddings.weight" not in changed


@pytest.mark.parametrize("trimmed", [False, True], ids=["full-width", "trimmed"])
@pytest.mark.parametrize("mode", MODES)
def test_sasrec_clipped_gradient_sum_equals_per_user_clipping(mode, trimmed):
    model = _model(dropout=0.0)  # deterministic forward, so one user at a time is comparable
    inputs, targets = _batch(min_pad=2 if trimmed else 0)
    clip = 0.05
    reference = copy.deepcopy(model)
    params = [p for p in reference.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(inputs)):
        reference.zero_grad()
        _, loss = reference(inputs[i : i + 1], targets[i : i + 1], reduction="none")
        loss.sum().backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
        assert norm > clip  # the bound binds for every user
        for e, p in zip(expected, params, strict=True):
            e += p.grad * (clip / (norm + 1e-6))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    cfg = DPConfig(mode="dp", max_grad_norm=clip, grad_sample_mode=mode)
    with make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1) as pt:
        pt.optimizer.zero_grad()
        per_example = _per_example(pt.module, inputs, targets, mode)
        pt.loss_fn(per_example).backward()
        if mode == "hooks":
            pt.optimizer.clip_and_accumulate()
            got = [p.summed_grad for p in pt.optimizer.params]
        else:
            got = [p.grad for p in pt.optimizer.params]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_dp_sgd_step_on_cuda(mode):
    model = _model()
    inputs, targets = _batch()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = DPConfig(mode="dp", grad_sample_mode=mode, delta=1e-3)
    with make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1, device="cuda") as pt:
        before = model.head.weight.detach().clone()
        pt.optimizer.zero_grad(set_to_none=True)
        per_example = _per_example(pt.module, inputs.cuda(), targets.cuda(), mode)
        pt.loss_fn(per_example).backward()
        pt.optimizer.step()
        assert model.head.weight.is_cuda and not torch.equal(before, model.head.weight)
        assert pt.steps_taken == 1
