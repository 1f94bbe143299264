"""A warm executor for the node's ClientApp: one long-lived process, many messages.

Flower 1.41's SuperNode hands every message it receives to a *task*. With
``--isolation subprocess`` (Flower's default) its SuperExec starts a fresh
``flwr-clientapp`` process per task, which installs the run's FAB and imports the app:
on a small CPU that is 10-25 s of imports (torch, transformers, opacus) per message, and
secure aggregation sends every node four messages per round.

With ``--isolation process`` the SuperNode only queues tasks on its Runtime API
(``127.0.0.1:<port>``) and waits for an executor to take them. :func:`serve_tasks` is that
executor: it runs in ``fedmart node``'s own process, imports the node's **installed**
fedmart ClientApp once, and for each task does what ``flwr-clientapp`` does (pull the
message and context, call the app, push the reply and the updated context), but without
exiting. Two consequences worth knowing:

* the node runs its own installed code, never code shipped in the coordinator's FAB: a
  run whose FAB is not fedmart's is refused with an error reply;
* node-side caches (the validated data, the model skeleton) survive between messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

__all__ = ["TaskOutcome", "WorkerStats", "serve_tasks", "run_one_task", "pull_task_input"]

log = logging.getLogger(__name__)

_ERR_CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION
TASK_RETRIES = 8  # Runtime API calls of one task: retried briefly, then the task fails
TASK_RETRY_SECONDS = 60.0
OBJECT_BACKOFF = (0.05, 0.5)  # seconds: first and largest wait for a message object the SuperNode is still fetching
OBJECT_WAIT_SECONDS = 600.0


class TaskOutcome(str, Enum):
    """How :func:`run_one_task` ended (a reply went back in every case)."""

    COMPLETED = "completed"  # the ClientApp answered
    FAILED = "failed"  # the ClientApp raised: an error reply
    REFUSED = "refused"  # the run is not this node's app: an error reply, the app never ran


@dataclass
class WorkerStats:
    tasks: int = 0
    failed: int = 0
    refused: int = 0
    last_task_at: float = 0.0


def _runtime_client(address: str, token: str | None = None):
    """A client of the SuperNode's Runtime API; ``token`` for one task's calls (bounded retries),
    none for polling (no retries: the loop itself polls, and must notice a SuperNode that died)."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    retry = None
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
        retry = make_simple_http_retry_invoker()
        retry.max_tries, retry.max_time = TASK_RETRIES, TASK_RETRY_SECONDS
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on the node's own loopback interface only
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retry,
    )


def pull_task_input(client) -> tuple[Message, Context, object, object]:
    """Flower's ``pull_task_input`` with a short retry backoff for the message's objects.

    The SuperNode hands out a task before it has downloaded the message's objects from the
    SuperLink; Flower's default backoff for an object not there yet (1 s doubling to 10 s)
    suits a cold ``flwr-clientapp`` that spent 10 s importing, but would make a warm
    executor wait up to 15 s per message for objects that arrive within a second or two.
    """
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task on the SuperNode's Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=OBJECT_BACKOFF[0],
        backoff_cap=OBJECT_BACKOFF[1],
        max_time=OBJECT_WAIT_SECONDS,
        max_tries_per_object=None,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it
    return message, context, run, fab


def run_one_task(
    address: str,
    token: str,
    app: ClientApp,
    *,
    fab_id: str,
    on_message: Callable[[Message], None] | None = None,
    on_reply: Callable[[Message], None] | None = None,
) -> TaskOutcome:
    """Run one acquired task in this process; a reply is sent in every case. Returns how it ended.

    ``on_message`` sees the message before the app runs, ``on_reply`` the reply just before it is
    handed to the SuperNode (``fedmart node`` notes where the SuperNode's log stood, to know when
    the reply has left: :class:`fedmart.supervise.ReplyDelivery`).
    """
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    t0 = time.perf_counter()
    client = _runtime_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    outcome = TaskOutcome.FAILED
    try:
        message, context, run, _fab = pull_task_input(client)
        if on_message is not None:
            on_message(message)
        if run.fab_id and run.fab_id != fab_id:
            # This node runs only its own installed fedmart ClientApp, never a coordinator's code.
            reason = f"this node runs only {fab_id}; refused run {run.run_id} of app {run.fab_id}"
            log.error(reason)
            reply = Message(Error(code=_ERR_CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            details = reason
            outcome = TaskOutcome.REFUSED
        else:
            try:
                t_app = time.perf_counter()
                reply = app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
                log.info(
                    "%s: ClientApp %.2fs (task input %.2fs)",
                    message.metadata.message_type,
                    time.perf_counter() - t_app,
                    t_app - t0,
                )
            except Exception as exc:  # the app's own failure: an error reply, the worker lives on
                log.exception("the ClientApp raised on a %s message", message.metadata.message_type)
                reason = f"{type(exc)}:<'{exc}'>"
                reply = Message(Error(code=_ERR_CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                details = reason
        t_push = time.perf_counter()
        if on_reply is not None:
            on_reply(reply)
        push_message(client, reply, context)
        log.debug("reply pushed in %.2fs; task %.2fs", time.perf_counter() - t_push, time.perf_counter() - t0)
        if status == SubStatus.COMPLETED:
            return TaskOutcome.COMPLETED
        return outcome
    finally:
        try:
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def serve_tasks(
    address: str,
    app: ClientApp,
    *,
    fab_id: str,
    stop: threading.Event,
    poll_interval: float = 0.1,
    alive: Callable[[], bool] = lambda: True,
    on_message: Callable[[Message], None] | None = None,
    on_reply: Callable[[Message], None] | None = None,
) -> WorkerStats:
    """Take ClientApp tasks from the SuperNode at ``address`` and run them here until ``stop``.

    ``alive()`` is polled between tasks; when it turns false (the SuperNode exited) the
    loop ends. ``stop`` is checked between tasks only: a task in progress (a training) runs to
    its end and its reply is sent; no task is taken after it. ``on_message`` sees each message
    before the app does (logging, tests), ``on_reply`` each reply before it is handed over.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    stats = WorkerStats()
    client = _runtime_client(address)
    try:
        while not stop.is_set() and alive():
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # the SuperNode is starting or stopping: try again shortly
                log.debug("AcquireTask failed: %s", exc)
                stop.wait(max(poll_interval, 0.5))
                continue
            if res.HasField("task") and res.token:
                if stop.is_set():  # asked to stop while this one was being handed out: take no new work
                    log.info("stopping: task %d left to the SuperNode, not run", res.task.task_id)
                    break
                stats.tasks += 1
                stats.last_task_at = time.time()
                try:
                    outcome = run_one_task(
                        address, res.token, app, fab_id=fab_id, on_message=on_message, on_reply=on_reply
                    )
                    stats.refused += outcome is TaskOutcome.REFUSED
                    stats.failed += outcome is TaskOutcome.FAILED
                except Exception:
                    stats.failed += 1
                    log.exception("task %d could not be run", res.task.task_id)
                continue  # there may be more queued: ask again at once
            stop.wait(poll_interval)
    finally:
        client.close()
    return stats
