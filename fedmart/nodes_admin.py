"""``fedmart nodes``: register, list and unregister node keys on a running coordinator's SuperLink.

:func:`register_node_keys` is also how ``fedmart coordinate`` registers ``deploy.node_keys`` at start.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedmart.cli import command
from fedmart.errors import UserError, exit_on_user_error
from fedmart.supervise import CONNECTION, flwr_cli

__all__ = ["nodes_cmd", "register_node_keys"]


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
        proc = flwr_cli(["supernode", "register", str(pub), CONNECTION, "--name", pub.stem], home)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0:
            return pub.stem, "registered"
        if "already in use" in out:
            return pub.stem, "already registered"
        raise UserError(f"could not register {pub}: {' '.join(out.split())[-300:]}")

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(pubs)))) as pool:
        return dict(pool.map(one, pubs))


# --- fedmart nodes ------------------------------------------------------------------------------


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
    from fedmart.console import console

    home = args.run / "flwr" / "home"
    if not (home / "config.toml").is_file():
        raise UserError(f"{args.run}: no coordinator there (no flwr/home/config.toml); pass the run directory")
    if args.nodes_cmd == "register":
        for name, status in register_node_keys(home, list(args.pub)).items():
            console.print(f"{name}: {status}")
        return 0
    if args.nodes_cmd == "list":
        proc = flwr_cli(["supernode", "list", CONNECTION, "--format", "json"], home)
    else:
        proc = flwr_cli(["supernode", "unregister", args.node_id, CONNECTION], home)
    if proc.returncode != 0:
        raise UserError(" ".join((proc.stdout + proc.stderr).split())[-300:] or "flwr failed")
    console.print(proc.stdout.strip(), markup=False, highlight=False, soft_wrap=True)
    return 0


nodes_cmd.add_arguments = _nodes_args  # type: ignore[attr-defined]
command("nodes", "register, list and unregister node keys on a running coordinator")(nodes_cmd)
