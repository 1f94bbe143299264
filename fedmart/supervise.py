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
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CONNECTION",
    "Child",
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
    """A supervised Flower process whose output goes to a log file; it dies with us (Linux)."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path) -> None:
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
