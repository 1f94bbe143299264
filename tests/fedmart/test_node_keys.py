"""One key-ownership story (issue 17): each department makes its own keys with `fedmart node keygen`, and
`fedmart certs` makes no node private key unless asked (`--node-keys`, demos and tests)."""

from __future__ import annotations

import argparse
import stat

import pytest

from fedmart.cli import main as cli_main
from fedmart.node_cmd import _check_roster
from privacy.pki import load_node_private_key, ssh_fingerprint
from privacy.policy import NodePolicy
from privacy.secagg.roster import Roster
from privacy.signing import key_fingerprint, load_keypair


def main(argv: list[str]) -> int:
    """`fedmart ARGV` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    return int(exit_.value.code or 0)


def test_node_keygen_writes_the_nodes_own_pairs_and_prints_full_fingerprints(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    keys = tmp_path / "keys"

    assert main(["node", "keygen", "--name", "books", "--out", str(keys)]) == 0

    out = capsys.readouterr().out
    made = sorted(p.name for p in keys.iterdir())
    assert made == ["books.key", "books.pub", "books.roster.key", "books.roster.key.pub"]
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in keys.glob("*.key")} == {
        "books.key": 0o600,
        "books.roster.key": 0o600,
    }
    load_node_private_key((keys / "books.key").read_bytes())  # what flower-supernode loads
    fingerprint = ssh_fingerprint((keys / "books.pub").read_bytes())
    roster_fp = key_fingerprint(load_keypair(keys / "books.roster.key")[1])
    assert f"  node key fingerprint    {fingerprint}\n" in out  # whole, on its own line
    assert f"  node public key         {(keys / 'books.pub').read_text().strip()}\n" in out
    assert f"  roster key fingerprint  {roster_fp}\n" in out
    assert "send books.pub and books.roster.key.pub only" in out

    assert main(["node", "keygen", "--name", "books", "--out", str(keys)]) == 0  # again: kept, same keys
    again = capsys.readouterr().out
    assert "created" not in again and fingerprint in again and roster_fp in again
    assert main(["node", "keygen", "--name", "my books", "--out", str(keys)]) == 2
    assert "fedmart: error: --name my books:" in capsys.readouterr().err


def test_certs_makes_no_node_key_unless_asked_and_assembles_the_departments_roster(tmp_path, capsys) -> None:
    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs)]) == 0
    assert sorted(p.name for p in certs.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]

    # The departments' own keys; only their .pub files reach the coordinator.
    for name in ("toys", "books", "garden"):
        assert main(["node", "keygen", "--name", name, "--out", str(tmp_path / name)]) == 0
        (certs / "nodes").mkdir(exist_ok=True)
        for pub in (f"{name}.pub", f"{name}.roster.key.pub"):
            (certs / "nodes" / pub).write_bytes((tmp_path / name / pub).read_bytes())
    capsys.readouterr()
    assert main(["certs", "--out", str(certs)]) == 0

    assert not list(certs.glob("nodes/*.key")), "certs made a node private key"
    assert [m.name for m in Roster.load(certs / "roster.json").members] == ["books", "garden", "toys"]
    # The department starts its node with the key it made; the roster key beside it is found by name.
    node = argparse.Namespace(roster=None, roster_key=None, root_cert=certs / "ca.pem",
                              auth_key=tmp_path / "books" / "books.key")  # fmt: skip
    entries = _check_roster(node, NodePolicy(), tmp_path / "books-data")
    assert entries["roster-key"] == str((tmp_path / "books" / "books.roster.key").resolve())


def test_certs_node_keys_for_demos_and_the_old_flags_name_their_replacement(tmp_path, capsys) -> None:
    assert main(["certs", "--out", str(tmp_path / "demo"), "--node-keys", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "demo" / "nodes").glob("*.key")) == [
        "node-1.key",
        "node-1.roster.key",
        "node-2.key",
        "node-2.roster.key",
    ]
    assert "for a demo or a test" in capsys.readouterr().out
    for old in (["--nodes", "3"], ["--node-names", "a,b"], ["--node-names", "a", "--nodes-only"]):
        assert main(["certs", "--out", str(tmp_path / "old"), *old]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "fedmart node keygen --name NAME" in err and "--node-keys" in err
    assert not (tmp_path / "old").exists()
