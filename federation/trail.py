"""Round listeners that leave the run's trail: signed model versions and the audit log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from conf.settings import Settings
from federation.aggregation import without_holders
from federation.coordinator import RoundRecord
from federation.outputs import from_arrays
from federation.registry import ModelRegistry
from privacy.audit import AuditLog
from privacy.signing import load_keypair, load_or_create_keypair

__all__ = ["RegistryPublisher", "AuditRecorder", "head_bias_popularity", "open_trail"]

log = logging.getLogger(__name__)


def head_bias_popularity(weights: dict[str, np.ndarray]) -> np.ndarray | None:
    """Cold-start popularity from the model itself: softmax of the output head's bias.

    With full-softmax cross-entropy the bias learns the items' marginal log-frequency,
    and it is part of the (privately trained) published weights, so serving this costs
    no extra privacy, unlike counting the nodes' interactions. The text tower's per-item
    bias (``tower.bias``) plays the same part.
    """
    bias = weights.get("head.bias", weights.get("tower.bias"))
    if bias is None:
        return None
    b = bias.astype(np.float64)[1:]  # drop padding
    p = np.exp(b - b.max())
    return np.concatenate([[0.0], p / p.sum()])


def _eps_by_node(record: RoundRecord) -> dict[str, float]:
    return {n: m["epsilon"] for n, m in record.node_metrics.items() if "epsilon" in m}


def _parent_meta(registry: ModelRegistry, parent: str | None, run: str) -> dict[str, Any]:
    """``parent``'s metadata when it belongs to this run (a resumed run goes on from it), else {}."""
    if parent is None:
        return {}
    try:
        meta = registry.show(parent)
    except ValueError:
        return {}
    return meta if meta.get("run") == run else {}


class RegistryPublisher:
    """Publishes every round's global model as a signed version (parent = the previous one).

    The signed ``privacy`` metadata is :func:`federation.server.privacy_summary` (DP mode
    and parameters, secure aggregation) plus this round's ε by node and ``epsilon_max``:
    the largest ε any node reported in any round of this run so far, since the model
    carries every earlier round's updates (None when no node reported one, e.g. without DP).
    ``origin``: the signed version the run started from (``federation.init``,
    ``federation/init_model.py``), signed into every version; a resumed run takes it from its
    previous version.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        run: str,
        config_hash: str,
        catalog_version: str,
        model_config: dict[str, Any],
        privacy: dict[str, Any],
        audit: AuditLog | None = None,
        origin: dict[str, Any] | None = None,
    ) -> None:
        self.registry = registry
        self.run = run
        self.config_hash = config_hash
        self.catalog_version = catalog_version
        self.model_config = model_config
        self.privacy = privacy
        self.audit = audit
        versions = registry.versions()
        self.parent: str | None = versions[-1] if versions else None
        self.last_version: str | None = self.parent
        parent_meta = _parent_meta(registry, self.parent, run)  # read once: the running ε max, the origin
        eps = (parent_meta.get("privacy") or {}).get("epsilon_max")
        self.epsilon_max = float(eps) if eps is not None else None
        self.origin = origin if origin is not None else parent_meta.get("origin")

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord, strategy: Strategy) -> None:
        if not record.aggregated:
            return  # the global model did not change: no new version (the audit log says why)
        weights = without_holders(from_arrays(arrays))
        metrics = {"central": record.central_eval, "federated": record.federated_eval, "train": record.train_metrics}
        eps = _eps_by_node(record)
        if eps:
            top = max(float(v) for v in eps.values())
            self.epsilon_max = top if self.epsilon_max is None else max(self.epsilon_max, top)
        privacy = {**self.privacy, "epsilon_by_node": eps, "epsilon_max": self.epsilon_max}
        version = self.registry.publish(
            weights,
            run=self.run,
            round=record.round,
            config_hash=self.config_hash,
            catalog_version=self.catalog_version,
            model_config=self.model_config,
            metrics=metrics,
            privacy=privacy,
            parent=self.parent,
            popularity=head_bias_popularity(weights),
            audit_head=self.audit.head if self.audit else None,
            origin=self.origin,
        )
        record.model_version = version
        self.parent = self.last_version = version


class AuditRecorder:
    """Appends the round's outcome: who was sampled, replied, declined, dropped, rejected; ε; model."""

    def __init__(self, audit: AuditLog, run: str) -> None:
        self.audit = audit
        self.run = run

    def on_round_start(self, server_round: int) -> None:
        self.audit.append("round_start", run=self.run, round=server_round)

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord, strategy: Strategy) -> None:
        self.audit.append(
            "round_end",
            run=self.run,
            round=record.round,
            sampled=record.sampled,
            replied=record.replied,
            declined=record.declined,
            dropped=record.timed_out,
            failed=record.failed,
            rejected=record.rejected,
            epsilon_by_node=_eps_by_node(record),
            aggregated=record.aggregated,
            abort_reason=record.abort_reason,
            model_version=getattr(record, "model_version", None),
        )


def open_trail(run_root: Path, settings: Settings) -> tuple[ModelRegistry, AuditLog]:
    """The run's registry and audit log, both signed with the coordinator's key (``registry.signing_key``).

    The key is created only when ``registry.create_key`` (simulation); otherwise a missing
    key raises :class:`~privacy.signing.KeyFileError` before anything is written.
    """
    reg = settings.registry
    load = load_or_create_keypair if reg.create_key else load_keypair
    private, _ = load(Path(reg.signing_key))
    registry = ModelRegistry(Path(reg.root or run_root / "registry"), private_key=private)
    return registry, AuditLog(Path(settings.audit.path or run_root / "audit.jsonl"), private_key=private)
