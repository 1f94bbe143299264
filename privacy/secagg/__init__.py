"""Secure aggregation on Flower's Message API: the coordinator only ever sees the sum.

Node side: ``ClientApp(mods=[secagg_mod, ...])``. Coordinator side:
``SecAggStrategy(FedAvg(...), config=SecAggConfig(...))``. See ``docs/secagg.md``.

This package depends on numpy, cryptography and flwr only (never on ``federation`` or ``clients``).
"""

from privacy.secagg.config import SecAggConfig
from privacy.secagg.encoding import EncodingParams, quantisation_error_bound
from privacy.secagg.mod import secagg_mod, strict_secagg_mod
from privacy.secagg.protocol import SecAggAbort
from privacy.secagg.strategy import RoundReport, SecAggStrategy, wrap_strategy

__all__ = [
    "SecAggConfig",
    "EncodingParams",
    "quantisation_error_bound",
    "secagg_mod",
    "strict_secagg_mod",
    "SecAggAbort",
    "SecAggStrategy",
    "RoundReport",
    "wrap_strategy",
]
