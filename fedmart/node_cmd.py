"""``fedmart node``: a department node validates its own data, then joins the coordinator's SuperLink.

Processes (Flower's deployment runtime, HTTPS)::

    fedmart node ───────> flower-supernode (--root-certificates CA, --auth-supernode-private-key,
                              │             --isolation process, --node-config <node's own settings>)
                              └─ tasks ──> clients.worker.serve_tasks, in fedmart node's own process

The node trusts only the deployment's ``ca.pem``, and signs every Fleet request with its
private key (OpenSSH EC); a SuperLink that does not know the key refuses it at activation
(exit code 305), and the node keeps asking for ``--join-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmart.cli import command
from fedmart.console import setup_logging
from fedmart.errors import UserError, exit_on_user_error
from fedmart.staging import FAB_ID
from fedmart.supervise import Child, GracefulStop, ReplyDelivery, StopNow, flwr_env, free_port

__all__ = [
    "MAX_SUPERNODE_RESTARTS",
    "SEND_GRACE",
    "describe_task",
    "explain_supernode_exit",
    "node_cmd",
    "node_config_toml",
    "node_data_line",
    "run_supernode",
    "supernode_argv",
]

log = logging.getLogger(__name__)

MAX_SUPERNODE_RESTARTS = 5
SEND_GRACE = 60.0  # seconds a stopping node waits for the SuperNode to pass its last reply on


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


# --- fedmart node ------------------------------------------------------------------------------


def _node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="the node's data directory (interactions + catalog)")
    p.add_argument("--superlink", required=True, help="the coordinator's SuperLink as HOST:PORT")
    p.add_argument("--root-cert", type=Path, required=True, help="the deployment's CA certificate (ca.pem)")
    p.add_argument("--auth-key", type=Path, required=True, help="this node's private key (OpenSSH EC, 0600)")
    p.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="this node's privacy policy (YAML or JSON: DP and secure aggregation required, max_epsilon, delta, "
        "accountants, evaluation; docs/privacy.md). Default: the recommended private policy",
    )
    p.add_argument("--max-epsilon", type=float, default=None, help="override the policy's budget (default 10)")
    p.add_argument(
        "--roster",
        type=Path,
        default=None,
        help="the federation's secure-aggregation roster (fedmart roster; received out of band, like ca.pem). "
        "Default: roster.json beside --root-cert, if there",
    )
    p.add_argument(
        "--roster-key",
        type=Path,
        default=None,
        help="this node's own roster key (fedmart roster key). Default: the --auth-key's NAME.roster.key, if there",
    )
    p.add_argument("--name", default=None, help="node name (default: node.json's, else the directory's name)")
    p.add_argument("--catalog", type=Path, default=None, help="catalog.parquet (default: DATA/catalog.parquet)")
    p.add_argument(
        "--max-quarantine-fraction",
        type=float,
        default=0.0,
        help="share of corrupt rows (null ids, unknown items, bad timestamps, duplicates) tolerated in --data; "
        "short histories never count (default 0: `fedmart data prepare` already quarantined them)",
    )
    p.add_argument(
        "--isolation",
        choices=["process", "subprocess"],
        default="process",
        help="process: this command runs its own installed ClientApp, warm (default); subprocess: Flower starts "
        "a fresh flwr-clientapp with the COORDINATOR'S code (its FAB) per message, which a node that requires "
        "DP refuses",
    )
    p.add_argument("--runtime-port", type=int, default=0, help="the SuperNode's local Runtime API port (0: any)")
    p.add_argument(
        "--join-timeout",
        type=float,
        default=120.0,
        help="seconds to keep asking while the SuperLink refuses to activate this node: its key may still be being "
        "registered, or, after a crash, the SuperLink still holds this node's previous session (it expires in about "
        "a minute)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--fault", default="", help=argparse.SUPPRESS)  # test-only fault injection (clients/guard.py)


def _check_policy(args: argparse.Namespace):
    """The node's policy as it will be enforced, or a one-line refusal to start."""
    from clients.node_policy import resolve_policy
    from conf.settings import NodeSettings

    node = NodeSettings(policy=str(args.policy) if args.policy else None, max_epsilon=args.max_epsilon)
    try:
        policy = resolve_policy(node, None)
    except ValueError as exc:
        raise UserError(f"--policy {args.policy}: {exc}") from exc
    if args.isolation == "subprocess":
        if policy.require_dp:
            raise UserError(
                "--isolation subprocess runs the coordinator's code (its FAB) on this node's data, so the node's "
                "policy could not be enforced; this node's policy requires DP: use --isolation process (the default)"
            )
        log.warning("--isolation subprocess: the coordinator's code runs on this node's data; it is trusted entirely")
    return policy


