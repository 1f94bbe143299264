"""The base of fedmart's privacy wrappers around a Flower Message-API strategy.

A wrapper adds one privacy step to training (secure aggregation, client-level DP) and leaves
sampling, aggregation rules and evaluation to the strategy it wraps, so wrappers compose:
``SecAggStrategy(ClientDPStrategy(FedAdam(...)))``. Evaluation passes through untouched: its
metrics are computed outside the privacy mechanisms and are not covered by them.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["StrategyWrapper"]


class StrategyWrapper(Strategy):
    """A strategy around ``inner``; subclasses implement the training methods and ``summary``.

    Parameters
    ----------
    inner : Strategy
        The wrapped strategy (``self.inner``, which checkpointing follows to find FedOpt's state).
    weighted_by_key : str, optional
        MetricRecord key of a reply's weight; defaults to ``inner.weighted_by_key`` when the
        inner strategy has one, else ``"num-examples"``.
    """

    def __init__(self, inner: Strategy, *, weighted_by_key: str | None = None) -> None:
        if not isinstance(inner, Strategy):
            raise ValueError(f"inner must be a flwr.serverapp.strategy.Strategy, got {type(inner).__name__}")
        self.inner = inner
        self.weighted_by_key = weighted_by_key or str(getattr(inner, "weighted_by_key", "num-examples"))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy (evaluation metrics are not covered by the wrapper)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)
