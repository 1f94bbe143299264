"""``fedmart certs``: the deployment's CA, the coordinator's TLS certificate, and node authentication keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmart.cli import command
from fedmart.errors import UserError, exit_on_user_error

__all__ = ["certs_cmd"]


def _certs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="directory to write (created 0700)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--nodes", type=int, default=0, help="N node key pairs named node-1..node-N")
    g.add_argument("--node-names", default="", help="comma-separated node names (e.g. toys,books,garden)")
    p.add_argument(
        "--hosts",
        default="127.0.0.1,localhost",
        help="comma-separated names nodes reach the coordinator by (the TLS certificate's SAN; 127.0.0.1 is added)",
    )
    p.add_argument("--nodes-only", action="store_true", help="write node key pairs only (on a department's machine)")


@exit_on_user_error
def certs_cmd(args: argparse.Namespace) -> int:
    from rich.table import Table

    from fedmart.console import console
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
    _roster_keys(args.out, names, with_roster=not args.nodes_only)
    return 0


def _roster_keys(out: Path, names: list[str], *, with_roster: bool) -> None:
    """Each node's secure-aggregation roster key beside its auth key, and (with the CA) the roster of all of them.

    A department that makes its own keys (``--nodes-only``) sends ``nodes/NAME.roster.key.pub``
    along with ``NAME.pub``; ``fedmart roster make`` then writes the roster (docs/secagg.md).
    """
    from fedmart.console import console
    from privacy.secagg.roster import make_roster
    from privacy.signing import key_fingerprint, load_or_create_keypair

    for name in names:
        _, public = load_or_create_keypair(out / "nodes" / f"{name}.roster.key")
        console.print(f"nodes/{name}.roster.key: secure-aggregation roster key {key_fingerprint(public)}")
    pubs = sorted((out / "nodes").glob("*.roster.key.pub"))
    if with_roster and len(pubs) >= 2:
        from privacy.signing import load_public_key

        roster = make_roster((p.name.removesuffix(".roster.key.pub"), load_public_key(p)) for p in pubs)
        roster.save(out / "roster.json")
        console.print(f"roster.json: {len(roster)} members, digest {roster.digest}: give to every node (--roster)")


certs_cmd.add_arguments = _certs_args  # type: ignore[attr-defined]
command("certs", "create the deployment's CA, the coordinator's TLS certificate and node auth keys")(certs_cmd)
