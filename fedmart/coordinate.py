"""``fedmart coordinate``: a real deployment on Flower 1.41, started and supervised from one command.

Processes (all on Flower's deployment runtime, talking HTTPS)::

    nodes ──> fleet gate (deploy.host:deploy.port, Fleet API only: fedmart/fleet_gate.py)
                 └──> flower-superlink  (TLS, --enable-supernode-auth, 127.0.0.1:deploy.control_port)
    fedmart coordinate ──┘    └─ flower-superexec ─> flwr-serverapp (federation.app:app)
                           flwr supernode register <node>.pub   (one per node key, on loopback)
                           flwr run <staged app> --run-config <flattened Hydra config>

TLS: the SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port with the
certificate ``fedmart certs`` issued (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``);
that port is on loopback only, and nodes reach the SuperLink through the gate, which serves
the same certificate and forwards only the Fleet routes (Flower 1.41 has no authentication
for the Control API in its open-source build). Nodes (``fedmart node``) and the ``flwr`` CLI
trust only ``ca.pem``. Node authentication: the SuperLink runs with
``--enable-supernode-auth`` and accepts a SuperNode only if its public key was registered
(``flwr supernode register``, :mod:`fedmart.nodes_admin`). Signing: the ServerApp signs
model versions and audit entries with ``registry.signing_key``, which must exist: a
deployment never creates it (:func:`fedmart.simulate.check_signing_key`).

The coordinator's outputs go to ``outputs/<run>/`` exactly as in simulation (the run
config's ``sim.run-dir``); Flower's own state (SuperLink database, FAB installs, the staged
app, logs) to ``outputs/<run>/flwr/``. ``fedmart coordinate resume=outputs/<run>``
restarts the SuperLink on the same database and port and continues after the last
completed round.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from conf.deploy_settings import CoordinateSettings, DeploySettings
from conf.settings import SimSettings
from federation.catalog import Catalog
from federation.runconfig import flatten
from fedmart.errors import UserError
from fedmart.fleet_gate import gate_argv
from fedmart.hydra_runs import hydra_entry, run_job
from fedmart.nodes_admin import ControlClient, register_node_keys
from fedmart.staging import stage_app
from fedmart.supervise import (
    CONNECTION,
    Child,
    flwr_env,
    reap_stale_serverapps,
    stale_serverapps,
    wait_for_port,
    write_flwr_config,
)

__all__ = [
    "CONTROL_HOST",
    "Deployment",
    "coordinate",
    "main",
    "round_line",
    "round_lines",
    "start_link",
    "superlink_argv",
]

log = logging.getLogger(__name__)

CONTROL_HOST = "127.0.0.1"  # the SuperLink's own address: the coordinator's flwr CLI and ServerApp only


@dataclass(frozen=True)
class Deployment:
    """The ``deploy`` group (:class:`conf.deploy_settings.DeploySettings`) with its paths resolved."""

    certs: Path
    node_keys: Path
    host: str
    port: int
    control_port: int
    num_nodes: int | None
    catalog: Path | None
    isolation: str
    startup_timeout: float
    database: Path

    @property
    def control_address(self) -> str:
        """The SuperLink (Fleet, Control, Runtime APIs), reachable from this machine only."""
        return f"{CONTROL_HOST}:{self.control_port}"

    @property
    def node_address(self) -> str:
        """Where the Fleet gate listens."""
        return f"{self.host}:{self.port}"

    @property
    def dial_hint(self) -> str:
        """What nodes dial, as the start-up line says it: a wildcard host is no address to dial."""
        if self.host in ("0.0.0.0", "::", ""):
            name = "<a host name of the TLS certificate (fedmart certs --hosts)>"
            return f"https://{name}:{self.port} (the gate listens on all interfaces)"
        return f"https://{self.node_address}"

    @classmethod
    def from_settings(cls, d: DeploySettings) -> Deployment:
        certs = Path(d.certs).resolve()
        return cls(
            certs=certs,
            node_keys=Path(d.node_keys).resolve() if d.node_keys else certs / "nodes",
            host=d.host,
            port=d.port,
            control_port=d.control_port,
            num_nodes=d.num_nodes,
            catalog=Path(d.catalog).resolve() if d.catalog else None,
            isolation=d.isolation,
            startup_timeout=d.startup_timeout,
            database=Path(d.database).resolve(),
        )


def _check_certs(deploy: Deployment) -> list[Path]:
    from cryptography import x509

    from privacy.pki import PkiError, PkiLayout, cert_hosts, check_private_permissions

    layout = PkiLayout(deploy.certs)
    for path in (layout.ca_cert, layout.server_cert, layout.server_key):
        if not path.is_file():
            raise UserError(f"{path}: missing; run `fedmart certs --out {deploy.certs} --hosts NAMES` first")
    try:
        check_private_permissions(layout.server_key)
    except PkiError as exc:
        raise UserError(str(exc)) from exc
    if CONTROL_HOST not in cert_hosts(x509.load_pem_x509_certificate(layout.server_cert.read_bytes())):
        raise UserError(
            f"{layout.server_cert} does not name {CONTROL_HOST} (the SuperLink's own loopback address); "
            f"re-issue it: `fedmart certs --out {deploy.certs} --hosts ...` (it adds {CONTROL_HOST})"
        )
    # The nodes' Flower authentication keys; their secure-aggregation roster keys
    # (NAME.roster.key.pub, beside them) go into the roster, not to the SuperLink.
    pubs = sorted(p for p in deploy.node_keys.glob("*.pub") if not p.name.endswith(".roster.key.pub"))
    if not pubs:
        raise UserError(
            f"{deploy.node_keys}: no node public keys (*.pub) to register; put the departments' NAME.pub there "
            "(each makes its own: fedmart node keygen --name NAME), or set deploy.node_keys=DIR"
        )
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


def record_catalog(catalog: Path | None, run_dir: Path) -> Path | None:
    """Keep the catalog the run trains on as ``outputs/<run>/catalog.parquet``, as ``simulate`` does.

    ``fedmart serve --catalog outputs/<run>/catalog.parquet`` then serves the run's versions with
    the catalog they were trained on. A resumed run must train on the same catalog.
    """
    if catalog is None:
        return None
    cat = Catalog.load(
        catalog, hint="pass deploy.catalog=PATH: the platform catalog the nodes prepared their data with"
    )
    dest = run_dir / "catalog.parquet"
    if dest.is_file():
        kept = Catalog.load(dest)
        if kept.version != cat.version:
            raise UserError(
                f"deploy.catalog {catalog} is catalog {cat.version}, but this run trained on {kept.version} "
                f"({dest}): resume with the run's own catalog (deploy.catalog={dest})"
            )
        return dest
    run_dir.mkdir(parents=True, exist_ok=True)
    cat.save(dest)
    return dest


def coordinate(cfg: dict[str, Any], run_dir: Path) -> Path:
    """Start the SuperLink, register the node keys, run the federation; returns the run directory."""
    from fedmart.console import console
    from fedmart.simulate import check_init, check_mechanisms, check_signing_key

    settings = CoordinateSettings.from_dict(cfg)  # validated once, where the config enters
    if settings.registry.create_key:
        raise UserError("registry.create_key=true: `fedmart coordinate` never creates the signing key; drop it")
    request = check_signing_key(settings.request())  # before anything starts: a deployment never makes a key
    check_mechanisms(settings)
    deploy = Deployment.from_settings(settings.deploy)
    request = check_init(request, deploy.catalog)  # federation.init: verified, its shape and catalog checked
    pubs = _check_certs(deploy)
    run_dir = run_dir.resolve()
    flwr_dir = run_dir / "flwr"
    home = flwr_dir / "home"
    write_flwr_config(home, deploy.control_address, deploy.certs / "ca.pem")
    deploy.database.parent.mkdir(parents=True, exist_ok=True)
    record_catalog(deploy.catalog, run_dir)
    sim = SimSettings(
        run_dir=str(run_dir),
        catalog=str(deploy.catalog) if deploy.catalog else None,
        # Announced in the run config: each node checks its prepared data's catalog against it.
        catalog_version=Catalog.load(deploy.catalog).version if deploy.catalog else None,  # checked above
        num_nodes=deploy.num_nodes or len(pubs),
        dry_run=settings.deploy.dry_run,
    )
    # The run config is the request only: no `deploy`, and no `node` (each node reads its own policy file).
    run_config = flatten(request.with_sim(sim).to_dict())
    app_dir = stage_app(flwr_dir / "app", run_config)  # the staged defaults: exactly the keys this run sends
    (flwr_dir / "run-config.json").write_text(json.dumps(run_config, indent=1) + "\n")
    import tomli_w

    overrides = flwr_dir / "run-config.toml"
    overrides.write_text(tomli_w.dumps(run_config))

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with start_link(deploy, flwr_dir, home) as (superlink, _gate):
            with ControlClient.from_home(home, where=str(run_dir)) as control:
                registered = register_node_keys(control, pubs)
            console.print(
                f"SuperLink on https://{deploy.control_address} (TLS, node auth, Control API on this machine only); "
                f"nodes connect to {deploy.dial_hint} (Fleet API only); {len(registered)} node keys: "
                + ", ".join(f"{r.name} ({r.status}, node id {r.node_id})" for r in registered),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            _run_app(app_dir, overrides, home, run_dir, superlink.log_path, stop, dry_run=settings.deploy.dry_run)
        return run_dir
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run_app(
    app_dir: Path,
    overrides: Path,
    home: Path,
    run_dir: Path,
    superlink_log: Path,
    stop: threading.Event,
    *,
    dry_run: bool = False,
) -> None:
    """``flwr run`` the staged app on the SuperLink and follow it; a UserError unless the run ended."""
    flwr_dir = run_dir / "flwr"
    dry = run_dir / "dry-run.json"
    dry.unlink(missing_ok=True)
    started_events = len(_audit_events(run_dir / "audit.jsonl"))
    runner = subprocess.Popen(
        ["flwr", "run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--stream"],
        env=flwr_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _follow(runner, flwr_dir / "serverapp.log", run_dir / "metrics.jsonl", stop)
    finally:
        if runner.poll() is None:
            runner.terminate()
    if dry_run:
        if not dry.is_file():
            raise UserError(f"the dry run ended before the nodes answered; see {flwr_dir / 'serverapp.log'}")
        return
    events = _audit_events(run_dir / "audit.jsonl")[started_events:]
    refused = [e for e in events if e.get("event") == "run_refused"]
    if refused:  # every node declined a round by its own policy or budget
        raise UserError(str(refused[-1].get("reason", "every node declined")))
    if not any(e.get("event") == "run_end" for e in events):
        if stop.is_set():
            raise UserError(f"stopped; continue with `fedmart coordinate resume={run_dir}`")
        raise UserError(
            f"the run ended before its last round; see {flwr_dir / 'serverapp.log'} and "
            f"{superlink_log}; continue with `fedmart coordinate resume={run_dir}`"
        )


@contextmanager
def start_link(deploy: Deployment, flwr_dir: Path, home: Path) -> Iterator[tuple[Child, Child]]:
    """Start the SuperLink on ``127.0.0.1:deploy.control_port`` and the Fleet gate on ``deploy.host:deploy.port``.

    Yields (superlink, gate) once both accept connections; stops both on exit. The SuperLink's
    one port serves Fleet, Control and Runtime, and Control has no authentication in Flower
    1.41's open-source build: only the coordinator's machine reaches it, nodes reach the gate,
    which forwards the Fleet routes only (:mod:`fedmart.fleet_gate`).
    """
    control = deploy.control_address
    for host, port, key in ((CONTROL_HOST, deploy.control_port, "control_port"), (deploy.host, deploy.port, "port")):
        if wait_for_port(host, port, 0.5):
            raise UserError(f"{host}:{port} is already in use; stop what listens there or set deploy.{key}")
    stale = stale_serverapps(control)
    if stale:
        log.warning("stopping the ServerApp processes a crashed coordinator left behind: %s", stale)
        if reap_stale_serverapps(control):
            raise UserError(f"ServerApp processes {stale} of an earlier coordinator on {control} would not stop")
    argv = superlink_argv(
        certs=deploy.certs,
        host=CONTROL_HOST,
        port=deploy.control_port,
        database=deploy.database,
        isolation=deploy.isolation,
    )
    superlink = Child("flower-superlink", argv, env=flwr_env(home), cwd=Path.cwd(), log_path=flwr_dir / "superlink.log")
    gate: Child | None = None
    try:
        if not wait_for_port(CONTROL_HOST, deploy.control_port, deploy.startup_timeout, superlink.alive):
            raise UserError(f"the SuperLink did not come up on {control}: {superlink.tail(3)}")
        gate = Child(
            "fleet-gate",
            gate_argv(host=deploy.host, port=deploy.port, upstream=control, certs=deploy.certs),
            env=flwr_env(home),
            cwd=Path.cwd(),
            log_path=flwr_dir / "fleet-gate.log",
        )
        if not wait_for_port(deploy.host, deploy.port, deploy.startup_timeout, gate.alive):
            raise UserError(f"the Fleet gate did not come up on {deploy.node_address}: {gate.tail(3)}")
        yield superlink, gate
    finally:
        if gate is not None:
            gate.stop()
        superlink.stop()


_PROGRESS = re.compile(r"Successfully started run|Exit Code|Error|error:|budget warning:|dry run:")


def round_lines(row: dict[str, Any]) -> list[str]:
    """What ``fedmart coordinate`` prints per completed round: the secure-aggregation line (the one the
    ServerApp logs, as in simulation), then the round line."""
    secure = (row.get("secure_aggregation") or {}).get("summary")
    return [*([str(secure)] if secure else []), round_line(row)]


def round_line(row: dict[str, Any]) -> str:
    """One line per completed round, from its ``metrics.jsonl`` row."""
    parts = [f"round {row['round']}", f"{len(row.get('replied', []))}/{len(row.get('sampled', []))} replied"]
    for key, label in (
        ("joined", "joined (registered during the run)"),
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
    from fedmart.console import console

    seen = len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    def watch() -> None:
        nonlocal seen
        while True:
            done = proc.poll() is not None
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            for line in lines[seen:]:
                try:
                    for text in round_lines(json.loads(line)):
                        console.print(text, markup=False, highlight=False, soft_wrap=True)
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
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


def superlink_argv(*, certs: Path, host: str, port: int, database: Path, isolation: str) -> list[str]:
    """``flower-superlink`` with TLS from ``certs`` and node authentication on; no runtime installs."""
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


def _coordinate_job(cfg: DictConfig) -> None:
    run_job(cfg, coordinate, command="coordinate")


# Entry of ``fedmart coordinate`` (a Hydra app over ``conf/coordinate.yaml``). Its job keeps
# the name it had when federation/deploy.py was the entry: the run's log is deploy.log.
main = hydra_entry("coordinate", "deploy", _coordinate_job)
