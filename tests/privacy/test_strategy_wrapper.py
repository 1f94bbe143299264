"""The base of the privacy wrappers (privacy/strategy_wrapper.py): validated inner, weight key, evaluation passed on."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAvg

from privacy.strategy_wrapper import StrategyWrapper


class _Plain(StrategyWrapper):
    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def test_the_wrapper_takes_the_inner_weight_key_and_passes_evaluation_on():
    inner = FedAvg(weighted_by_key="users", fraction_evaluate=0.0)
    wrapped = _Plain(inner)

    assert wrapped.inner is inner and wrapped.weighted_by_key == "users"
    assert _Plain(inner, weighted_by_key="w").weighted_by_key == "w"
    assert list(wrapped.configure_evaluate(1, None, None, None)) == []  # FedAvg: fraction_evaluate 0
    assert wrapped.aggregate_evaluate(1, []) is None
    with pytest.raises(ValueError, match="flwr.serverapp.strategy.Strategy, got object"):
        _Plain(object())