def _check_roster(args: argparse.Namespace, policy, data_dir: Path) -> dict[str, str | None]:
    """The node's roster and roster key, checked at join (its key must be a member), as node-config entries."""
    from privacy.secagg.identity import NodeIdentity
    from privacy.secagg.roster import RosterError

    roster = args.roster or args.root_cert.with_name("roster.json")
    key = args.roster_key or args.auth_key.with_name(args.auth_key.stem + ".roster.key")
    if not (roster.is_file() and key.is_file()):
        if args.roster or args.roster_key:
            raise UserError(f"--roster {roster} and --roster-key {key} must both exist")
        if policy.require_secagg and policy.secagg_threat_model == "active":
            raise UserError(
                "this node's policy takes part in secure aggregation only in the active-adversary mode "
                "(secagg_threat_model: active), which needs the federation's roster: pass --roster and --roster-key "
                "(fedmart roster; docs/secagg.md)"
            )
        log.warning("no secure-aggregation roster: this node can take part in semi-honest sessions only")
        return {"roster": None, "roster-key": None}
    try:
        identity = NodeIdentity.load(
            roster, key, state_dir=data_dir / ".fedmart", threat_model=policy.secagg_threat_model
        )
    except (RosterError, ValueError) as exc:
        raise UserError(f"secure-aggregation roster: {exc}") from exc
    log.info("roster %s: %d members, digest %s; this node is %s", roster, len(identity.roster), identity.roster.digest,
             identity.fingerprint)  # fmt: skip
    return {"roster": str(roster.resolve()), "roster-key": str(key.resolve())}


def _refuse_with_report(data_dir: Path, exc: Exception) -> None:
    """Print the data report (as `fedmart data check` does), then fail with one line."""
    from fedmart.data_cmds import print_check

    report_path = data_dir / ".fedmart" / "validation" / "report.json"
    if report_path.is_file():
        print_check(json.loads(report_path.read_text()), report_path, report_path.with_name("quarantine.parquet"))
    raise UserError(f"node refuses to join: {str(exc).splitlines()[0]}") from exc


