"""A real deployment on Flower 1.41: ``fedmart certs``, ``fedmart coordinate``, ``fedmart node``.

Processes (all on Flower's deployment runtime, talking HTTPS)::

    fedmart coordinate ──> flower-superlink  (TLS, --enable-supernode-auth, one port)
                              └─ flower-superexec ─> flwr-serverapp (federation.app:app)
                           flwr supernode register <node>.pub   (one per node key)
                           flwr run <staged app> --run-config <flattened Hydra config>

    fedmart node ───────> flower-supernode (--root-certificates CA, --auth-supernode-private-key,
                              │             --isolation process, --node-config <node's own settings>)
                              └─ tasks ──> clients.worker.serve_tasks, in fedmart node's own process

TLS: the SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port with the
certificate ``fedmart certs`` issued (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``);
nodes and the ``flwr`` CLI trust only ``ca.pem``. Node authentication: the SuperLink runs
with ``--enable-supernode-auth`` and accepts a SuperNode only if its public key was
registered (``flwr supernode register``); a node signs every Fleet request with its
private key (OpenSSH EC). An unregistered key is refused at activation (exit code 305).

The coordinator's outputs go to ``outputs/<run>/`` exactly as in simulation (the run
config's ``sim.run-dir``); Flower's own state (SuperLink database, FAB installs, the staged
app, logs) to ``outputs/<run>/flwr/``. ``fedmart coordinate resume=outputs/<run>``
restarts the SuperLink on the same database and port and continues after the last
completed round.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.cli import command
from federation.errors import UserError, exit_on_user_error
from federation.runconfig import NONE, flatten

__all__ = [
    "FAB_ID",
    "SIM_KEYS",
    "compose_config",
    "app_config_defaults",
    "render_app_config",
    "sync_pyproject",
    "stage_app",
    "write_flwr_config",
    "flwr_env",
    "Child",
    "free_port",
    "wait_for_port",
    "stale_serverapps",
    "reap_stale_serverapps",
    "register_node_keys",
    "node_config_toml",
    "supernode_argv",
    "superlink_argv",
    "explain_supernode_exit",
    "certs_cmd",
    "node_cmd",
    "nodes_cmd",
    "coordinate_main",
]

log = logging.getLogger(__name__)

APP_NAME = "fedmart"
PUBLISHER = "fedmart"
FAB_ID = f"{PUBLISHER}/{APP_NAME}"  # what a node's warm worker accepts
CONNECTION = "fedmart"  # the SuperLink connection name in the coordinator's FLWR_HOME/config.toml
PACKAGES = ("federation", "clients", "privacy", "conf")
MAX_SUPERNODE_RESTARTS = 5
# Run-config keys the coordinator adds under ``sim.`` (read by federation.server.run_server).
SIM_KEYS: dict[str, Any] = {
    "sim.run-dir": NONE,
    "sim.nodes-dir": NONE,
    "sim.catalog": NONE,
    "sim.central-data": NONE,
    "sim.num-nodes": 0,
}
_GENERATED = (
    "# Generated from the composed Hydra config (conf/): `python -m federation.deploy sync-pyproject`.\n"
    "# Flower refuses run-config keys missing here, and `fedmart coordinate` sends every key of the\n"
    "# composed config; tests/federation/test_deploy_config.py checks this table against conf/.\n"
)


# --- the run config Flower accepts -------------------------------------------------------------


def conf_dir() -> Path:
    import conf

    return Path(conf.__file__).parent


def compose_config(overrides: Iterable[str] = (), config_name: str = "config") -> dict[str, Any]:
    """The composed Hydra config as plain data (``???`` left as ``None``)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conf.typed import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return None if x == "???" else x

    return clean(data)


def _group_options(config_name: str = "config") -> dict[str, list[str]]:
    """The options of every config group in ``config_name``'s defaults list (other groups,
    such as train-central's ``experiment``, never reach a federation's run config)."""
    from omegaconf import OmegaConf

    root = conf_dir()
    defaults = OmegaConf.to_container(OmegaConf.load(root / f"{config_name}.yaml")).get("defaults", [])
    groups = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    return {g: sorted(p.stem for p in (root / g).glob("*.yaml")) for g in groups if (root / g).is_dir()}


