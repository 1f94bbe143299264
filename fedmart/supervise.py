"""Supervising Flower's processes: their environment, the supervised child, ports, and reaping leftovers.

Used by the coordinator's command (``flower-superlink``, ``flwr run``) and the node's
(``flower-supernode``); Linux only for the parts that read ``/proc`` or ask the kernel to
stop a child when its parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CONNECTION",
    "Child",
    "GracefulStop",
    "ReplyDelivery",
    "StopNow",
    "flwr_cli",
    "flwr_env",
    "free_port",
    "reap_stale_serverapps",
    "stale_serverapps",
    "stop_pids",
    "wait_for_port",
    "write_flwr_config",
]

log = logging.getLogger(__name__)

CONNECTION = "fedmart"  # the SuperLink connection name in the coordinator's FLWR_HOME/config.toml


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for Flower's processes: their own FLWR_HOME, no telemetry, no update check."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def write_flwr_config(home: Path, address: str, root_cert: Path) -> Path:
    """``FLWR_HOME/config.toml`` with one SuperLink connection (TLS, our CA) as the default."""
    import tomli_w

    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    doc = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "root-certificates": str(root_cert)}}}
    path.write_text(tomli_w.dumps(doc))
    return path


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A supervised Flower process whose output goes to a log file; it dies with us (Linux).

    ``new_session=True`` puts it in a session (and process group) of its own: a signal sent to
    our group (Ctrl-C in a terminal, ``kill -TERM -PGID``) then reaches only us, and we stop it
    when we are ready (:meth:`stop`); if we die first, the kernel sends it SIGTERM.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        new_session: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            start_new_session=new_session,
        )
        log.info("started %s (pid %d): %s", name, self.proc.pid, " ".join(argv))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class StopNow(BaseException):
    """A second SIGTERM/SIGINT: stop at once, abandoning the work in progress (not an ``Exception``)."""


class GracefulStop:
    """SIGTERM and SIGINT for a command that finishes its current work first.

    The first signal sets :attr:`event` (callers stop taking new work, finish what they hold and
    exit 0); a second one raises :class:`StopNow` wherever the main thread is. :meth:`restore`
    puts the previous handlers back.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.event = threading.Event()
        self.signals = 0
        self._previous: dict[int, object] = {}

    def install(self) -> GracefulStop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.signals == 1:
            self.event.set()
            log.warning(
                "%s: %s received; finishing the current task and sending its reply, then exiting (send it again to "
                "stop at once)",
                self.what,
                signal.Signals(signum).name,
            )
            return
        raise StopNow(f"{self.what}: stopped at once by a second {signal.Signals(signum).name}")


SENT = ("Sent successfully", "Failed to send message", "Ignoring reply message")  # flower-supernode's log lines


class ReplyDelivery:
    """Whether ``flower-supernode`` has passed the node's last reply on to the SuperLink.

    The warm executor hands a reply to the SuperNode's Runtime API; the SuperNode sends it to the
    SuperLink within about half a second and logs ``Sent successfully`` (or why not). Stopping the
    SuperNode before that loses the reply: the coordinator would count a node that trained (and
    spent its privacy budget) as dropped. :meth:`pushing` notes where the SuperNode's log stood
    just before a reply was handed over; :meth:`wait` reads on from there.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.offset: int | None = None  # the log's size just before the last reply was pushed

    def pushing(self, *_: object) -> None:
        try:
            self.offset = self.log_path.stat().st_size
        except OSError:
            self.offset = 0

    def wait(self, timeout: float, alive: Callable[[], bool] = lambda: True, poll: float = 0.1) -> str:
        """How it went: "sent", "not sent" (the SuperNode said why), "no reply" (none pushed) or "unconfirmed"."""
        if self.offset is None:
            return "no reply"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self.offset)
                    text = f.read().decode(errors="replace")
            except OSError:
                text = ""
            if SENT[0] in text:
                return "sent"
            if any(line in text for line in SENT[1:]):
                return "not sent"
            if time.monotonic() >= deadline or not alive():
                return "unconfirmed"
            time.sleep(poll)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Until a TCP connect to ``host:port`` succeeds (True), the deadline passes or ``alive()`` fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.3)
    return False


def stale_serverapps(address: str) -> list[int]:
    """Pids of ServerApp processes (``flwr-serverapp``, ``flower-superexec``) still bound to ``address``.

    They belong to an earlier incarnation of this coordinator: Flower starts them in their
    own sessions, and after a crash of the SuperLink they can hang in their exit handlers,
    retrying a Runtime API that is gone (Linux only: read from /proc).
    """
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        names = {Path(a).name for a in argv[:2]}
        bound = any(a == "--runtime-api-address" and b == address for a, b in zip(argv, argv[1:], strict=False))
        if bound and names & {"flwr-serverapp", "flower-superexec"} and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def reap_stale_serverapps(address: str, grace: float = 5.0) -> list[int]:
    """Stop :func:`stale_serverapps`; returns the pids that would not stop."""
    return stop_pids(stale_serverapps(address), grace)


def stop_pids(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the pids still there after both."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not pids:
            break
    return pids


def flwr_cli(args: list[str], home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI against the coordinator's Flower home (its SuperLink connection); output captured."""
    return subprocess.run(["flwr", *args], env=flwr_env(home), capture_output=True, text=True, timeout=timeout)
