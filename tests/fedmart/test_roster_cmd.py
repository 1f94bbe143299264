"""`fedmart roster` (each department's own key, the roster from their .pub files) and `fedmart node`'s check
at join: its roster key must be a member, and an active policy needs a roster at all."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedmart.cli import main as cli_main
from fedmart.errors import UserError
from fedmart.node_cmd import _check_roster
from privacy.policy import NodePolicy
from privacy.secagg.roster import Roster


def main(argv: list[str]) -> int:
    """`fedmart ARGV` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    return int(exit_.value.code or 0)


def _federation(tmp_path: Path, names: list[str]) -> Path:
    for name in names:  # each department on its own machine
        assert main(["roster", "key", "--out", str(tmp_path / name / "roster.key")]) == 0
    pubs = [f"{n}={tmp_path / n / 'roster.key.pub'}" for n in names]
    assert main(["roster", "make", "--out", str(tmp_path / "roster.json"), *pubs]) == 0
    return tmp_path / "roster.json"


def test_roster_make_and_show(tmp_path, capsys) -> None:
    path = _federation(tmp_path, ["toys", "books", "garden"])
    capsys.readouterr()

    assert main(["roster", "show", str(path)]) == 0

    out = capsys.readouterr().out
    roster = Roster.load(path)
    assert [m.name for m in roster.members] == ["books", "garden", "toys"]
    assert roster.digest in out.replace("\n", "") and all(m.fingerprint in out for m in roster.members)
    assert main(["roster", "make", "--out", str(tmp_path / "bad.json"), "toys"]) != 0


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = {"roster": None, "roster_key": None, "root_cert": tmp_path / "ca.pem", "auth_key": tmp_path / "n.key"}
    return argparse.Namespace(**{**base, **kw})


def test_a_node_joins_only_with_a_roster_that_holds_its_key(tmp_path) -> None:
    roster = _federation(tmp_path, ["toys", "books"])
    stranger = tmp_path / "stranger.key"
    main(["roster", "key", "--out", str(stranger)])

    entries = _check_roster(_args(tmp_path, roster=roster, roster_key=tmp_path / "toys" / "roster.key"),
                            NodePolicy(), tmp_path / "data")  # fmt: skip

    assert entries == {"roster": str(roster.resolve()), "roster-key": str((tmp_path / "toys" / "roster.key").resolve())}
    with pytest.raises(UserError, match="is not in the roster"):
        _check_roster(_args(tmp_path, roster=roster, roster_key=stranger), NodePolicy(), tmp_path / "data")
    with pytest.raises(UserError, match="needs the federation's roster: pass --roster and --roster-key"):
        _check_roster(_args(tmp_path), NodePolicy(), tmp_path / "data")
    semi = NodePolicy(secagg_threat_model="semi-honest")
    assert _check_roster(_args(tmp_path), semi, tmp_path / "data") == {"roster": None, "roster-key": None}


def test_certs_default_paths_are_found_beside_the_ca_and_the_auth_key(tmp_path) -> None:
    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--node-keys", "toys,books"]) == 0

    entries = _check_roster(
        _args(tmp_path, root_cert=certs / "ca.pem", auth_key=certs / "nodes" / "toys.key"), NodePolicy(), tmp_path
    )

    assert entries["roster"] == str((certs / "roster.json").resolve())
    assert entries["roster-key"] == str((certs / "nodes" / "toys.roster.key").resolve())
    assert len(Roster.load(certs / "roster.json")) == 2