def app_config_defaults() -> dict[str, bool | int | float | str]:
    """Every run-config key any composition of ``conf/`` can produce, plus ``sim.*``.

    Values are those of the default composition (``conf/config.yaml``); a key that only
    another option of a group has (``federation=fedadam``'s ``eta``, ...) takes that
    option's default.
    """
    values: dict[str, bool | int | float | str] = dict(flatten(compose_config()))
    for group, options in _group_options().items():
        for option in options:
            for key, value in flatten(compose_config([f"{group}={option}"])).items():
                values.setdefault(key, value)
    values.update({k: v for k, v in SIM_KEYS.items() if k not in values})
    return dict(sorted(values.items()))


def render_app_config(values: dict[str, Any]) -> str:
    """The body of ``[tool.flwr.app.config]``: one quoted dotted key per line."""
    import tomli_w

    return _GENERATED + tomli_w.dumps(values)


def _replace_section(text: str, header: str, body: str) -> str:
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == header)
    except StopIteration:
        return text.rstrip("\n") + f"\n\n{header}\n{body}"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    return "".join(lines[: start + 1]) + body + "\n" + "".join(lines[end:])


def sync_pyproject(path: str | Path, *, check: bool = False) -> bool:
    """Rewrite ``[tool.flwr.app.config]`` of ``path`` from ``conf/``; returns whether it changed.

    With ``check=True`` nothing is written (CI: fail when the table is stale).
    """
    path = Path(path)
    text = path.read_text()
    new = _replace_section(text, "[tool.flwr.app.config]", render_app_config(app_config_defaults()))
    if new != text and not check:
        path.write_text(new)
    return new != text


# --- Flower plumbing ---------------------------------------------------------------------------


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


