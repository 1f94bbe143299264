"""The roster (privacy/secagg/roster.py), the node's identity and its seen sessions (seen_sessions.py)."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.secagg.identity import NodeIdentity, in_memory_identities
from privacy.secagg.roster import Roster, RosterError, RosterKey, make_roster
from privacy.secagg.seen_sessions import SeenSessions
from privacy.secagg.statements import channel_statement, keys_statement, session_id, survivors_statement
from privacy.signing import load_or_create_keypair


def _roster(n: int = 3) -> tuple[Roster, dict[str, Ed25519PrivateKey]]:
    keys = {f"dept-{i}": Ed25519PrivateKey.generate() for i in range(n)}
    return make_roster((name, k.public_key()) for name, k in keys.items()), keys


def test_a_roster_round_trips_through_its_file_with_a_stable_digest(tmp_path) -> None:
    roster, keys = _roster()

    loaded = Roster.load(roster.save(tmp_path / "roster.json"))

    assert loaded == roster and loaded.digest == roster.digest and len(loaded) == 3
    k = keys["dept-1"]
    fp = RosterKey(k).fingerprint
    assert loaded.verify(fp, b"data", k.sign(b"data"))
    assert not loaded.verify(fp, b"other", k.sign(b"data"))
    assert not loaded.verify("0" * 16, b"data", k.sign(b"data"))


def test_a_tampered_roster_is_refused(tmp_path) -> None:
    roster, _ = _roster()
    path = roster.save(tmp_path / "roster.json")
    body = json.loads(path.read_text())
    body["members"][0]["public_key"] = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    path.write_text(json.dumps(body))

    with pytest.raises(RosterError, match="fingerprint .* is not its key's"):
        Roster.load(path)
    with pytest.raises(RosterError, match="cannot be read"):
        Roster.load(tmp_path / "missing.json")
    with pytest.raises(RosterError, match="distinct"):
        Roster((roster.members[0], roster.members[0]))
    with pytest.raises(RosterError, match="at least 2 members"):
        Roster(roster.members[:1])


def test_a_node_key_must_be_a_member_of_its_roster(tmp_path) -> None:
    roster, _ = _roster()
    load_or_create_keypair(tmp_path / "keys" / "stranger.key")
    roster.save(tmp_path / "roster.json")

    with pytest.raises(RosterError, match="is not in the roster"):
        NodeIdentity.load(tmp_path / "roster.json", tmp_path / "keys" / "stranger.key", state_dir=tmp_path)


def test_seen_sessions_persist_and_are_pruned(tmp_path) -> None:
    seen = SeenSessions(tmp_path, keep=3)
    for i in range(5):
        seen.add(bytes([i]) * 16)

    again = SeenSessions(tmp_path, keep=3)  # a restarted node

    assert [bytes([i]) * 16 in again for i in range(5)] == [False, False, True, True, True]
    assert oct((tmp_path / "secagg-seen.json").stat().st_mode & 0o777) == "0o600"


def test_statements_are_distinct_by_kind_and_by_every_field() -> None:
    ids = in_memory_identities([1, 2])
    fp = ids[1].fingerprint
    members = {1: (fp, b"n" * 16), 2: (ids[2].fingerprint, b"m" * 16)}
    sid = session_id(b"s" * 16, 1, members)

    statements = {
        channel_statement(fp, b"k" * 32),
        keys_statement(b"s" * 16, 1, 1, fp, b"k" * 32, b"p" * 32, b"c" * 32, b"n" * 16),
        survivors_statement(sid, [1, 2]),
        survivors_statement(sid, [1]),
        survivors_statement(session_id(b"s" * 16, 2, members), [1, 2]),
        survivors_statement(session_id(b"s" * 16, 1, {**members, 2: (members[2][0], b"x" * 16)}), [1, 2]),
    }

    assert len(statements) == 6
    assert ids[1].verify_channel(ids[1].channel_cert(b"k" * 32), b"k" * 32)
    assert not ids[2].verify_channel(ids[1].channel_cert(b"k" * 32), b"j" * 32)
