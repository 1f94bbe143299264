"""Client-level DP as a strategy wrapper: noise on the sum of the clipped updates, before the inner strategy.

``ClientDPStrategy(inner, config=ClientDPConfig(...))`` behaves like ``inner`` except that
``inner.aggregate_train`` never sees the nodes' replies: the wrapper averages them itself,
turns the average back into the sum of the clipped updates, adds the Gaussian noise of
:func:`privacy.client_dp.add_noise_to_sum` to that sum, and hands ``inner`` **one**
synthetic reply carrying the noised mean with the replies' total weight. Whatever ``inner``
does next (FedAvg returns the mean unchanged; a holder normalisation divides item rows by
their holders' share; FedAdam takes its server step) is post-processing of a DP release.

This is the order Flower's ``DifferentialPrivacyServerSideFixedClipping`` and
``DifferentialPrivacyClientSideFixedClipping`` do not keep: they noise the inner strategy's
*output*, which after an adaptive step (FedAdam) or a weighted mean has no bounded
sensitivity (see :mod:`privacy.client_dp`). Composition: under secure aggregation the stack is
``SecAggStrategy(ClientDPStrategy(inner))``; the secure sum's one synthetic reply is then the
only reply this wrapper averages, and the noise still goes on the sum.

The guarantee and the assumptions it rests on
---------------------------------------------
Client-level ``(epsilon, delta)``-DP under add/remove-one-node adjacency, per round a
Gaussian mechanism of sensitivity ``C`` (``config.clipping_norm``) composed over rounds by
:meth:`privacy.client_dp.ClientDPConfig.epsilon`, provided that:

* every node clipped its update ``new - global`` to L2 norm ``C``
  (:func:`privacy.client_dp.clip_update`) and replied with weight 1, so the weighted mean of
  the replies is ``global + sum_k u_k / m`` and the recovered sum has sensitivity ``C``;
* ``m``, the replies' total weight (the number of nodes in the sum), is treated as public:
  the coordinator knows it, and dividing by it is post-processing;
* the arrays named in ``exclude`` are public (in fedmart, the item-holder shares, which
  nodes take from the public catalog under client-level DP); they pass through unnoised;
* the noise generator is not predictable (``add_noise_to_sum`` draws from OS entropy).

The coordinator adds the noise and sees the noiseless sum: this protects a node's
contribution against everyone who sees the global model, not against the coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_arrayrecords,
    aggregate_metricrecords,
    validate_message_reply_consistency,
)

from privacy.client_dp import ClientDPConfig, add_noise_to_sum
from privacy.strategy_wrapper import StrategyWrapper, one_reply_explained

__all__ = ["ClientDPStrategy"]

log = logging.getLogger(__name__)


class ClientDPStrategy(StrategyWrapper):
    """Client-level DP (DP-FedAvg) around any ``flwr.serverapp.strategy.Strategy``; see the module docstring.

    Parameters
    ----------
    inner : Strategy
        Samples nodes and aggregates; ``aggregate_train`` receives one reply, the noised mean.
    config : ClientDPConfig
        The noise multiplier sigma and clipping norm C (noise std ``sigma * C`` on the sum).
    exclude : collection of str
        Names of arrays that are public and pass through unnoised (their mean is kept).
    weighted_by_key : str, optional
        MetricRecord key of a reply's weight; defaults to ``inner.weighted_by_key`` when the
        inner strategy has one, else ``"num-examples"``.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        config: ClientDPConfig,
        exclude: Collection[str] = (),
        weighted_by_key: str | None = None,
    ) -> None:
        super().__init__(inner, weighted_by_key=weighted_by_key)
        if not isinstance(config, ClientDPConfig):
            raise ValueError(f"config must be a ClientDPConfig, got {type(config).__name__}")
        if isinstance(exclude, str):
            raise ValueError("exclude must be a collection of array names, not one string")
        self.config = config
        self.exclude = frozenset(exclude)
        self._global: ArrayRecord | None = None  # the arrays this round's updates are relative to
        self._round: int | None = None
        self._instruction: Message | None = None  # one of this round's TRAIN messages (for the synthetic reply)

    def __repr__(self) -> str:
        return f"ClientDPStrategy({self.inner!r})"

    def summary(self) -> None:
        """Log the client-level DP settings, then the inner strategy's summary."""
        log.info(
            "client-level DP: noise_multiplier=%g clipping_norm=%g (noise std %.4g on the sum) delta=%g",
            self.config.noise_multiplier,
            self.config.clipping_norm,
            self.config.noise_std,
            self.config.delta,
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Record the global arrays of this round, then let the inner strategy configure it."""
        self._global, self._round = arrays, server_round
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._instruction = messages[0] if messages else None
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Noise the sum of the replies' clipped updates, then let the inner strategy aggregate the noised mean."""
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return self.inner.aggregate_train(server_round, replies)  # nothing to release
        if self._global is None or self._instruction is None or self._round != server_round:
            log.warning(
                "client-level DP: round %d was not configured by this wrapper; nothing aggregated", server_round
            )
            return None, None
        contents = [r.content for r in valid]
        key = self.weighted_by_key
        validate_message_reply_consistency(contents, key, check_arrayrecord=True)
        m = sum(float(rec[key]) for c in contents for rec in c.metric_records.values() if key in rec)
        if m <= 0:
            log.warning("client-level DP: round %d has total weight %g; nothing aggregated", server_round, m)
            return None, None
        noised = self._noised_mean(aggregate_arrayrecords(contents, key), m)
        aggregate_metrics = getattr(self.inner, "train_metrics_aggr_fn", None) or aggregate_metricrecords
        metrics = dict(aggregate_metrics(contents, key))
        metrics[key] = m
        arrays_key, metrics_key = next(iter(contents[0].array_records)), next(iter(contents[0].metric_records))
        synthetic = Message(
            RecordDict({arrays_key: noised, metrics_key: MetricRecord(metrics)}), reply_to=self._instruction
        )
        with one_reply_explained(f"1 result, the mean of {m:g} clipped node updates with client-level DP noise"):
            return self.inner.aggregate_train(server_round, [synthetic])

    def _noised_mean(self, averaged: ArrayRecord, m: float) -> ArrayRecord:
        """``global + (sum + N(0, (sigma C)^2)) / m`` per array, the sum recovered as ``(mean - global) * m``."""
        assert self._global is not None
        unknown = set(averaged.keys()) - set(self._global.keys()) - self.exclude
        if unknown:
            raise ValueError(f"the replies carry arrays the global model has not: {sorted(unknown)}")
        avg = {k: averaged[k].numpy() for k in averaged}
        g = {k: self._global[k].numpy().astype(np.float64) for k in avg if k not in self.exclude}
        summed = {k: (avg[k].astype(np.float64) - g[k]) * m for k in g}
        noisy = add_noise_to_sum(
            summed, noise_multiplier=self.config.noise_multiplier, clipping_norm=self.config.clipping_norm
        )
        out = {k: (g[k] + noisy[k] / m).astype(avg[k].dtype) if k in g else avg[k] for k in avg}
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})