def stage_app(dest: Path, app_config: dict[str, Any]) -> Path:
    """Copy the installed fedmart packages and a generated ``pyproject.toml`` to ``dest``.

    ``flwr run`` builds its FAB from this directory, never from the source tree: the
    source ``pyproject.toml`` is left alone (Flower 1.41 migrates and comments out a
    ``[tool.flwr.federations]`` table it finds), the app works from an installed wheel too,
    and the staged ``[tool.flwr.app.config]`` holds exactly the keys this run sends.
    """
    import importlib

    import tomli_w

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in PACKAGES:
        src = Path(importlib.import_module(name).__file__).parent
        for f in src.rglob("*"):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                target = dest / name / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
    pyproject = {
        "project": {"name": APP_NAME, "version": "0.1.0", "description": "fedmart", "license": "Proprietary"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": "federation.app:app", "clientapp": "clients.app:app"},
                    "config": app_config,
                }
            }
        },
    }
    (dest / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return dest


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
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> bool:
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
    """Stop :func:`stale_serverapps` (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    pids = stale_serverapps(address)
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


def _flwr(args: list[str], home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=flwr_env(home), capture_output=True, text=True, timeout=timeout)


def register_node_keys(home: Path, pubs: list[Path]) -> dict[str, str]:
    """Register node public keys with the SuperLink (``flwr supernode register``), in parallel.

    Returns ``{key name: "registered" | "already registered"}``; any other failure is a UserError.
    """
    from privacy.pki import PkiError, load_node_public_key

    for pub in pubs:
        try:
            load_node_public_key(pub.read_bytes())
        except (OSError, PkiError) as exc:
            raise UserError(f"{pub}: {exc}") from exc

    def one(pub: Path) -> tuple[str, str]:
        proc = _flwr(["supernode", "register", str(pub), CONNECTION, "--name", pub.stem], home)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0:
            return pub.stem, "registered"
        if "already in use" in out:
            return pub.stem, "already registered"
        raise UserError(f"could not register {pub}: {' '.join(out.split())[-300:]}")

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(pubs)))) as pool:
        return dict(pool.map(one, pubs))


def superlink_argv(*, certs: Path, host: str, port: int, database: Path, isolation: str) -> list[str]:
    from privacy.pki import PkiLayout

    layout = PkiLayout(certs)
    return [
        "flower-superlink",
        "--ssl-ca-certfile", str(layout.ca_cert),
        "--ssl-certfile", str(layout.server_cert),
        "--ssl-keyfile", str(layout.server_key),
        "--enable-supernode-auth",
        "--host", host,
        "--port", str(port),
        "--database", str(database),
        "--isolation", isolation,
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def node_config_toml(values: dict[str, Any]) -> str:
    """The node's own settings as the TOML file ``flower-supernode --node-config`` accepts."""
    import tomli_w

    return tomli_w.dumps({k: v for k, v in values.items() if v is not None and v != ""})


def supernode_argv(
    *, superlink: str, root_cert: Path, auth_key: Path, node_config: Path, isolation: str, runtime_port: int
) -> list[str]:
    return [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", str(root_cert),
        "--auth-supernode-private-key", str(auth_key),
        "--node-config", str(node_config),
        "--isolation", isolation,
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
    ]  # fmt: skip


_EXIT_HINTS = {
    "305": "the SuperLink refused this node: its key is not registered there (or not yet). Send {pub} to the "
    "coordinator (`fedmart nodes register`) and start again",
    "304": "could not reach the SuperLink at {superlink} over TLS: check the address and that --root-cert is the "
    "coordinator's CA",
}


def _exit_code(log_text: str) -> str | None:
    """Flower's exit code as ``flower-supernode`` logged it (``Exit Code: 305``), if any."""
    codes = re.findall(r"Exit Code: (\d+)", log_text)
    return codes[-1] if codes else None


def explain_supernode_exit(log_text: str, *, pub: str, superlink: str) -> str:
    """One line saying why ``flower-supernode`` stopped, from its log."""
    codes = re.findall(r"Exit Code: (\d+)", log_text)
    if codes and codes[-1] in _EXIT_HINTS:
        return _EXIT_HINTS[codes[-1]].format(pub=pub, superlink=superlink)
    if "certificate verify failed" in log_text or "SSL/TLS handshake error" in log_text:
        return f"TLS to {superlink} failed: --root-cert is not the CA that signed the SuperLink's certificate"
    lines = [ln for ln in log_text.splitlines() if ln.strip()]
    detail = " ".join(lines[-3:])[-300:] if lines else "no output"
    return f"flower-supernode stopped{' (exit code ' + codes[-1] + ')' if codes else ''}: {detail}"


# --- fedmart certs -----------------------------------------------------------------------------


def _certs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="directory to write (created 0700)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--nodes", type=int, default=0, help="N node key pairs named node-1..node-N")
    g.add_argument("--node-names", default="", help="comma-separated node names (e.g. toys,books,garden)")
    p.add_argument(
        "--hosts",
        default="127.0.0.1,localhost",
        help="comma-separated names the coordinator is reached by (its TLS certificate's SAN)",
    )
    p.add_argument("--nodes-only", action="store_true", help="write node key pairs only (on a department's machine)")


