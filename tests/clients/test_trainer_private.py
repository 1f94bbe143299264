"""train_epoch_private: the node's loop over make_private's objects, in every mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.sequences import Sequences, TrainDataset
from clients.trainer import make_loader, make_optimizer, train_epoch_private
from conf.settings import TrainSettings
from federation.model import SASRec, SASRecConfig
from privacy.dp import DPConfig, make_private
from privacy.ledger import PrivacyLedger


def _dataset(users: int = 24, max_len: int = 6) -> TrainDataset:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, users)
    items = rng.integers(1, 31, lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seqs = Sequences(items=items.astype(np.int64), offsets=offsets, user_ids=np.array([f"u{i}" for i in range(users)]))
    return TrainDataset(seqs, max_len)


@pytest.mark.parametrize(("mode", "gsm"), [("off", "hooks"), ("dp", "hooks"), ("dp", "ghost"), ("dp", "bk")])
def test_a_node_round_check_train_record(tmp_path, mode, gsm):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=30, max_len=6, hidden=16, layers=1, heads=2))
    dataset = _dataset()
    optim = TrainSettings(batch_size=6)
    loader = make_loader(dataset, optim.batch_size, seed=0)
    cfg = DPConfig(mode=mode, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=gsm)
    ledger = PrivacyLedger(tmp_path / "ledger.json", population_id="node-a")
    pt = make_private(
        module=model,
        optimizer=make_optimizer(model, optim),
        data_loader=loader,
        config=cfg,
        epochs=1,
        accountant_history=ledger.history,
    )
    with pt:
        if pt.is_private:
            plan = pt.plan
            decision = ledger.check(
                max_epsilon=50.0,
                noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=plan.steps,
                delta=plan.delta,
            )
            assert decision.allowed
        stats = train_epoch_private(pt, torch.device("cpu"))
        if pt.is_private:
            ledger.record(*pt.spent(), round=1, run="run-1", training_id=pt.training_id)
    assert stats["steps"] == len(loader) and np.isfinite(stats["loss"])
    if mode == "off":
        assert stats["epsilon"] == 0.0 and ledger.history == []
    else:
        assert ledger.history == [(1.0, 1 / len(loader), len(loader))]
        assert stats["epsilon"] > 0
        assert stats["epsilon"] == pytest.approx(ledger.epsilon(pt.delta))
        assert stats["epsilon"] == pytest.approx(decision.epsilon_after)
