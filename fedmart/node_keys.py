"""``fedmart node keygen``: a department makes its own node keys, on its own machine.

One key-ownership story for the whole federation: every private key is made where it is used
and never travels. A department runs::

    fedmart node keygen --name books --out keys

which writes, in ``keys/`` (0700), its two key pairs and prints what to send:

* ``books.key`` (0600) / ``books.pub``: the node's authentication key (ECDSA P-384, OpenSSH), with
  which its SuperNode signs every Fleet request; the coordinator registers ``books.pub`` under the
  name ``books`` (``fedmart nodes register``, or ``deploy.node_keys`` at start);
* ``books.roster.key`` (0600) / ``books.roster.key.pub``: its secure-aggregation roster key
  (Ed25519, docs/secagg.md); ``books.roster.key.pub`` goes into the federation's roster.

It prints both fingerprints in full, to be read out to the coordinator over a second channel,
who compares them with ``fedmart nodes list`` and ``fedmart roster show``. Running it again keeps
the keys (and prints the same fingerprints). ``fedmart certs --node-keys`` uses the same function
for demos and tests on one machine (:func:`make_node_keys`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from fedmart.cli import command
from fedmart.errors import UserError, exit_on_user_error

__all__ = ["NodeKeys", "make_node_keys", "node_keygen_cmd"]


@dataclass
class NodeKeys:
    """A node's two key pairs in one directory, and what making them did."""

    name: str
    key: Path  # NAME.key: authentication (OpenSSH, ECDSA P-384)
    pub: Path
    roster_key: Path  # NAME.roster.key: secure-aggregation roster (Ed25519)
    roster_pub: Path
    fingerprint: str = ""  # SHA256:... of the authentication key (as ssh-keygen -lf prints it)
    public_line: str = ""  # the OpenSSH public key line
    roster_fingerprint: str = ""
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What the command prints: one field per line, nothing cut (the fingerprints are read out)."""
        verb = {True: "created", False: "kept"}
        return [
            f"node {self.name}: keys in {self.key.parent}",
            f"  {verb[self.key in self.created]} {self.key} (private, 0600: never leaves this machine)",
            f"  {verb[self.pub in self.created]} {self.pub} (send it to the coordinator)",
            f"  node key fingerprint    {self.fingerprint}",
            f"  node public key         {self.public_line}",
            f"  {verb[self.roster_key in self.created]} {self.roster_key} (private, 0600)",
            f"  {verb[self.roster_pub in self.created]} {self.roster_pub} (send it to whoever assembles the roster)",
            f"  roster key fingerprint  {self.roster_fingerprint}",
            f"send {self.pub.name} and {self.roster_pub.name} only, and read both fingerprints to the coordinator "
            "over a second channel (phone, ticket); start the node with "
            f"--auth-key {self.key} (the roster key beside it is found by name)",
        ]


def make_node_keys(out: Path, name: str) -> NodeKeys:
    """``out/NAME.key`` + ``.pub`` and ``out/NAME.roster.key`` + ``.pub``: kept if there, else made."""
    from privacy.pki import PkiError, ensure_node_keypair, ssh_fingerprint, valid_node_name
    from privacy.signing import KeyFileError, key_fingerprint, load_or_create_keypair

    try:
        valid_node_name(name)
    except ValueError as exc:
        raise UserError(f"--name {name}: {exc}") from exc
    keys = NodeKeys(
        name=name,
        key=out / f"{name}.key",
        pub=out / f"{name}.pub",
        roster_key=out / f"{name}.roster.key",
        roster_pub=out / f"{name}.roster.key.pub",
    )
    try:
        keys.created, keys.kept = ensure_node_keypair(keys.key, keys.pub, name)
        existed = keys.roster_key.exists()
        _, roster_public = load_or_create_keypair(keys.roster_key)
    except (PkiError, KeyFileError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    (keys.kept if existed else keys.created).extend([keys.roster_key, keys.roster_pub])
    line = keys.pub.read_bytes()
    keys.fingerprint, keys.public_line = ssh_fingerprint(line), line.decode().strip()
    keys.roster_fingerprint = key_fingerprint(roster_public)
    return keys


def _keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="this node's name in the federation (e.g. books)")
    p.add_argument(
        "--out", type=Path, default=Path("keys"), help="directory for the keys (created 0700; default: keys)"
    )


@exit_on_user_error
def node_keygen_cmd(args: argparse.Namespace) -> int:
    from fedmart.console import console

    keys = make_node_keys(args.out, args.name)
    console.print("\n".join(keys.lines()), markup=False, highlight=False, soft_wrap=True)
    return 0


node_keygen_cmd.add_arguments = _keygen_args  # type: ignore[attr-defined]
command("node-keygen", "make this node's own keys (also spelt `fedmart node keygen`)")(node_keygen_cmd)