@exit_on_user_error
def certs_cmd(args: argparse.Namespace) -> int:
    from rich.table import Table

    from federation.console import console
    from privacy.pki import PkiError, ensure_pki, ssh_fingerprint

    if args.nodes < 0:
        raise UserError("--nodes must be >= 0")
    names = [f"node-{i}" for i in range(1, args.nodes + 1)] or [n.strip() for n in args.node_names.split(",") if n]
    if args.nodes_only and not names:
        raise UserError("--nodes-only needs --nodes N or --node-names a,b")
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        report = ensure_pki(args.out, node_names=names, hosts=hosts, with_ca=not args.nodes_only)
    except (PkiError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    t = Table(title=f"{args.out} (dir 0700, private keys 0600)")
    for col in ("file", "status", "what it is"):
        t.add_column(col)
    what = {
        "ca.pem": "CA certificate: give to every node (--root-cert)",
        "ca.key": "CA private key: keep offline",
        "server.pem": f"coordinator TLS certificate for {', '.join(hosts)}",
        "server.key": "coordinator TLS private key",
    }
    created = set(report.created)
    for path in sorted(set(report.created) | set(report.kept)):
        rel = path.relative_to(report.layout.root)
        if path.suffix == ".pub":
            desc = f"node public key {ssh_fingerprint(path.read_bytes())}: the coordinator registers it"
        elif path.parent.name == "nodes":
            desc = "node private key: give to that node only (--auth-key)"
        else:
            desc = what.get(path.name, "")
        t.add_row(str(rel), "[green]created[/]" if path in created else "kept", desc)
    console.print(t)
    for note in report.notes:
        console.print(f"[yellow]{note}[/]")
    return 0


certs_cmd.add_arguments = _certs_args  # type: ignore[attr-defined]
command("certs", "create the deployment's CA, the coordinator's TLS certificate and node auth keys")(certs_cmd)


# --- fedmart node ------------------------------------------------------------------------------


def _node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="the node's data directory (interactions + catalog)")
    p.add_argument("--superlink", required=True, help="the coordinator's SuperLink as HOST:PORT")
    p.add_argument("--root-cert", type=Path, required=True, help="the deployment's CA certificate (ca.pem)")
    p.add_argument("--auth-key", type=Path, required=True, help="this node's private key (OpenSSH EC, 0600)")
    p.add_argument("--max-epsilon", type=float, default=None, help="this node's privacy budget (default 10)")
    p.add_argument("--name", default=None, help="node name (default: node.json's, else the directory's name)")
    p.add_argument("--catalog", type=Path, default=None, help="catalog.parquet (default: DATA/catalog.parquet)")
    p.add_argument("--max-quarantine-fraction", type=float, default=0.0, help="share of bad rows tolerated")
    p.add_argument(
        "--isolation",
        choices=["process", "subprocess"],
        default="process",
        help="process: this command runs the ClientApp itself, warm (default); subprocess: Flower starts "
        "a fresh flwr-clientapp with the coordinator's FAB per message",
    )
    p.add_argument("--runtime-port", type=int, default=0, help="the SuperNode's local Runtime API port (0: any)")
    p.add_argument(
        "--join-timeout",
        type=float,
        default=60.0,
        help="seconds to keep asking while the SuperLink does not know this node's key (it may be registering it)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--fault", default="", help=argparse.SUPPRESS)  # test-only fault injection (clients/guard.py)


def _refuse_with_report(data_dir: Path, exc: Exception) -> None:
    """Print the data report (as `fedmart data check` does), then fail with one line."""
    from federation.cli import _print_check

    report_path = data_dir / ".fedmart" / "validation" / "report.json"
    if report_path.is_file():
        _print_check(json.loads(report_path.read_text()), report_path, report_path.with_name("quarantine.parquet"))
    raise UserError(f"node refuses to join: {str(exc).splitlines()[0]}") from exc


