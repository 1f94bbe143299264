"""``fedmart coordinate``: a real deployment on Flower 1.41, started and supervised from one command.

Processes (all on Flower's deployment runtime, talking HTTPS)::

    fedmart coordinate ──> flower-superlink  (TLS, --enable-supernode-auth, one port)
                              └─ flower-superexec ─> flwr-serverapp (federation.app:app)
                           flwr supernode register <node>.pub   (one per node key)
                           flwr run <staged app> --run-config <flattened Hydra config>

TLS: the SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port with the
certificate ``fedmart certs`` issued (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``);
nodes (``fedmart node``) and the ``flwr`` CLI trust only ``ca.pem``. Node authentication:
the SuperLink runs with ``--enable-supernode-auth`` and accepts a SuperNode only if its
public key was registered (``flwr supernode register``, :mod:`fedmart.nodes_admin`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from conf.settings import CoordinateSettings, DeploySettings, SimSettings
from federation.runconfig import flatten
from fedmart.errors import UserError
from fedmart.hydra_runs import hydra_entry, run_job
from fedmart.nodes_admin import register_node_keys
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

__all__ = ["Deployment", "coordinate", "main", "round_line", "superlink_argv"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deployment:
    """The ``deploy`` group (:class:`conf.settings.DeploySettings`) with its paths resolved."""

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
    def from_settings(cls, d: DeploySettings) -> Deployment:
        certs = Path(d.certs).resolve()
        return cls(
            certs=certs,
            node_keys=Path(d.node_keys).resolve() if d.node_keys else certs / "nodes",
            host=d.host,
            port=d.port,
            num_nodes=d.num_nodes,
            catalog=Path(d.catalog).resolve() if d.catalog else None,
            isolation=d.isolation,
            startup_timeout=d.startup_timeout,
            database=Path(d.database).resolve(),
        )


def _check_certs(deploy: Deployment) -> list[Path]:
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


def coordinate(cfg: dict[str, Any], run_dir: Path) -> Path:
    """Start the SuperLink, register the node keys, run the federation; returns the run directory."""
    from fedmart.console import console
    from fedmart.simulate import check_mechanisms

    settings = CoordinateSettings.from_dict(cfg)  # validated once, where the config enters
    check_mechanisms(settings)
    deploy = Deployment.from_settings(settings.deploy)
    pubs = _check_certs(deploy)
    run_dir = run_dir.resolve()
    flwr_dir = run_dir / "flwr"
    home = flwr_dir / "home"
    address = f"{deploy.host}:{deploy.port}"
    write_flwr_config(home, address, deploy.certs / "ca.pem")
    deploy.database.parent.mkdir(parents=True, exist_ok=True)
    sim = SimSettings(
        run_dir=str(run_dir),
        catalog=str(deploy.catalog) if deploy.catalog else None,
        num_nodes=deploy.num_nodes or len(pubs),
    )
    # The run config is the request only: no `deploy`, and no `node` (each node reads its own policy file).
    run_config = flatten(settings.request().with_sim(sim).to_dict())
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
        refused = [e for e in events if e.get("event") == "run_refused"]
        if refused:  # every node declined a round by its own policy or budget
            raise UserError(str(refused[-1].get("reason", "every node declined")))
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
    from fedmart.console import console

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