@exit_on_user_error
def node_cmd(args: argparse.Namespace) -> int:
    from fedmart.console import console
    from privacy.pki import (
        PkiError,
        check_private_permissions,
        load_node_private_key,
        node_public_key_openssh,
        ssh_fingerprint,
    )

    setup_logging(args.log_level)
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
    policy = _check_policy(args)
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
        "policy": str(args.policy.resolve()) if args.policy else None,
        "max-epsilon": args.max_epsilon,
        "max-quarantine-fraction": args.max_quarantine_fraction,
        "fault": args.fault or None,
        **_check_roster(args, policy, data_dir),
    }
    # 1. The node's own data, validated before it joins: bad data never reaches training.
    from clients.interactions import DataError
    from clients.node import load_node
    from conf.settings import NodeSettings, RunSettings
    from federation.catalog import CatalogError

    try:
        node = load_node(
            NodeSettings.from_node_config({k: v for k, v in node_config.items() if v is not None}), RunSettings()
        )
    except (DataError, CatalogError) as exc:
        _refuse_with_report(data_dir, exc)
    console.print(
        f"node [bold]{node.name}[/]: data ok: {node_data_line(node)}; catalog {node.catalog.version}; "
        f"policy: DP {'required' if policy.require_dp else 'optional'}, "
        f"secure aggregation {'required' if policy.require_secagg else 'optional'}, budget ε≤{policy.max_epsilon:g}; "
        f"key {fingerprint}"
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
    stopper = GracefulStop(f"node {node.name}")
    if args.isolation == "process":
        from clients.app import app  # imported once: every message of every run reuses it
        from clients.worker import serve_tasks

        def serve(alive: Callable[[], bool], on_reply: Callable[[Any], None]) -> None:
            console.print(f"node {node.name}: joining {args.superlink}; the ClientApp runs in this process")
            serve_tasks(f"127.0.0.1:{port}", app, fab_id=FAB_ID, stop=stopper.event, alive=alive,
                        on_message=_log_message, on_reply=on_reply)  # fmt: skip
    else:

        def serve(alive: Callable[[], bool], on_reply: Callable[[Any], None]) -> None:
            console.print(f"node {node.name}: joining {args.superlink}; Flower starts a ClientApp per message")
            while not stopper.event.is_set() and alive():
                stopper.event.wait(0.5)

    stopper.install()  # from here on, a signal lets the task in progress finish and send its reply
    try:
        return run_supernode(
            argv,
            env=flwr_env(home),
            state=state,
            stop=stopper.event,
            serve=serve,
            name=node.name,
            join_timeout=args.join_timeout,
            explain=lambda text: explain_supernode_exit(
                text, pub=f"the .pub of {args.auth_key}", superlink=args.superlink
            ),
        )
    except StopNow as exc:
        console.print(f"{exc}: the task in progress was abandoned, its reply not sent", markup=False)
        return 1
    finally:
        stopper.restore()


def run_supernode(
    argv: list[str],
    *,
    env: dict[str, str],
    state: Path,
    stop: threading.Event,
    serve: Callable[[Callable[[], bool], Callable[[Any], None]], None],
    name: str,
    join_timeout: float,
    explain: Callable[[str], str],
    send_grace: float = SEND_GRACE,
) -> int:
    """Supervise ``flower-supernode`` (``argv``) while ``serve(alive, on_reply)`` runs the node's tasks.

    Returns 0 once ``stop`` is set (SIGTERM, SIGINT): ``serve`` finishes the task it holds and
    hands its reply to the SuperNode, which is stopped only after it logged passing that reply
    on to the SuperLink (or ``send_grace`` seconds); the SuperNode runs in a session of its own,
    so a signal to this command's process group does not stop it first. A SuperNode that stops
    by itself is restarted after it had joined (up to :data:`MAX_SUPERNODE_RESTARTS` times) or,
    while its key is unknown to the SuperLink, until ``join_timeout``; otherwise a UserError
    with ``explain(its log)``.
    """
    from fedmart.console import console

    restarts = 0
    joining_since = time.monotonic()
    log_path = state / "supernode.log"
    while True:
        offset = log_path.stat().st_size if log_path.exists() else 0  # this incarnation's output starts here
        supernode = Child("flower-supernode", argv, env=env, cwd=state, log_path=log_path, new_session=True)
        delivery = ReplyDelivery(log_path)
        sent = "no reply"
        try:
            serve(supernode.alive, delivery.pushing)
            if stop.is_set():
                sent = delivery.wait(send_grace, alive=supernode.alive)
        finally:
            supernode.stop()
        if stop.is_set():
            outcome = {
                "sent": "its last reply reached the coordinator",
                "no reply": "no task was in progress",
            }.get(sent, f"its last reply may not have reached the coordinator ({sent}; see {log_path})")
            console.print(f"node {name}: stopped; {outcome}", markup=False, highlight=False)
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
        if _exit_code(text) == "305" and time.monotonic() - joining_since < join_timeout:
            # Flower answers 305 both for a key it does not know (the coordinator may still be
            # registering it) and, after this node crashed, while its previous session is still
            # live there (about 30 s). Ask again until --join-timeout; then the refusal is final.
            log.warning(
                "the SuperLink does not activate this node yet (its key is not registered yet, or it still holds "
                "this node's session from before a restart); retrying for up to %.0fs",
                join_timeout,
            )
            stop.wait(5.0)
            continue
        raise UserError(explain(text))


def describe_task(msg) -> str:
    """How the node's log names a message: its type, the round it belongs to, its secure-aggregation stage.

    The round is the coordinator's ``server-round`` (TRAIN and EVALUATE configs) or, for a secure-
    aggregation stage message, its group id; messages outside rounds (``query.hello``) name none.
    """
    from federation import wire
    from privacy.secagg import wire as secagg_wire

    parts = []
    content = msg.content if msg.has_content() else None
    config = content.config_records.get(wire.CONFIG) if content is not None else None
    server_round = config.get(wire.SERVER_ROUND) if config is not None else None
    if server_round is None and str(msg.metadata.group_id).isdigit():
        server_round = msg.metadata.group_id
    if server_round is not None:
        parts.append(f"round {server_round}")
    stage = content.config_records.get(secagg_wire.RECORD) if content is not None else None
    if stage is not None:
        parts.append(f"secure aggregation: {stage.get(secagg_wire.STAGE)}")
    return f"task {msg.metadata.message_type}" + (f" ({', '.join(parts)})" if parts else "")


def node_data_line(node) -> str:
    """The node's one-line data summary, with what `fedmart data prepare` quarantined before."""
    from clients.validation import summary

    if node.report is None:  # a simulated node's partition, validated by `fedmart simulate`
        return f"{len(node.interactions):,} events, {node.interactions.num_users:,} users"
    line = summary(node.report)
    meta = node.directory / "node.json" if node.directory else None
    prepared = json.loads(meta.read_text()).get("prepared") if meta and meta.is_file() else None
    if prepared and prepared.get("quarantined"):
        line += f" (before that, data prepare {prepared['quarantined']})"
    return line


def _log_message(msg) -> None:
    log.info("%s", describe_task(msg))


node_cmd.add_arguments = _node_args  # type: ignore[attr-defined]
command("node", "run a department node: validate its data, then join the coordinator's SuperLink")(node_cmd)