@exit_on_user_error
def node_cmd(args: argparse.Namespace) -> int:
    from federation.console import console
    from privacy.pki import (
        PkiError,
        check_private_permissions,
        load_node_private_key,
        node_public_key_openssh,
        ssh_fingerprint,
    )

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "flwr"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    data_dir = args.data.resolve()
    if not data_dir.is_dir():
        raise UserError(f"--data {args.data}: no such directory")
    for flag, path in (("--root-cert", args.root_cert), ("--auth-key", args.auth_key)):
        if not path.is_file():
            raise UserError(f"{flag} {path}: no such file")
    try:
        check_private_permissions(args.auth_key)
        key = load_node_private_key(args.auth_key.read_bytes())
    except PkiError as exc:
        raise UserError(f"--auth-key {args.auth_key}: {exc}") from exc
    fingerprint = ssh_fingerprint(node_public_key_openssh(key.public_key()))
    if args.max_epsilon is not None and not args.max_epsilon > 0:
        raise UserError(f"--max-epsilon must be > 0, got {args.max_epsilon}")
    if args.fault:
        from clients.guard import parse_fault

        try:
            parse_fault(args.fault)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    node_config = {
        "data-dir": str(data_dir),
        "name": args.name,
        "catalog": str(args.catalog.resolve()) if args.catalog else None,
        "max-epsilon": args.max_epsilon,
        "max-quarantine-fraction": args.max_quarantine_fraction,
        "fault": args.fault or None,
    }
    # 1. The node's own data, validated before it joins: bad data never reaches training.
    from clients.interactions import DataError
    from clients.node import load_node
    from federation.catalog import CatalogError

    try:
        node = load_node({k: v for k, v in node_config.items() if v is not None}, {})
    except (DataError, CatalogError) as exc:
        _refuse_with_report(data_dir, exc)
    console.print(
        f"node [bold]{node.name}[/]: data ok ({node.interactions.num_users:,} users, {len(node.interactions):,} "
        f"events, dataset {node.dataset_id}, catalog {node.catalog.version}); budget "
        f"ε≤{args.max_epsilon if args.max_epsilon is not None else 'default'}; key {fingerprint}"
    )
    # 2. The SuperNode with the node's own settings.
    state = data_dir / ".fedmart"
    state.mkdir(parents=True, exist_ok=True)
    node_config["name"] = node.name
    cfg_path = state / "node-config.toml"
    cfg_path.write_text(node_config_toml(node_config))
    home = state / "flwr"
    port = args.runtime_port or free_port()
    argv = supernode_argv(
        superlink=args.superlink,
        root_cert=args.root_cert.resolve(),
        auth_key=args.auth_key.resolve(),
        node_config=cfg_path,
        isolation=args.isolation,
        runtime_port=port,
    )
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.isolation == "process":
        from clients.app import app  # imported once: every message of every run reuses it
        from clients.worker import serve_tasks
    restarts = 0
    joining_since = time.monotonic()
    while True:
        log_path = state / "supernode.log"
        offset = log_path.stat().st_size if log_path.exists() else 0  # this incarnation's output starts here
        supernode = Child("flower-supernode", argv, env=flwr_env(home), cwd=state, log_path=log_path)
        try:
            if args.isolation == "process":
                console.print(f"node {node.name}: joining {args.superlink}; the ClientApp runs in this process")
                serve_tasks(
                    f"127.0.0.1:{port}", app, fab_id=FAB_ID, stop=stop, alive=supernode.alive, on_message=_log_message
                )
            else:
                console.print(f"node {node.name}: joining {args.superlink}; Flower starts a ClientApp per message")
                while not stop.is_set() and supernode.alive():
                    stop.wait(0.5)
        finally:
            supernode.stop()
        if stop.is_set():
            console.print(f"node {node.name}: stopped")
            return 0
        text = log_path.read_bytes()[offset:].decode(errors="replace")
        if "SuperNode ID" in text and restarts < MAX_SUPERNODE_RESTARTS:
            # It was accepted, then lost the SuperLink (e.g. a coordinator restarted on a fresh
            # database answers 401): join again.
            restarts += 1
            joining_since = time.monotonic()
            log.warning("flower-supernode stopped after joining; restarting (%d/%d)", restarts, MAX_SUPERNODE_RESTARTS)
            stop.wait(5.0)
            continue
        if _exit_code(text) == "305" and time.monotonic() - joining_since < args.join_timeout:
            # The key is unknown: perhaps the coordinator is still registering it. Ask again
            # until --join-timeout; after that the refusal is final.
            log.warning(
                "the SuperLink does not know this node's key (yet); retrying for up to %.0fs", args.join_timeout
            )
            stop.wait(5.0)
            continue
        raise UserError(explain_supernode_exit(text, pub=f"the .pub of {args.auth_key}", superlink=args.superlink))


