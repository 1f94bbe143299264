"""Where a node's own policy and identity come from, and the mod that enforces secure aggregation.

Nothing here is read from the run config or from a message: the policy is the node's file
(``fedmart node --policy FILE``), or in simulation the ``conf/node/`` group that
``fedmart simulate`` hands to the ClientApp it builds. So is the node's secure-aggregation
identity (its roster, its roster key, its seen sessions): ``fedmart node --roster
--roster-key``, or in simulation the roster and keys ``fedmart simulate`` made for the run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from conf.settings import NodeSettings
from federation import wire
from privacy.policy import NodePolicy
from privacy.secagg import wire as secagg_wire
from privacy.secagg.identity import NodeIdentity

__all__ = [
    "load_policy",
    "resolve_policy",
    "resolve_identity",
    "demo_identity",
    "policy_secagg_mod",
    "refuse",
    "ROSTER_KEY_FILE",
]

ROSTER_KEY_FILE = "roster.key"  # a simulated node's roster key, in its own state directory

log = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def load_policy(path: str) -> NodePolicy:
    """A policy file (YAML or JSON mapping of :class:`~privacy.policy.NodePolicy` keys)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"node policy {p}: cannot be read ({exc.strerror}); pass --policy FILE") from exc
    if p.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"node policy {p}: expected a mapping of policy keys")
    return NodePolicy.from_mapping(values)


def resolve_policy(node: NodeSettings, simulated: Mapping[str, Any] | None) -> NodePolicy:
    """The node's policy: its file, else the simulation's ``conf/node/`` group, else the default.

    ``--max-epsilon`` (``node.max_epsilon``) overrides the policy's budget.
    """
    if node.policy:
        policy = load_policy(node.policy)
    elif simulated is not None:
        policy = NodePolicy.from_mapping(simulated)
    else:
        policy = NodePolicy()
    if node.max_epsilon is not None:
        policy = NodePolicy.from_mapping({**_as_dict(policy), "max_epsilon": node.max_epsilon})
    return policy


def resolve_identity(
    node: NodeSettings, policy: NodePolicy, simulated: Mapping[str, Any] | None
) -> NodeIdentity | None:
    """The node's secure-aggregation identity: ``--roster``/``--roster-key``, else the simulation's, else None.

    ``simulated`` is what ``fedmart simulate`` hands the simulated nodes: ``{"roster": path,
    "nodes-dir": dir}``; each node's key is ``<its dir>/.fedmart/roster.key``. The seen sessions
    live in the node's state directory (``<data>/.fedmart``). A node without one takes part in
    semi-honest sessions only, and refuses even those when its policy demands the active mode.
    """
    from clients.node import node_dir_for

    if node.roster and node.roster_key:
        state = str(Path(node.data_dir) / ".fedmart") if node.data_dir else None
        return _identity(node.roster, node.roster_key, state, policy.secagg_threat_model)
    if node.roster or node.roster_key:
        raise ValueError("a node's secure-aggregation identity needs both --roster and --roster-key")
    if simulated is not None:
        state = node_dir_for(simulated["nodes-dir"], node.partition_id) / ".fedmart"
        return _identity(str(simulated["roster"]), str(state / ROSTER_KEY_FILE), str(state), policy.secagg_threat_model)
    return None


@lru_cache(maxsize=64)
def demo_identity(seed: int, num_partitions: int, partition_id: int, threat_model: str) -> NodeIdentity:
    """The roster of ``flwr run .``'s nodes on the built-in synthetic data: keys derived from the run's seed.

    Not a trust anchor: the seed is the coordinator's. It exists so that the newcomer's
    ``flwr run .`` runs the default (active) mode at all; those nodes hold only synthetic data
    that the coordinator's own run config generated, so there is nothing of theirs to protect.
    Nodes with data of their own use ``fedmart node --roster`` or ``fedmart simulate``.
    """
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy.secagg.roster import RosterKey, make_roster
    from privacy.secagg.seen_sessions import SeenSessions

    keys = [
        Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"fedmart demo roster:{seed}:{i}".encode()).digest())
        for i in range(max(num_partitions, partition_id + 1, 2))
    ]
    roster = make_roster((f"builtin-{i}", k.public_key()) for i, k in enumerate(keys))
    log.warning("secure aggregation on built-in synthetic data: a demo roster derived from the run's seed")
    return NodeIdentity(roster, RosterKey(keys[partition_id]), SeenSessions(), threat_model)


@lru_cache(maxsize=64)
def _identity(roster: str, key: str, state_dir: str | None, threat_model: str) -> NodeIdentity:
    # one per process and files: its verified channel keys are remembered between rounds
    return NodeIdentity.load(roster, key, state_dir=state_dir, threat_model=threat_model)


def _as_dict(policy: NodePolicy) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(policy)


def refuse(msg: Message, reason: str) -> Message:
    """An ``ERR_POLICY`` error reply: the node declined by its own policy; ``reason`` names the key."""
    log.warning("declining by policy: %s", reason)
    return Message(Error(code=wire.ERR_POLICY, reason=reason), reply_to=msg)


def policy_secagg_mod(policy_of: Callable[[Context], NodePolicy]) -> Callable:
    """A mod (outermost) that refuses what the node's policy forbids, before anything else runs.

    A plain TRAIN message when the policy requires secure aggregation, and a secure-aggregation
    stage of a mode weaker than ``secagg_threat_model`` (a semi-honest session under ``active``).
    """

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        is_train = msg.metadata.message_type.split(".")[0] == "train"
        records = msg.content.config_records if msg.has_content() else {}
        plain = secagg_wire.RECORD not in records
        if is_train and plain and policy_of(ctxt).require_secagg:
            return refuse(
                msg,
                "policy.require_secagg: the coordinator sent a TRAIN message without secure aggregation; "
                "this node releases updates only inside a secure sum",
            )
        if is_train and not plain and policy_of(ctxt).secagg_threat_model == secagg_wire.ACTIVE:
            modes = {r.get(secagg_wire.ADVERSARY) for k, r in records.items() if k.startswith(secagg_wire.RECORD)}
            weaker = modes - {None, secagg_wire.ACTIVE}
            if weaker:
                return refuse(
                    msg,
                    f"policy.secagg_threat_model: the coordinator runs {', '.join(sorted(map(str, weaker)))} secure "
                    "aggregation; this node takes part only in the active-adversary mode (secagg.adversary: active)",
                )
        return call_next(msg, ctxt)

    return mod
