"""Fixtures for the secure-aggregation tests: a Grid that runs ClientApps in this process.

Tests run with ``--import-mode=importlib``, so the Grid is handed over by the ``grid_factory``
fixture rather than imported. No Ray, no threads: ``push_messages`` runs the addressed node's
ClientApp at once (as Flower's engine would, including turning an exception into an error
reply and persisting ``context.state``) and ``pull_messages`` hands the replies back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from privacy.secagg import wire
from privacy.secagg.key_agreement import new_channel_keypair
from privacy.secagg.node_session import NodeSession
from privacy.secagg.server_session import ServerSession


def set_task_identity() -> None:
    """Flower's Message() needs a run id outside a running app."""
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


def stage_of(msg: Message) -> str:
    """The secagg stage of an instruction or reply ('train' for plain train, else the type)."""
    if msg.has_content() and wire.RECORD in msg.content.config_records:
        return str(msg.content.config_records[wire.RECORD][wire.STAGE])
    return msg.metadata.message_type


class InProcessGrid(Grid):
    """Runs ``app`` for ``num_nodes`` nodes (ids 101, 102, ...) synchronously.

    ``drop(stage, node_id) -> bool`` decides whether a node silently ignores a message;
    every instruction is appended to :attr:`sent`, every reply that reaches the coordinator
    to :attr:`received`.
    """

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        drop: Callable[[str, int], bool] | None = None,
        node_config: Callable[[int], dict] | None = None,
    ) -> None:
        set_task_identity()
        self.app = app
        self.node_ids = [101 + i for i in range(num_nodes)]
        self.contexts = {
            n: Context(
                run_id=1,
                node_id=n,
                node_config=(node_config(i) if node_config else {"partition-id": i}),
                state=RecordDict(),
                run_config={},
            )
            for i, n in enumerate(self.node_ids)
        }
        self.drop = drop or (lambda stage, node: False)
        self.received: list[Message] = []
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if self.drop(stage_of(msg), node):
                continue
            ctx = self.contexts[node]
            try:
                reply = self.app(msg, ctx)
            except Exception as err:  # mirror Flower: an exception becomes an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = f"r{mid}"
            self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._replies.pop(m) for m in list(message_ids) if m in self._replies]
        self.received.extend(out)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))


@pytest.fixture(scope="session")
def grid_factory() -> type[InProcessGrid]:
    """``grid_factory(app, num_nodes, drop=None)`` builds an :class:`InProcessGrid`."""
    return InProcessGrid


def _session_after_masking(n: int, neighbours: int, threshold: int | float, dropped: set[int]) -> ServerSession:
    """A ServerSession at the unmask stage, with ``dropped`` silent at the masked-input stage."""
    channel = {u: new_channel_keypair() for u in range(1, n + 1)}
    server = ServerSession(list(channel), threshold=threshold, neighbours=neighbours)
    nodes, replies = {}, {}
    for u, req in server.share_keys_requests({u: kp[1] for u, kp in channel.items()}).items():
        nodes[u], replies[u] = NodeSession.share_keys(req, channel[u][0])
    server.receive_share_keys(replies)
    masked = {
        u: nodes[u].mask(m, np.zeros(4, np.uint32)) for u, m in server.mask_requests().items() if u not in dropped
    }
    server.receive_masked(masked, 4, np.uint32)
    return server


@pytest.fixture(scope="session")
def masked_session_factory() -> Callable[[int, int, int | float, set[int]], ServerSession]:
    """``masked_session_factory(n, neighbours, threshold, dropped)`` builds a session at the unmask stage."""
    return _session_after_masking