def _log_message(msg) -> None:
    from federation import wire

    config = msg.content.config_records.get(wire.CONFIG) if msg.has_content() else None
    server_round = config.get(wire.SERVER_ROUND) if config is not None else None
    log.info(
        "task %s (round %s)%s",
        msg.metadata.message_type,
        msg.metadata.group_id or "-",
        f" server-round {server_round}" if server_round is not None else "",
    )


node_cmd.add_arguments = _node_args  # type: ignore[attr-defined]
command("node", "run a department node: validate its data, then join the coordinator's SuperLink")(node_cmd)


# --- fedmart nodes (register / list / unregister on a running coordinator) ---------------------


def _nodes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="the coordinator's run directory (outputs/<run>)")
    sub = p.add_subparsers(dest="nodes_cmd", required=True)
    r = sub.add_parser("register", help="register node public keys (*.pub) with the running SuperLink")
    r.add_argument("pub", nargs="+", type=Path)
    sub.add_parser("list", help="registered nodes and their status")
    u = sub.add_parser("unregister", help="unregister a node by its Flower node id (key rotation, revocation)")
    u.add_argument("node_id")


@exit_on_user_error
def nodes_cmd(args: argparse.Namespace) -> int:
    from federation.console import console

    home = args.run / "flwr" / "home"
    if not (home / "config.toml").is_file():
        raise UserError(f"{args.run}: no coordinator there (no flwr/home/config.toml); pass the run directory")
    if args.nodes_cmd == "register":
        for name, status in register_node_keys(home, list(args.pub)).items():
            console.print(f"{name}: {status}")
        return 0
    if args.nodes_cmd == "list":
        proc = _flwr(["supernode", "list", CONNECTION, "--format", "json"], home)
    else:
        proc = _flwr(["supernode", "unregister", args.node_id, CONNECTION], home)
    if proc.returncode != 0:
        raise UserError(" ".join((proc.stdout + proc.stderr).split())[-300:] or "flwr failed")
    console.print(proc.stdout.strip(), markup=False, highlight=False, soft_wrap=True)
    return 0


nodes_cmd.add_arguments = _nodes_args  # type: ignore[attr-defined]
command("nodes", "register, list and unregister node keys on a running coordinator")(nodes_cmd)


# --- fedmart coordinate (Hydra app) ------------------------------------------------------------


@dataclass
class DeploySettings:
    certs: Path
    node_keys: Path
    host: str
    port: int
    num_nodes: int | None
    catalog: Path | None
    isolation: str
    startup_timeout: float
    database: Path

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> DeploySettings:
        certs = Path(d.get("certs") or "certs").resolve()
        port = int(d.get("port") or 9092)
        if not 0 < port < 65536:
            raise UserError(f"deploy.port must be a TCP port, got {port}")
        if d.get("isolation", "subprocess") not in ("subprocess", "process"):
            raise UserError(f"deploy.isolation must be subprocess or process, not {d.get('isolation')!r}")
        return cls(
            certs=certs,
            node_keys=Path(d["node_keys"]).resolve() if d.get("node_keys") else certs / "nodes",
            host=str(d.get("host") or "127.0.0.1"),
            port=port,
            num_nodes=int(d["num_nodes"]) if d.get("num_nodes") else None,
            catalog=Path(d["catalog"]).resolve() if d.get("catalog") else None,
            isolation=str(d.get("isolation") or "subprocess"),
            startup_timeout=float(d.get("startup_timeout") or 120),
            database=Path(d.get("database") or "outputs/superlink/state.db").resolve(),
        )


def _check_certs(deploy: DeploySettings) -> list[Path]:
    from privacy.pki import PkiError, PkiLayout, check_private_permissions

    layout = PkiLayout(deploy.certs)
    for path in (layout.ca_cert, layout.server_cert, layout.server_key):
        if not path.is_file():
            raise UserError(f"{path}: missing; run `fedmart certs --out {deploy.certs} --nodes N` first")
    try:
        check_private_permissions(layout.server_key)
    except PkiError as exc:
        raise UserError(str(exc)) from exc
    pubs = sorted(deploy.node_keys.glob("*.pub"))
    if not pubs:
        raise UserError(f"{deploy.node_keys}: no node public keys (*.pub) to register")
    return pubs


