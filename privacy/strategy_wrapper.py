"""The base of fedmart's privacy wrappers around a Flower Message-API strategy.

A wrapper adds one privacy step to training (secure aggregation, client-level DP) and leaves
sampling, aggregation rules and evaluation to the strategy it wraps, so wrappers compose:
``SecAggStrategy(ClientDPStrategy(FedAdam(...)))``. Evaluation passes through untouched: its
metrics are computed outside the privacy mechanisms and are not covered by them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["StrategyWrapper", "one_reply_explained"]


class _ExplainOneReply(logging.Filter):
    """Rewrites Flower's "aggregate_train: Received 1 results and 0 failures" into what that one reply is."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            return True
        # (wrappers nest: the innermost one's words, applied last, are the true ones)
        if text.startswith(("aggregate_train: Received ", "aggregate_train: 1 result")):
            record.msg, record.args = f"aggregate_train: {self.what}", None
        return True


@contextmanager
def one_reply_explained(what: str) -> Iterator[None]:
    """While the inner strategy aggregates the one reply a wrapper hands it, its log line says what it is.

    Flower's strategies log the number of replies they receive; behind a wrapper that is always 1
    ("Received 1 results" with 3 nodes), which reads like two nodes were lost.
    """
    flower = logging.getLogger("flwr")
    explain = _ExplainOneReply(what)
    flower.addFilter(explain)
    try:
        yield
    finally:
        flower.removeFilter(explain)


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
