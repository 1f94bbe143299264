"""Canary nodes: the simulation's audit of client-level DP (Andrew et al., ICLR 2024, with the one-run bound).

With ``federation.client_dp.enabled=true`` and ``simulation.canary_nodes = c`` (``privacy_audit=on``
sets 20), ``fedmart simulate`` adds ``c`` nodes that hold no data. Each draws, once and from
the operating system's CSPRNG, a secret seed and a bit (included with probability ½), kept in
its state directory. Every round it replies like any node, through the same mods (secure
aggregation included): an included canary sends ``global + C · u``, a step of exactly the
clipping norm ``C`` along its own random unit direction ``u``; an excluded one sends a zero
step. Both weigh 1, so the two differ by one clipped contribution, which is what client-level
DP hides (the noise is on the sum, before the division by the node count).

After the run (``query.audit``) each canary node scores the final model: the cosine between
``final − initial`` and its ``u``. Unlike a node's self-audit (:mod:`clients.canaries`) it
replies with its score *and its bit*: canary nodes are the operator's instrument, they hold
no one's data, and client-level DP is a guarantee against everyone downstream of the
coordinator, not against the coordinator (which sees the noiseless sum). The coordinator
pools them into the one-run lower bound on the client-level ε
(:func:`federation.empirical_audit.client_level_audit`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import uuid
from pathlib import Path

import numpy as np

from conf.settings import NodeSettings, RunSettings
from federation import wire

__all__ = ["CANARY_NODE_NAME", "is_canary_node", "canary_dir", "write_canary_node_dir", "CanaryNode"]

log = logging.getLogger(__name__)

CANARY_NODE_NAME = "canary-node-{i:02d}"
_STATE = "canary-node.npz"
_INITIAL = "canary-initial.npz"


def is_canary_node(node: NodeSettings, settings: RunSettings) -> bool:
    """Whether this simulated node is one of the run's canary nodes (the last ``canary_nodes`` partitions)."""
    sim = settings.sim
    return bool(sim.canary_nodes) and not node.data_dir and node.partition_id >= sim.num_nodes - sim.canary_nodes


def canary_dir(node: NodeSettings, settings: RunSettings) -> Path:
    from clients.node import node_dir_for

    if not settings.sim.nodes_dir:
        raise ValueError("canary nodes exist only in `fedmart simulate` (sim.nodes-dir is not set)")
    return node_dir_for(settings.sim.nodes_dir, node.partition_id)


def write_canary_node_dir(directory: Path, index: int) -> str:
    """Simulation: a canary node's directory (its name; no data). Returns its name."""
    name = CANARY_NODE_NAME.format(i=index)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "node.json").write_text(json.dumps({"name": name, "canary": True}) + "\n")
    return name


class CanaryNode:
    """One canary node's state: its secret seed and bit, and the first global model it saw."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state_dir = directory / ".fedmart"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        meta = json.loads((directory / "node.json").read_text())
        self.name = str(meta["name"])
        path = self.state_dir / _STATE
        if not path.is_file():
            tmp = path.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                seed=np.frombuffer(secrets.token_bytes(32), dtype=np.uint8),
                included=np.array(secrets.randbits(1) == 1),
                population=np.array(uuid.uuid4().hex),
            )
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        with np.load(path, allow_pickle=False) as z:
            self.seed = int.from_bytes(z["seed"].tobytes(), "little")
            self.included = bool(z["included"])
            self.population_id = str(z["population"])

    def direction(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The node's unit direction over every parameter (not the holder vector), float64."""
        rng = np.random.default_rng(self.seed)
        u = {k: rng.standard_normal(weights[k].shape) for k in sorted(weights) if k != wire.ITEM_HOLDERS}
        norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in u.values())))
        return {k: v / norm for k, v in u.items()}

    def train(self, incoming: dict[str, np.ndarray], clipping_norm: float) -> dict[str, np.ndarray]:
        """This round's reply: ``incoming + C · u`` when included, ``incoming`` (a zero step) when not."""
        initial = self.state_dir / _INITIAL
        if not initial.is_file():  # the first global model it saw: the audit's reference
            tmp = initial.with_suffix(".tmp.npz")
            np.savez(tmp, **{k: v for k, v in incoming.items() if k != wire.ITEM_HOLDERS})
            os.replace(tmp, initial)
        out = dict(incoming)
        if self.included:
            u = self.direction(incoming)
            out = {k: (v + clipping_norm * u[k]).astype(v.dtype) if k in u else v for k, v in incoming.items()}
        if wire.ITEM_HOLDERS in incoming:  # it speaks for every item row, in or out alike
            out[wire.ITEM_HOLDERS] = np.ones_like(incoming[wire.ITEM_HOLDERS])
        return out

    @property
    def trained(self) -> bool:
        """Whether it has seen a global model (a canary node never sampled has nothing to score)."""
        return (self.state_dir / _INITIAL).is_file()

    def score(self, final: dict[str, np.ndarray]) -> float:
        """Cosine between the run's total change ``final − initial`` and this node's direction."""
        with np.load(self.state_dir / _INITIAL, allow_pickle=False) as z:
            initial = {k: z[k] for k in z.files}
        u = self.direction(final)
        dot, sq = 0.0, 0.0
        for k, v in u.items():
            d = final[k].astype(np.float64) - initial[k].astype(np.float64)
            dot += float(np.sum(d * v))
            sq += float(np.sum(d * d))
        return dot / np.sqrt(sq) if sq > 0 else 0.0
