"""``fedmart roster``: the secure-aggregation roster, the trust anchor of the active-adversary mode.

Each department makes its own key on its own machine and sends only the ``.pub``::

    fedmart roster key --out keys/roster.key            # prints its fingerprint
    fedmart roster make --out roster.json toys=toys.pub books=books.pub garden=garden.pub
    fedmart roster show roster.json                      # members, fingerprints, digest

``roster.json`` then reaches every node out of band (as ``ca.pem`` does); each operator checks
the digest ``show`` prints against the one the federation agreed on, and starts its node with
``fedmart node --roster roster.json --roster-key keys/roster.key``. The coordinator never sends
it, so it cannot add a member or swap a key (docs/secagg.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmart.cli import command
from fedmart.errors import UserError, exit_on_user_error

__all__ = ["roster_cmd"]


def _roster_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="roster_cmd", required=True)
    k = sub.add_parser("key", help="make this department's roster key (Ed25519, 0600) and its .pub")
    k.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("make", help="write a roster from the members' public keys")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("members", nargs="+", metavar="NAME=PUB", help="a member's name and its .pub file")
    s = sub.add_parser("show", help="a roster's members, fingerprints and digest")
    s.add_argument("roster", type=Path)


@exit_on_user_error
def roster_cmd(args: argparse.Namespace) -> int:
    from fedmart.console import console
    from privacy.secagg.roster import Roster, RosterError, make_roster
    from privacy.signing import KeyFileError, key_fingerprint, load_or_create_keypair, load_public_key

    try:
        if args.roster_cmd == "key":
            existed = args.out.exists()
            _, public = load_or_create_keypair(args.out)
            verb = "kept" if existed else "created"
            console.print(f"{verb} {args.out} (fingerprint {key_fingerprint(public)}); send {args.out}.pub only")
            return 0
        if args.roster_cmd == "make":
            pairs = [m.split("=", 1) for m in args.members]
            if any(len(p) != 2 or not p[0] for p in pairs):
                raise UserError("members are NAME=PUBFILE")
            roster = make_roster((name, load_public_key(pub)) for name, pub in pairs)
            roster.save(args.out)
        else:
            roster = Roster.load(args.roster)
    except (RosterError, KeyFileError) as exc:
        raise UserError(str(exc)) from exc
    for member in roster.members:
        console.print(f"{member.name}: {member.fingerprint}")
    console.print(f"{len(roster)} members, digest {roster.digest}: compare it out of band with every node")
    return 0


roster_cmd.add_arguments = _roster_args  # type: ignore[attr-defined]
command("roster", "make and show the secure-aggregation roster (each department's own key)")(roster_cmd)
