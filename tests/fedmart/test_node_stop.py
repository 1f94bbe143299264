"""SIGTERM during training (issue 17): the node stops taking new work, finishes the task it holds, waits until
the SuperNode has passed the reply on to the SuperLink, then stops the SuperNode and exits 0.

Before, SIGTERM to the node's process group (a terminal's Ctrl-C, ``systemctl stop``, ``kill -TERM -PGID``)
stopped ``flower-supernode`` at once too, so the update the node had just trained (and paid privacy budget
for) never left, and the coordinator counted the node as dropped.

The process test runs ``fedmart node``'s own supervision loop (:func:`fedmart.node_cmd.run_supernode`) in a
real process with a real signal; what it supervises is a stand-in for ``flower-supernode`` (a few lines of
Python that log as it does: "Sent successfully" once it passed a reply on) and the task is a 1.5 s sleep
standing in for a training. A real SuperLink and SuperNode are left to the deployment test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedmart.node_cmd import describe_task
from fedmart.supervise import GracefulStop, ReplyDelivery, StopNow

FAKE_SUPERNODE = """
import signal, sys, time
from pathlib import Path

replies = Path(sys.argv[1])

def term(*_):
    print("fake supernode: SIGTERM", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, term)
print("SuperNode ID: 7", flush=True)
seen = 0
while True:
    lines = replies.read_text().splitlines() if replies.exists() else []
    for line in lines[seen:]:
        time.sleep(0.3)  # flower-supernode polls for the reply every 0.5 s, then sends it
        print(f"Sending: train message ({line})", flush=True)
        print("Sent successfully", flush=True)
    seen = len(lines)
    time.sleep(0.05)
"""

NODE = """
import os, sys, time
from pathlib import Path

from fedmart.node_cmd import run_supernode
from fedmart.supervise import GracefulStop, StopNow

base = Path(sys.argv[1])
state = base / "state"
state.mkdir()
replies = base / "replies"
stopper = GracefulStop("node test").install()


def serve(alive, on_reply):
    n = 0
    while not stopper.event.is_set() and alive():
        n += 1
        print(f"task {n} started", flush=True)
        time.sleep(1.5)  # the training: the signal arrives now
        on_reply(None)
        with open(replies, "a") as f:
            f.write(f"reply {n}\\n")
        print(f"task {n} replied", flush=True)


try:
    rc = run_supernode([sys.executable, str(base / "fake_supernode.py"), str(replies)], env=dict(os.environ),
                       state=state, stop=stopper.event, serve=serve, name="test", join_timeout=5,
                       explain=lambda text: text, send_grace=20)
except StopNow as exc:
    print(f"stopped at once: {exc}", flush=True)
    rc = 1
print(f"exit {rc}", flush=True)
sys.exit(rc)
"""


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "fake_supernode.py").write_text(FAKE_SUPERNODE)
    (tmp_path / "node.py").write_text(NODE)
    out = tmp_path / "node.out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "node.py"), str(tmp_path)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    return proc, out


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text() if path.exists() else ""
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.integration
def test_sigterm_to_the_group_finishes_and_sends_the_current_task_then_exits_0(tmp_path) -> None:
    proc, out = _start(tmp_path)
    _wait_for(out, "task 1 started", proc)

    os.killpg(proc.pid, signal.SIGTERM)  # as a terminal or a service manager signals the node's group
    rc = proc.wait(timeout=60)

    text = out.read_text()
    supernode = (tmp_path / "state" / "supernode.log").read_text()
    assert rc == 0, text
    assert "task 1 replied" in text and "task 2 started" not in text, text
    assert "node test: stopped; its last reply reached the coordinator" in text
    # The SuperNode was not hit by the group's signal: it passed the reply on, and only then was stopped.
    assert supernode.index("Sent successfully") < supernode.index("fake supernode: SIGTERM"), supernode


@pytest.mark.slow
@pytest.mark.integration
def test_a_second_signal_stops_at_once(tmp_path) -> None:
    proc, out = _start(tmp_path)
    _wait_for(out, "task 1 started", proc)

    os.killpg(proc.pid, signal.SIGTERM)
    _wait_for(out, "finishing the current task", proc)
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=60)

    text = out.read_text()
    assert rc == 1 and "stopped at once: node test: stopped at once by a second SIGINT" in text, text
    assert "task 1 replied" not in text


def test_graceful_stop_sets_its_event_first_and_raises_the_second_time() -> None:
    stop = GracefulStop("node unit").install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.event.wait(5) and stop.signals == 1
        with pytest.raises(StopNow, match="node unit: stopped at once by a second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs in the main thread between bytecodes
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_reply_delivery_reads_the_supernode_log_from_the_push_on(tmp_path) -> None:
    log_path = tmp_path / "supernode.log"
    log_path.write_text("Sending: train message\nSent successfully\n")  # an earlier reply
    delivery = ReplyDelivery(log_path)
    assert delivery.wait(0.1) == "no reply"

    delivery.pushing()
    assert delivery.wait(0.2) == "unconfirmed"  # the earlier reply's line does not count
    threading.Timer(0.2, lambda: log_path.open("a").write("Sending: train message\nSent successfully\n")).start()
    assert delivery.wait(5) == "sent"
    delivery.pushing()
    with log_path.open("a") as f:
        f.write("Failed to send message abc: unreachable\n")
    assert delivery.wait(5) == "not sent"
    delivery.pushing()
    assert delivery.wait(5, alive=lambda: False) == "unconfirmed"  # the SuperNode is gone


@pytest.fixture
def flower_task():
    """This process acts as a coordinator's task, so that it may build messages."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    saved = {n: getattr(TaskIdentity, n) for n in names}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    for n, v in saved.items():
        setattr(TaskIdentity, n, v)


