"""Set-up shared by the node-side tests: Flower messages and contexts as a node receives them.

Flower stamps a new message with the identity of the task that builds it
(``TaskIdentity``); the warm worker overwrites that identity while it runs a task, so
the fixture puts back whatever was there before.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation import wire

NODE_ID = 7  # the node under test, as the SuperLink numbers it
_IDENTITY = ("_run_id", "_task_id", "_node_id")


@pytest.fixture(scope="module")
def flower_task():
    """This process acts as a coordinator's task (run 1, node 0) for the messages a test builds."""
    saved = {name: getattr(TaskIdentity, name) for name in _IDENTITY}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    for name, value in saved.items():
        setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def train_message(flower_task) -> Callable[..., Message]:
    """``make(weights, server_round=1)``: the coordinator's TRAIN message carrying ``weights``."""

    def make(weights: dict[str, np.ndarray], *, server_round: int = 1, message_type: str = "train") -> Message:
        content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}),
                wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round}),
            }
        )
        return Message(content, dst_node_id=NODE_ID, message_type=message_type)

    return make


@pytest.fixture(scope="module")
def node_context() -> Callable[..., Context]:
    """``make(**node_config)``: the node's context; the node config is the node's own settings."""

    def make(**node_config) -> Context:
        return Context(run_id=1, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config={})

    return make


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """``tiny_world(name, world)``: one department node of a tiny synthetic world on disk.

    Written by ``fedmart.simulate.prepare``; returns ``(node_dir, run_settings)``. Tests copy
    ``node_dir`` so each starts with no ledger, no population id and no canaries.
    """
    from conf.settings import RunSettings, SimulateSettings
    from fedmart.simulate import prepare

    def make(name: str, world: dict):
        root = tmp_path_factory.mktemp(name)
        settings = SimulateSettings.from_dict(world)
        prepare(settings.to_dict(), root)
        return root / "nodes" / "node-0000", RunSettings.from_dict(settings.request().to_dict())

    return make
