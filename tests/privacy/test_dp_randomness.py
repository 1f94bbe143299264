"""A replayed seed (issue 13): the DP randomness of ``make_private`` never comes from the run seed.

The coordinator knows the run seed. If Poisson sampling or the noise followed it, it could
recompute which users each step sampled (losing the amplification the accountant counts on)
and a retrained round would draw the same noise again. Here two trainings start from the same
run seed (``torch.manual_seed`` and the loader's generator, as a node seeds them) and their
sampled-user indicators and noise draws are compared statistically, over many steps: their
correlation must be what independent draws give. With a test-injected
:class:`~privacy.dp.PrivateRandomness` of equal seeds the same comparison gives 1, so the
statistic can fail; without DP the same seed repeats the training bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp import DPConfig, PrivateRandomness, make_private

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

USERS, BATCH = 64, 16  # Poisson rate q = 1/4: 16 users in a step on average
SIGMA, CLIP, LR = 1.0, 1.0, 1.0
EPOCHS = 50  # 4 steps an epoch: 200 sampled steps, 64 indicators each
NOISE_STEPS = 50
RUN_SEED = 1234


class Tiny(nn.Module):
    """One embedding row per user (the user's index is the input) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(USERS, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", packed: bool = False):
        logits = self.head(self.emb(x).mean(1))  # (b, 3)
        loss = F.cross_entropy(logits, y, reduction="none")  # (b,)
        return logits, loss if reduction == "none" else loss.mean()


def _seeded_setup() -> tuple[Tiny, torch.optim.Optimizer, DataLoader]:
    """Model, optimizer and loader as a node builds them after seeding from the run seed."""
    torch.manual_seed(RUN_SEED)
    model = Tiny()
    users = torch.arange(USERS).unsqueeze(1)  # (n, 1): example i is user i
    loader = DataLoader(
        TensorDataset(users, torch.randint(0, 3, (USERS,))),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(RUN_SEED),
    )
    return model, torch.optim.SGD(model.parameters(), lr=LR), loader


def _draws(mode: str, rng: PrivateRandomness | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sampled-user indicators (steps, users), noise added to the weights (steps, parameters))."""
    model, opt, loader = _seeded_setup()
    config = DPConfig(mode="dp", noise_multiplier=SIGMA, max_grad_norm=CLIP, delta=1e-5, grad_sample_mode=mode)
    with make_private(module=model, optimizer=opt, data_loader=loader, config=config, epochs=EPOCHS, rng=rng) as pt:
        sampled = []
        for _ in range(EPOCHS):
            for xb, _ in pt.data_loader:
                row = np.zeros(USERS)
                row[xb[:, 0].numpy()] = 1.0
                sampled.append(row)
        noise = []
        for _ in range(NOISE_STEPS):  # a step on an empty batch: its update is the noise alone
            before = torch.cat([p.detach().flatten() for p in model.parameters()])
            pt.noise_step()
            after = torch.cat([p.detach().flatten() for p in model.parameters()])
            noise.append((after - before).numpy())
    return np.array(sampled), np.array(noise, dtype=np.float64)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _chance(a: np.ndarray) -> float:
    """Five standard errors of the correlation of two independent samples of this size."""
    return 5.0 / np.sqrt(a.size)


@pytest.mark.parametrize("mode", ["bk", "hooks", "ghost"])
def test_the_same_run_seed_draws_other_users_and_other_noise(mode):
    sampled_a, noise_a = _draws(mode)
    sampled_b, noise_b = _draws(mode)

    # both are the mechanism the accountant assumes: Poisson at rate q, noise sigma*C/B per weight
    for sampled, noise in ((sampled_a, noise_a), (sampled_b, noise_b)):
        q = BATCH / USERS
        assert abs(sampled.mean() - q) < 5 * np.sqrt(q * (1 - q) / sampled.size)
        assert noise.std() == pytest.approx(LR * SIGMA * CLIP / BATCH, rel=0.05)
    # and nothing of either repeats in the other, beyond chance
    assert abs(_correlation(sampled_a, sampled_b)) < _chance(sampled_a)
    assert abs(_correlation(noise_a, noise_b)) < _chance(noise_a)
    both = (sampled_a * sampled_b).mean()  # a user sampled at the same step in both: q^2 by chance, q if replayed
    assert abs(both - (BATCH / USERS) ** 2) < 5 * np.sqrt(both * (1 - both) / sampled_a.size)


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_injected_generators_of_equal_seeds_repeat_both_exactly(mode):
    def rng() -> PrivateRandomness:
        return PrivateRandomness(sampling=torch.Generator().manual_seed(7), noise=torch.Generator().manual_seed(8))

    sampled_a, noise_a = _draws(mode, rng())
    sampled_b, noise_b = _draws(mode, rng())

    assert np.array_equal(sampled_a, sampled_b) and np.array_equal(noise_a, noise_b)
    assert _correlation(sampled_a, sampled_b) == pytest.approx(1.0)  # what the statistic above refuses


def test_the_operating_system_seeds_a_new_pair_of_generators_every_time():
    a, b = PrivateRandomness.from_os("cpu"), PrivateRandomness.from_os("cpu")

    seeds = {a.sampling.initial_seed(), a.noise.initial_seed(), b.sampling.initial_seed(), b.noise.initial_seed()}
    assert len(seeds) == 4


def test_without_dp_the_same_run_seed_repeats_the_training_bit_for_bit():
    def train() -> list[torch.Tensor]:
        model, opt, loader = _seeded_setup()
        with make_private(module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="off"), epochs=3) as pt:
            for _ in range(3):
                for xb, yb in pt.data_loader:
                    opt.zero_grad(set_to_none=True)
                    _, loss = pt.module(xb, yb)
                    pt.loss_fn(loss).backward()
                    opt.step()
        return [p.detach().clone() for p in model.parameters()]

    first, second = train(), train()

    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], _seeded_setup()[0].emb.weight), "the training changed the weights"
