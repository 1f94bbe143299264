"""Where a node's own policy and identity come from, and the mod that enforces secure aggregation.

Nothing here is read from the run config or from a message: the policy is the node's file
(``fedmart node --policy FILE``), or in simulation the ``conf/node/`` group that
``fedmart simulate`` hands to the ClientApp it builds.
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

__all__ = ["load_policy", "resolve_policy", "policy_secagg_mod", "refuse"]

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


def _as_dict(policy: NodePolicy) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(policy)


def refuse(msg: Message, reason: str) -> Message:
    """An ``ERR_POLICY`` error reply: the node declined by its own policy; ``reason`` names the key."""
    log.warning("declining by policy: %s", reason)
    return Message(Error(code=wire.ERR_POLICY, reason=reason), reply_to=msg)


def policy_secagg_mod(policy_of: Callable[[Context], NodePolicy]) -> Callable:
    """A mod (outermost) that refuses a plain TRAIN message when the policy requires secure aggregation."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        is_train = msg.metadata.message_type.split(".")[0] == "train"
        plain = not (msg.has_content() and secagg_wire.RECORD in msg.content.config_records)
        if is_train and plain and policy_of(ctxt).require_secagg:
            return refuse(
                msg,
                "policy.require_secagg: the coordinator sent a TRAIN message without secure aggregation; "
                "this node releases updates only inside a secure sum",
            )
        return call_next(msg, ctxt)

    return mod
