"""DP-SGD façade (privacy/dp.py): the same object in every mode, clipping, accounting, the plan it follows."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.accounting import epsilon, noise_multiplier_for
from privacy.dp import DPConfig, make_private
from privacy.dp_plan import plan_training

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


class Tiny(nn.Module):
    """nn.Embedding + nn.Linear with the recommender's calling convention."""

    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
        # no packed_loss: bk clips this model's per-example loss from forward (one row per example)
        logits = self.head(self.emb(x).mean(1))  # (b, classes)
        loss = F.cross_entropy(logits, y, reduction="none")  # (b,)
        return logits, loss if reduction == "none" else loss.mean()


def _setup(n: int = 24, batch_size: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    x, y = torch.randint(0, 20, (n, 4)), torch.randint(0, 5, (n,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return model, opt, loader, x, y


def _train(pt, epochs: int = 1) -> None:
    for _ in range(epochs):
        for xb, yb in pt.data_loader:
            if len(xb) == 0:
                pt.noise_step()
                continue
            pt.optimizer.zero_grad(set_to_none=True)
            _, per_example = pt.module(xb, yb, reduction="none")
            pt.loss_fn(per_example).backward()
            pt.optimizer.step()


# ---- off mode -------------------------------------------------------------------------


def test_off_mode_returns_the_originals():
    model, opt, loader, _, _ = _setup()
    pt = make_private(module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="off"), epochs=1)
    assert pt.module is model and pt.optimizer is opt and pt.data_loader is loader
    assert not pt.is_private and pt.accountant is None and pt.epsilon() == 0.0
    assert pt.loss_fn(torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)
    assert pt.close() is model


# ---- per-sample clipping (Opacus GradSampleModule + DPOptimizer) ------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 8),
    clip=st.floats(1e-3, 10.0),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_clipped_per_sample_gradient_norm_never_exceeds_the_bound(batch, clip, scale, seed):
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)  # large weights -> large gradients, small ones -> no clipping
    gsm = GradSampleModule(model)
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=batch
    )
    x, y = torch.randint(0, 20, (batch, 4)), torch.randint(0, 5, (batch,))
    _, per_example = gsm(x, y, reduction="none")
    per_example.mean().backward()
    per_sample = {p: p.grad_sample.clone() for p in opt.params}
    for i in range(batch):
        # Feed one user's gradient at a time through the optimizer's own clipping.
        opt.zero_grad(set_to_none=True)
        for p in opt.params:
            p.grad_sample = per_sample[p][i : i + 1]
        opt.clip_and_accumulate()
        clipped = math.sqrt(sum(float(p.summed_grad.pow(2).sum()) for p in opt.params))
        raw = math.sqrt(sum(float(per_sample[p][i].pow(2).sum()) for p in opt.params))
        assert clipped <= clip * (1 + 1e-5)
        if raw <= clip:  # below the bound nothing changes
            assert clipped == pytest.approx(raw, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_private_clipped_sum_equals_per_user_clipping(mode):
    model, opt, loader, x, y = _setup(n=6)
    reference = copy.deepcopy(model)
    clip = 0.3
    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(len(x)):
        reference.zero_grad()
        _, loss = reference(x[i : i + 1], y[i : i + 1], reduction="none")
        loss.sum().backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters()))
        for e, p in zip(expected, reference.parameters(), strict=True):
            e += p.grad * min(1.0, clip / (norm + 1e-6))
    cfg = DPConfig(mode="dp", max_grad_norm=clip, grad_sample_mode=mode)
    pt = make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1)
    pt.optimizer.zero_grad()
    _, per_example = pt.module(x, y, reduction="none")
    pt.loss_fn(per_example).backward()
    if mode == "hooks":
        pt.optimizer.clip_and_accumulate()
        got = [p.summed_grad for p in pt.optimizer.params]
    else:  # ghost's second backward pass, or bk's one pass, leaves the clipped sum in .grad
        got = [p.grad for p in pt.optimizer.params]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_loss_fn_refuses_a_reduced_loss_in_private_modes():
    model, opt, loader, x, y = _setup()
    pt = make_private(module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="dp"), epochs=1)
    _, mean_loss = pt.module(x, y)
    with pytest.raises(ValueError, match=r"per-example loss of shape \(b,\)"):
        pt.loss_fn(mean_loss)


# ---- accounting through make_private --------------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_private_training_counts_every_step_and_reports_the_total(mode):
    model, opt, loader, _, _ = _setup(n=24, batch_size=6)
    prior = [(1.3, 0.1, 40)]
    cfg = DPConfig(mode="dp", noise_multiplier=1.1, max_grad_norm=1.0, grad_sample_mode=mode, delta=1e-3)
    with make_private(
        module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=2, accountant_history=prior
    ) as pt:
        before = [p.detach().clone() for p in model.parameters()]
        _train(pt, epochs=2)
        assert pt.steps_taken == pt.plan.steps == 2 * len(loader)
        assert pt.spent() == (1.1, 0.25, 8)
        assert pt.accountant.history == [*prior, pt.spent()]
        assert pt.epsilon() == pt.accountant.get_epsilon(delta=1e-3) == epsilon([*prior, pt.spent()], delta=1e-3)
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert not hasattr(model.emb.weight, "grad_sample")  # closed: hooks and attributes removed


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_noise_step_releases_noise_and_is_accounted(mode):
    model, opt, loader, _, _ = _setup()
    pt = make_private(
        module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="dp", grad_sample_mode=mode), epochs=1
    )
    before = [p.detach().clone() for p in model.parameters()]
    pt.noise_step()
    assert pt.steps_taken == 1 and pt.accountant.history == [(1.0, 0.25, 1)]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    pt.close()