def test_the_node_log_names_the_round_and_the_stage_and_never_round_dash(flower_task) -> None:
    from federation import wire
    from privacy.secagg import wire as secagg_wire

    train = Message(
        RecordDict(
            {
                wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 3}),
                secagg_wire.RECORD: ConfigRecord({secagg_wire.STAGE: secagg_wire.MASKED_INPUT}),
            }
        ),
        dst_node_id=7,
        message_type="train",
    )  # Flower's strategies leave the group id empty on TRAIN messages
    stage = Message(
        RecordDict({secagg_wire.RECORD: ConfigRecord({secagg_wire.STAGE: secagg_wire.UNMASK})}),
        dst_node_id=7,
        message_type="train",
        group_id="3",
    )
    hello = Message(RecordDict({wire.CONFIG: ConfigRecord({"q": "hello"})}), dst_node_id=7, message_type="query.hello")

    assert describe_task(train) == "task train (round 3, secure aggregation: masked-input)"
    assert describe_task(stage) == "task train (round 3, secure aggregation: unmask)"
    assert describe_task(hello) == "task query.hello"


def test_serve_tasks_takes_no_new_task_once_asked_to_stop(monkeypatch) -> None:
    import clients.worker as worker

    stop = threading.Event()
    ran: list[int] = []

    from types import SimpleNamespace

    counter = iter(range(1, 100))

    def acquire(request):  # always one more task queued
        n = next(counter)
        return SimpleNamespace(task=SimpleNamespace(task_id=n), token=f"token-{n}", HasField=lambda f: f == "task")

    runtime = SimpleNamespace(AcquireTask=acquire, close=lambda: None)

    def run_one_task(address, token, app, **kw):
        ran.append(int(token.split("-")[1]))
        stop.set()  # SIGTERM arrives during this task, which still runs to its end
        return worker.TaskOutcome.COMPLETED

    monkeypatch.setattr(worker, "_runtime_client", lambda address, token=None: runtime)
    monkeypatch.setattr(worker, "run_one_task", run_one_task)

    stats = worker.serve_tasks("127.0.0.1:1", None, fab_id="x", stop=stop)

    assert ran == [1] and stats.tasks == 1


def test_a_task_handed_out_as_the_signal_arrives_is_not_taken(monkeypatch) -> None:
    from types import SimpleNamespace

    import clients.worker as worker

    stop = threading.Event()

    def acquire(request):
        stop.set()  # SIGTERM while the SuperNode hands out a task
        return SimpleNamespace(task=SimpleNamespace(task_id=1), token="token-1", HasField=lambda f: f == "task")

    ran: list[str] = []
    monkeypatch.setattr(worker, "_runtime_client", lambda address, token=None: SimpleNamespace(
        AcquireTask=acquire, close=lambda: None))  # fmt: skip
    monkeypatch.setattr(worker, "run_one_task", lambda address, token, app, **kw: ran.append(token))

    stats = worker.serve_tasks("127.0.0.1:1", None, fab_id="x", stop=stop)

    assert ran == [] and stats.tasks == 0
