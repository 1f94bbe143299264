"""The warm executor (clients/worker.py) against a real SuperNode Runtime API.

The SuperNode side is Flower's own: its Runtime HTTP app (``flwr.supernode.main.create_app``)
over an in-memory ``NodeState``, served on a loopback port in this process. A test queues
messages the way the SuperNode does when they arrive from the SuperLink, lets the worker
take them, and reads back what the worker pushed: the reply, the task's outcome and the
node's context. The ClientApps are small stand-ins for fedmart's, so each test says what
the worker does with whatever app it was given.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import threading
import time

import pytest
import uvicorn
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory

from clients.worker import TaskOutcome, WorkerStats, run_one_task, serve_tasks

NODE_ID = 7
FAB_ID = "fedmart/fedmart"  # what this node's worker accepts
APP_RAISED = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
_FAB = Fab(hashlib.sha256(b"").hexdigest(), b"", {})  # the worker never opens the FAB: it runs its installed app


class SuperNode:
    """Flower's SuperNode Runtime API on 127.0.0.1, with messages queued by the test."""

    def __init__(self) -> None:
        factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state = factory.state()
        self.state.set_node_id(NODE_ID)
        self.state.store_fab(_FAB)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(state_factory=factory), log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._runs = itertools.count(100)
        self._tasks: list[int] = []

    def __enter__(self) -> SuperNode:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self._sock.close()

    def new_run(self, *, fab_id: str = FAB_ID, node_config: dict | None = None) -> int:
        """A run the SuperLink told this node about, with the node's own config in its context."""
        run_id = next(self._runs)
        status = RunStatus(status="running", sub_status="", details="")
        self.state.store_run(
            Run(run_id=run_id, fab_id=fab_id, fab_version="1.0.0", fab_hash=_FAB.hash_str, override_config={},
                pending_at="", starting_at="", running_at="", finished_at="", status=status, flwr_aid="",
                federation_id="", primary_task_id=None, bytes_sent=0, bytes_recv=0, clientapp_runtime=0.0,
                series_id=run_id)
        )  # fmt: skip
        context = Context(
            run_id=run_id, node_id=NODE_ID, node_config=node_config or {}, state=RecordDict(), run_config={}
        )
        self.state.set_run_series_context(run_id, context)
        return run_id

    def deliver(self, run_id: int, message_type: str, **config) -> Message:
        """A message from the coordinator, stored and queued as a task (as the SuperNode does on receipt)."""
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0  # the coordinator's side
        msg = Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=NODE_ID, message_type=message_type)
        self._tasks.append(self.state.create_task(task_type=TaskType.CLIENT_APP, run_id=run_id, fab_hash=_FAB.hash_str))
        store = self.state.object_store
        with no_object_id_recompute():
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.state.store_message(msg)
            store.preregister(run_id, get_object_tree(msg))
            for object_id, obj in get_all_nested_objects(msg).items():
                store.put(object_id, obj.deflate())
        return msg

    def forget_tasks(self) -> None:
        """Start the next test's bookkeeping afresh (the tasks stay in the SuperNode's state)."""
        self._tasks.clear()

    def busy(self) -> bool:
        """Whether a queued task has not finished yet."""
        return any(t.status.status != "finished" for t in self.state.get_tasks(task_ids=self._tasks))

    def outcomes(self) -> list[tuple[str, str]]:
        """(sub-status, details) of every task, in the order they were queued."""
        by_id = {t.task_id: t.status for t in self.state.get_tasks(task_ids=self._tasks)}
        return [(by_id[t].sub_status, by_id[t].details) for t in self._tasks]

    def replies(self, run_id: int) -> dict[str, Message]:
        """The replies the worker pushed for ``run_id``, by the id of the message they answer."""
        out = {}
        store = self.state.object_store
        for head in self.state.get_messages_legacy(run_ids=[run_id], is_reply=True):
            tree = store.get_object_tree(head.metadata.message_id)
            contents = {t.object_id: store.get(t.object_id) for t in iterate_object_tree(tree)}
            reply = inflate_object_from_contents(tree.object_id, contents)
            out[reply.metadata.reply_to_message_id] = reply
        return out

    def context(self, run_id: int) -> Context:
        return self.state.get_run_series_context(run_id)


@pytest.fixture(scope="module")
def supernode_api(flower_task):
    with SuperNode() as api:
        yield api


@pytest.fixture
def supernode(supernode_api):
    yield supernode_api
    assert not supernode_api.busy(), "a test left a task behind"
    supernode_api.forget_tasks()


def _serve(node: SuperNode, app: ClientApp, *, fab_id: str = FAB_ID, **kwargs) -> WorkerStats:
    """Run the worker until every queued task has finished (10 s at most)."""
    deadline = time.monotonic() + 10.0
    return serve_tasks(
        node.address,
        app,
        fab_id=fab_id,
        stop=threading.Event(),
        poll_interval=0.01,
        alive=lambda: node.busy() and time.monotonic() < deadline,
        **kwargs,
    )