def test_target_mode_calibrates_over_the_planned_epochs():
    model, opt, loader, _, _ = _setup(n=40, batch_size=4)
    cfg = DPConfig(mode="target", target_epsilon=4.0, delta=1e-3)
    plan = plan_training(cfg, data_loader=loader, epochs=1, total_epochs_planned=6)
    pt = make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1, total_epochs_planned=6)
    expected = noise_multiplier_for(target_epsilon=4.0, delta=1e-3, sample_rate=0.1, steps=60)
    assert pt.noise_multiplier == plan.noise_multiplier == pytest.approx(expected)
    # six rounds of one epoch each land on the target, from below (Opacus's search tolerance: 0.01)
    assert 4.0 - 0.011 <= epsilon([pt.spent()[:2] + (60,)], delta=1e-3) <= 4.0
    pt.close()


def test_capped_steps_are_planned_taken_and_accounted():
    """Bounded local work: ``max_steps`` caps the training, target mode calibrates over the
    capped steps of every planned round, and the accountant records the steps taken."""
    from clients.trainer import train_epoch_private

    model, opt, loader, _, _ = _setup(n=40, batch_size=4)  # 10 steps an epoch
    cfg = DPConfig(mode="target", target_epsilon=4.0, delta=1e-3)
    plan = plan_training(cfg, data_loader=loader, epochs=2, total_epochs_planned=12, max_steps=3)
    assert plan.steps == 3  # not 2 epochs x 10
    expected = noise_multiplier_for(target_epsilon=4.0, delta=1e-3, sample_rate=0.1, steps=3 * 6)
    assert plan.noise_multiplier == pytest.approx(expected)
    with make_private(
        module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=2, total_epochs_planned=12, max_steps=3
    ) as pt:
        stats = train_epoch_private(pt, torch.device("cpu"), max_steps=3)
        assert stats["steps"] == pt.steps_taken == 3
        assert pt.spent() == (pytest.approx(expected), 0.1, 3)
    with pytest.raises(ValueError, match="max_steps"):
        plan_training(cfg, data_loader=loader, epochs=1, max_steps=0)


def test_wrapping_a_module_twice_without_close_is_refused():
    model, opt, loader, _, _ = _setup()
    first = make_private(module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="dp"), epochs=1)
    with pytest.raises(ValueError, match="call close"):
        make_private(module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="dp"), epochs=1)
    first.close()
    make_private(module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="dp"), epochs=1).close()


def test_without_poisson_sampling_the_loader_is_kept_and_a_warning_logged(caplog):
    model, opt, loader, _, _ = _setup()
    cfg = DPConfig(mode="dp", poisson_sampling=False)
    pt = make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1)
    assert pt.data_loader is loader
    assert "only an approximation" in caplog.text
    pt.close()


def test_secure_rng_without_torchcsprng_is_a_clear_error():
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover
        pytest.skip("torchcsprng is installed")
    model, opt, loader, _, _ = _setup()
    with pytest.raises(RuntimeError, match="torchcsprng"):
        make_private(
            module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="dp", secure_rng=True), epochs=1
        )


def test_plan_mirrors_opacus_poisson_loader_on_a_float_edge():
    # 1 / (1 / 93) < 93 in floating point: Opacus's Poisson loader runs 92 steps per
    # epoch and accounts at rate 1/92; the plan must say the same.
    model, opt, _, _, _ = _setup()
    ds = TensorDataset(torch.randint(0, 20, (93, 4)), torch.randint(0, 5, (93,)))
    loader = DataLoader(ds, batch_size=1)
    plan = plan_training(DPConfig(mode="dp"), data_loader=loader, epochs=1)
    pt = make_private(module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="dp"), epochs=1)
    assert plan.steps_per_epoch == len(pt.data_loader) == 92
    assert plan.sample_rate == pt.sample_rate == 1 / 92
    pt.close()


def test_the_facade_exports_the_objects_of_the_modules_beside_it():
    import privacy.dp as dp
    from privacy import dp_config, dp_engine, dp_plan, dp_training

    homes = {name: dp_config for name in dp_config.__all__}
    homes |= {name: dp_plan for name in dp_plan.__all__} | {"PrivateTraining": dp_training}
    homes |= {"PrivateRandomness": dp_engine}
    for name, home in homes.items():
        assert getattr(dp, name) is getattr(home, name), name
    assert set(dp.__all__) == set(homes) | {"make_private"}