def _audit_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _load_resume(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(
            f"resume={run_dir}: no config.yaml there; pass the directory of an earlier `fedmart coordinate`"
        )
    base = OmegaConf.load(saved)
    extra = [o for o in overrides if not o.lstrip("+~").startswith("resume=")]
    groups = [o for o in extra if "." not in o.split("=", 1)[0]]
    if groups:
        raise UserError(f"resume takes key overrides such as federation.num_rounds=N, not {groups[0]!r}")
    if extra:
        base = OmegaConf.merge(base, OmegaConf.from_dotlist([o.lstrip("+") for o in extra]))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(base, resolve=True))
    return OmegaConf.to_container(base, resolve=True)


def coordinate(cfg: dict[str, Any], run_dir: Path) -> Path:
    """Start the SuperLink, register the node keys, run the federation; returns the run directory."""
    from federation.console import console
    from federation.simulate import check_settings

    check_settings(cfg)
    deploy = DeploySettings.from_config(cfg.get("deploy") or {})
    pubs = _check_certs(deploy)
    run_dir = run_dir.resolve()
    flwr_dir = run_dir / "flwr"
    home = flwr_dir / "home"
    address = f"{deploy.host}:{deploy.port}"
    write_flwr_config(home, address, deploy.certs / "ca.pem")
    deploy.database.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in cfg.items() if k != "deploy"}
    sim = {
        "run-dir": str(run_dir),
        "nodes-dir": NONE,
        "catalog": str(deploy.catalog) if deploy.catalog else NONE,
        "central-data": NONE,
        "num-nodes": deploy.num_nodes or len(pubs),
    }
    run_config = flatten({**settings, "sim": sim})
    app_dir = stage_app(flwr_dir / "app", run_config)  # the staged defaults: exactly the keys this run sends
    (flwr_dir / "run-config.json").write_text(json.dumps(run_config, indent=1) + "\n")
    import tomli_w

    overrides = flwr_dir / "run-config.toml"
    overrides.write_text(tomli_w.dumps(run_config))

    if wait_for_port(deploy.host, deploy.port, 0.5):
        raise UserError(f"{address} is already in use; stop what listens there or set deploy.port")
    stale = stale_serverapps(address)
    if stale:
        log.warning("stopping the ServerApp processes a crashed coordinator left behind: %s", stale)
        if reap_stale_serverapps(address):
            raise UserError(f"ServerApp processes {stale} of an earlier coordinator on {address} would not stop")
    superlink = Child(
        "flower-superlink",
        superlink_argv(
            certs=deploy.certs,
            host=deploy.host,
            port=deploy.port,
            database=deploy.database,
            isolation=deploy.isolation,
        ),
        env=flwr_env(home),
        cwd=Path.cwd(),
        log_path=flwr_dir / "superlink.log",
    )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    runner = None
    try:
        if not wait_for_port(deploy.host, deploy.port, deploy.startup_timeout, superlink.alive):
            raise UserError(f"the SuperLink did not come up on {address}: {superlink.tail(3)}")
        registered = register_node_keys(home, pubs)
        console.print(
            f"SuperLink on https://{address} (TLS, node auth); {len(registered)} node keys: "
            + ", ".join(f"{k} ({v})" for k, v in registered.items())
        )
        started_events = len(_audit_events(run_dir / "audit.jsonl"))
        runner = subprocess.Popen(
            ["flwr", "run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--stream"],
            env=flwr_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _follow(runner, flwr_dir / "serverapp.log", run_dir / "metrics.jsonl", stop)
        events = _audit_events(run_dir / "audit.jsonl")[started_events:]
        if not any(e.get("event") == "run_end" for e in events):
            if stop.is_set():
                raise UserError(f"stopped; continue with `fedmart coordinate resume={run_dir}`")
            raise UserError(
                f"the run ended before its last round; see {flwr_dir / 'serverapp.log'} and "
                f"{superlink.log_path}; continue with `fedmart coordinate resume={run_dir}`"
            )
        return run_dir
    finally:
        if runner is not None and runner.poll() is None:
            runner.terminate()
        superlink.stop()
        for s, h in previous.items():
            signal.signal(s, h)


_PROGRESS = re.compile(r"Successfully started run|Exit Code|Error|error:")


def round_line(row: dict[str, Any]) -> str:
    """One line per completed round, from its ``metrics.jsonl`` row."""
    parts = [f"round {row['round']}", f"{len(row.get('replied', []))}/{len(row.get('sampled', []))} replied"]
    for key, label in (
        ("timed_out", "dropped"),
        ("rejected", "rejected"),
        ("failed", "failed"),
        ("declined", "declined"),
    ):
        if row.get(key):
            parts.append(f"{label}: {', '.join(sorted(row[key]))}")
    loss = (row.get("train_metrics") or {}).get("train_loss")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    ndcg = (row.get("federated_eval") or {}).get("test_ndcg@10")
    if ndcg is not None:
        parts.append(f"NDCG@10 {ndcg:.4f}")
    eps = [m["epsilon"] for m in (row.get("node_metrics") or {}).values() if "epsilon" in m]
    if eps:
        parts.append(f"ε≤{max(eps):.2f}")
    if row.get("abort_reason"):
        parts.append(f"ABORTED: {row['abort_reason']}")
    parts.append(f"{(row.get('seconds') or {}).get('total', 0.0):.1f}s")
    return " | ".join(parts)


def _follow(proc: subprocess.Popen, log_path: Path, metrics: Path, stop: threading.Event) -> None:
    """Copy ``flwr run --stream`` output to a log file and print each completed round, until it exits."""
    from federation.console import console

    seen = len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    def watch() -> None:
        nonlocal seen
        while True:
            done = proc.poll() is not None
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            for line in lines[seen:]:
                try:
                    console.print(round_line(json.loads(line)), markup=False, highlight=False)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            seen = max(seen, len(lines))
            if done:
                return
            if stop.wait(1.0):
                proc.terminate()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with open(log_path, "a") as out:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if _PROGRESS.search(line):
                console.print(line.rstrip()[-200:], markup=False, highlight=False)
    proc.wait()
    watcher.join(timeout=5)


def _coordinate_hydra(cfg) -> None:  # decorated in coordinate_main (Hydra needs the config path)
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from federation.console import console, quiet_third_party_logs

    quiet_third_party_logs()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.resume:
        resolved = _load_resume(Path(str(cfg.resume)), list(HydraConfig.get().overrides.task))
        resolved["resume"] = str(cfg.resume)
    else:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        coordinate(resolved, run_dir)
    except ValueError as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc)) from exc
    console.print(f"[bold green]done[/]: report {run_dir / 'report.md'}")


def coordinate_main() -> None:
    """Entry point of ``fedmart coordinate`` (a Hydra app over ``conf/coordinate.yaml``)."""
    import hydra

    import federation.simulate  # noqa: F401  (registers the fedmart_run_dir resolver)

    hydra.main(version_base="1.3", config_path="../conf", config_name="coordinate")(
        exit_on_user_error(_coordinate_hydra)
    )()


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m federation.deploy")
    p.add_argument("action", choices=["sync-pyproject", "check-pyproject"])
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = p.parse_args(argv)
    changed = sync_pyproject(args.pyproject, check=args.action == "check-pyproject")
    if args.action == "check-pyproject" and changed:
        sys.stderr.write(
            f"{args.pyproject}: [tool.flwr.app.config] is stale; run python -m federation.deploy sync-pyproject\n"
        )
        return 1
    sys.stderr.write(f"{args.pyproject}: {'updated' if changed else 'up to date'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
