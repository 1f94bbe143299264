"""``fedmart certs``: the deployment's CA and the coordinator's TLS certificate; node keys only when asked.

Node private keys are the departments' own: each makes its pair on its own machine with
``fedmart node keygen`` and sends only the ``.pub`` files (:mod:`fedmart.node_keys`). ``certs``
makes none unless asked with ``--node-keys`` (a demo or a test with every node on one machine).
Roster public keys found in ``OUT/nodes/`` (``NAME.roster.key.pub``, as the departments sent
them) are assembled into ``OUT/roster.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmart.cli import command
from fedmart.errors import UserError, exit_on_user_error

__all__ = ["certs_cmd", "parse_node_keys"]

_GONE = {  # flags of the time certs made node keys by default; each now names what replaces it
    "nodes": "--nodes",
    "node_names": "--node-names",
    "nodes_only": "--nodes-only",
}


def _certs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="directory to write (created 0700)")
    p.add_argument(
        "--hosts",
        default="127.0.0.1,localhost",
        help="comma-separated names nodes reach the coordinator by (the TLS certificate's SAN; 127.0.0.1 is added)",
    )
    p.add_argument(
        "--node-keys",
        default="",
        metavar="N|NAMES",
        help="demos and tests only: also make node key pairs here, N of them (node-1..node-N) or named "
        "(books,toys). In a deployment each department makes its own: fedmart node keygen",
    )
    for dest, flag in _GONE.items():  # refused with the replacement, not an argparse usage error
        p.add_argument(flag, dest=dest, default=None, nargs="?", const=True, help=argparse.SUPPRESS)


def parse_node_keys(spec: str) -> list[str]:
    """``--node-keys``: a count N (node-1..node-N) or comma-separated names; empty: none."""
    spec = spec.strip()
    if not spec:
        return []
    if spec.isdigit():
        n = int(spec)
        if n < 1:
            raise UserError("--node-keys N must be >= 1 (or leave it out: departments make their own keys)")
        return [f"node-{i}" for i in range(1, n + 1)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise UserError(f"--node-keys {spec}: a name appears twice")
    return names


@exit_on_user_error
def certs_cmd(args: argparse.Namespace) -> int:
    from rich.table import Table

    from fedmart.console import console
    from fedmart.node_keys import make_node_keys
    from privacy.pki import PkiError, ensure_pki

    used = [flag for dest, flag in _GONE.items() if getattr(args, dest) is not None]
    if used:
        raise UserError(
            f"{used[0]} is gone: each department makes its own node keys on its own machine (fedmart node keygen "
            "--name NAME) and sends the .pub files; for a demo or a test on one machine, fedmart certs --node-keys "
            "N or --node-keys a,b,c makes them here"
        )
    names = parse_node_keys(args.node_keys)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        report = ensure_pki(args.out, hosts=hosts)
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
        t.add_row(str(rel), "[green]created[/]" if path in created else "kept", what.get(path.name, ""))
    console.print(t)
    for note in report.notes:
        console.print(f"[yellow]{note}[/]")
    if names:
        console.print(
            f"--node-keys: making {len(names)} nodes' private keys HERE, for a demo or a test; in a deployment each "
            "department makes its own (fedmart node keygen)",
            style="yellow",
            highlight=False,
        )
        for name in names:
            keys = make_node_keys(report.layout.nodes, name)
            console.print("\n".join(keys.lines()[:-1]), markup=False, highlight=False, soft_wrap=True)
    _roster(args.out)
    return 0


def _roster(out: Path) -> None:
    """The roster of every ``nodes/NAME.roster.key.pub`` (departments' own, or ``--node-keys``), if two or more."""
    from fedmart.console import console
    from privacy.secagg.roster import RosterError, make_roster
    from privacy.signing import KeyFileError, load_public_key

    pubs = sorted((out / "nodes").glob("*.roster.key.pub"))
    if len(pubs) < 2:
        return
    try:
        roster = make_roster((p.name.removesuffix(".roster.key.pub"), load_public_key(p)) for p in pubs)
    except (RosterError, KeyFileError) as exc:
        raise UserError(f"{out / 'nodes'}: {exc}") from exc
    roster.save(out / "roster.json")
    console.print(
        f"roster.json: {len(roster)} members, digest {roster.digest}: give to every node (--roster)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


certs_cmd.add_arguments = _certs_args  # type: ignore[attr-defined]
command("certs", "create the deployment's CA and the coordinator's TLS certificate (node keys: fedmart node keygen)")(
    certs_cmd
)