def _app(calls: list[str] | None = None) -> ClientApp:
    """A node app: ``query.hello`` answers with its name and how many messages this node has seen
    (kept in the node's context state); ``train`` fails the way a crashing trainer does."""
    app = ClientApp()
    calls = [] if calls is None else calls

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        calls.append("app")
        seen = int(context.state.config_records.get("count", ConfigRecord({"n": 0}))["n"]) + 1
        context.state.config_records["count"] = ConfigRecord({"n": seen})
        info = {"name": str(context.node_config.get("name", "?")), "seen": seen}
        return Message(RecordDict({"node": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls.append("app")
        raise RuntimeError("the trainer crashed")

    return app


# --- serve_tasks ----------------------------------------------------------------------------------


def test_a_queued_task_is_run_by_the_installed_app_and_its_reply_reaches_the_supernode(supernode):
    run = supernode.new_run(node_config={"name": "Garden"})
    msg = supernode.deliver(run, "query.hello")

    stats = _serve(supernode, _app())

    reply = supernode.replies(run)[msg.metadata.message_id]
    assert not reply.has_error() and reply.content["node"]["name"] == "Garden"  # the node's own config
    assert reply.metadata.dst_node_id == msg.metadata.src_node_id
    assert supernode.outcomes() == [("completed", "")]
    assert (stats.tasks, stats.failed) == (1, 0) and stats.last_task_at > 0


def test_the_nodes_state_carries_over_from_one_message_to_the_next(supernode):
    run = supernode.new_run()
    first, second = supernode.deliver(run, "query.hello"), supernode.deliver(run, "query.hello")

    _serve(supernode, _app())

    replies = supernode.replies(run)
    assert [replies[m.metadata.message_id].content["node"]["seen"] for m in (first, second)] == [1, 2]
    assert supernode.context(run).state.config_records["count"]["n"] == 2  # pushed back to the SuperNode


def test_a_run_of_another_app_is_refused_and_its_messages_never_reach_the_app(supernode):
    run = supernode.new_run(fab_id="someone/else")
    msg = supernode.deliver(run, "query.hello")
    calls: list[str] = []

    stats = _serve(supernode, _app(calls))

    reply = supernode.replies(run)[msg.metadata.message_id]
    assert reply.has_error() and reply.error.code == APP_RAISED
    assert f"this node runs only {FAB_ID}; refused run {run} of app someone/else" == reply.error.reason
    assert calls == []
    assert supernode.outcomes() == [("failed", reply.error.reason)]
    assert (stats.tasks, stats.refused, stats.failed) == (1, 1, 0)  # refused, which is not a failure of the app


def test_an_app_that_raises_gets_an_error_reply_and_the_worker_takes_the_next_task(supernode):
    run = supernode.new_run()
    crash, hello = supernode.deliver(run, "train"), supernode.deliver(run, "query.hello")

    stats = _serve(supernode, _app())

    replies = supernode.replies(run)
    failed = replies[crash.metadata.message_id]
    assert failed.has_error() and failed.error.code == APP_RAISED
    assert failed.error.reason == "<class 'RuntimeError'>:<'the trainer crashed'>"  # Flower's format (docs/errors.md)
    assert not replies[hello.metadata.message_id].has_error()
    assert supernode.outcomes() == [("failed", failed.error.reason), ("completed", "")]
    assert (stats.tasks, stats.failed) == (2, 1)


def test_on_message_sees_each_message_before_the_app(supernode):
    run = supernode.new_run()
    sent = [supernode.deliver(run, "query.hello") for _ in range(2)]
    calls: list[str] = []
    seen: list[str] = []

    def on_message(msg: Message) -> None:
        calls.append("on_message")
        seen.append(msg.metadata.message_id)

    _serve(supernode, _app(calls), on_message=on_message)

    assert calls == ["on_message", "app"] * 2
    assert seen == [m.metadata.message_id for m in sent]


def test_the_worker_stops_when_told_to_and_when_the_supernode_is_gone(supernode):
    stop = threading.Event()
    stop.set()

    assert serve_tasks(supernode.address, _app(), fab_id=FAB_ID, stop=stop).tasks == 0
    assert serve_tasks(supernode.address, _app(), fab_id=FAB_ID, stop=threading.Event(), alive=lambda: False).tasks == 0


def test_a_supernode_that_does_not_answer_is_polled_until_it_is_declared_gone():
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    polls = itertools.count()

    stats = serve_tasks(address, _app(), fab_id=FAB_ID, stop=threading.Event(), alive=lambda: next(polls) < 2)

    assert stats.tasks == 0 and next(polls) == 3  # polled twice, then told the SuperNode is gone


# --- run_one_task -------------------------------------------------------------------------------------


def _acquire(node: SuperNode) -> str:
    """Take the next task as an executor does; returns its token."""
    client = RuntimeHttpClient.from_server_address(
        server_address=node.address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=None,
    )
    try:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    finally:
        client.close()
    assert res.HasField("task") and res.token
    return res.token


@pytest.mark.parametrize(
    ("fab_id", "message_type", "completed"),
    [
        pytest.param(FAB_ID, "query.hello", True, id="completed"),
        pytest.param(FAB_ID, "train", False, id="the-app-raised"),
        pytest.param("someone/else", "query.hello", False, id="another-app"),
    ],
)
def test_run_one_task_says_whether_the_app_completed_the_task(supernode, fab_id, message_type, completed):
    run = supernode.new_run(fab_id=fab_id)
    msg = supernode.deliver(run, message_type)

    result = run_one_task(supernode.address, _acquire(supernode), _app(), fab_id=FAB_ID)

    refused = fab_id != FAB_ID
    assert result is (TaskOutcome.COMPLETED if completed else TaskOutcome.REFUSED if refused else TaskOutcome.FAILED)
    # a reply in every case: the coordinator is not left waiting
    assert msg.metadata.message_id in supernode.replies(run)
    assert [status for status, _ in supernode.outcomes()] == ["completed" if completed else "failed"]
