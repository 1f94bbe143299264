"""`fedmart nodes` tells nodes apart (issue 17): by the name they were registered under and their full key
fingerprint, register prints the node id, unregister takes a name or an id, and a coordinator that is not
running is one line and exit code 2 (not Flower's JSON with exit code 0).

The integration test runs a real ``flower-superlink`` (TLS, node auth) on loopback, as ``fedmart coordinate``
starts it, and drives it with ``fedmart nodes`` in this process; nothing else of a federation runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmart.cli import main as cli_main
from fedmart.errors import UserError
from fedmart.nodes_admin import NodeRow, register_node_keys, resolve_node
from fedmart.supervise import free_port, write_flwr_config
from privacy.pki import ensure_pki, ssh_fingerprint


def main(argv: list[str]) -> int:
    """`fedmart ARGV` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    return int(exit_.value.code or 0)


def _row(name: str, node_id: int, status: str = "online") -> NodeRow:
    return NodeRow(name, node_id, status, f"SHA256:{name}{node_id}", "", "t0", "", "")


def test_a_node_is_found_by_name_then_by_id_and_never_guessed() -> None:
    rows = [_row("books", 11), _row("toys", 12), _row("garden", 13, "unregistered"), _row("42", 14)]

    assert resolve_node(rows, "books").node_id == 11
    assert resolve_node(rows, "12").name == "toys"
    assert resolve_node(rows, "42").node_id == 14  # a name wins over an id
    with pytest.raises(UserError, match="no registered node is named or numbered 'garden'"):
        resolve_node(rows, "garden")  # already unregistered
    with pytest.raises(UserError, match="2 registered nodes are named books: node id 11 .* node id 21 .*pass the"):
        resolve_node([*rows, _row("books", 21, "registered")], "books")  # a rotated key under the same name


def test_keys_are_checked_and_named_before_any_is_registered(tmp_path) -> None:
    class Refuse:
        def register(self, pub, name):  # pragma: no cover - must not be reached
            raise AssertionError("registered before every file was checked")

    (tmp_path / "books.pub").write_text("not a key\n")
    with pytest.raises(UserError, match="books.pub: not an OpenSSH public key"):
        register_node_keys(Refuse(), [tmp_path / "books.pub"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="two keys would be registered as books"):
        register_node_keys(Refuse(), [tmp_path / "a" / "books.pub", tmp_path / "b" / "books.pub"])
    with pytest.raises(UserError, match="rename the file NAME.pub"):
        register_node_keys(Refuse(), [tmp_path / "-bad.pub"])


def test_a_stopped_coordinator_is_one_line_and_exit_code_2(tmp_path, capsys) -> None:
    certs = ensure_pki(tmp_path / "certs").layout
    run = tmp_path / "outputs" / "run"
    write_flwr_config(run / "flwr" / "home", f"127.0.0.1:{free_port()}", certs.ca_cert)  # nothing listens there

    for argv in (["list"], ["list", "--format", "json"], ["unregister", "books"]):
        assert main(["nodes", "--run", str(run), *argv]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, (out, err)
        assert err.startswith("fedmart: error: no coordinator answers at https://127.0.0.1:")
        assert f"fedmart coordinate resume={run}" in err
    assert main(["nodes", "--run", str(tmp_path), "list"]) == 2
    assert "no coordinator there" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_register_list_unregister_against_a_real_superlink(tmp_path, capsys, monkeypatch) -> None:
    from fedmart.coordinate import superlink_argv
    from fedmart.node_keys import make_node_keys
    from fedmart.supervise import Child, flwr_env, wait_for_port

    monkeypatch.setenv("COLUMNS", "80")  # the fingerprints must not be cut at 80 columns
    layout = ensure_pki(tmp_path / "certs").layout
    for name in ("books", "toys"):  # each department's own keys, sent to the coordinator as NAME.pub
        make_node_keys(tmp_path / "from-departments", name)
    pubs = {n: tmp_path / "from-departments" / f"{n}.pub" for n in ("books", "toys")}
    fingerprints = {n: ssh_fingerprint(p.read_bytes()) for n, p in pubs.items()}
    port = free_port()
    run = tmp_path / "outputs" / "run"
    home = run / "flwr" / "home"
    write_flwr_config(home, f"127.0.0.1:{port}", layout.ca_cert)
    argv = superlink_argv(certs=layout.root, host="127.0.0.1", port=port, database=tmp_path / "state.db",
                          isolation="subprocess")  # fmt: skip
    link = Child("flower-superlink", argv, env=flwr_env(home), cwd=tmp_path, log_path=tmp_path / "superlink.log")
    try:
        assert wait_for_port("127.0.0.1", port, 120, link.alive), link.tail()
        nodes = ["nodes", "--run", str(run)]

        assert main([*nodes, "register", str(pubs["books"]), str(pubs["toys"])]) == 0
        out = capsys.readouterr().out
        for name in ("books", "toys"):
            line = next(ln for ln in out.splitlines() if ln.startswith(f"{name}: registered, node id "))
            assert line.endswith(f"key {fingerprints[name]}"), out

        assert main([*nodes, "register", str(pubs["books"])]) == 0  # again: fine, and says which node it is
        again = capsys.readouterr().out
        assert again.startswith("books: already registered, node id ") and fingerprints["books"] in again

        assert main([*nodes, "list"]) == 0
        text = capsys.readouterr().out
        for name in ("books", "toys"):  # one field per line, the whole fingerprint on its own line
            assert f"{name}: registered" in text
            assert f"  fingerprint  {fingerprints[name]}\n" in text, text
        assert main([*nodes, "list", "--format", "json"]) == 0
        listed = json.loads(capsys.readouterr().out)["nodes"]
        assert {n["name"]: n["fingerprint"] for n in listed} == fingerprints
        ids = {n["name"]: n["node-id"] for n in listed}
        assert again.startswith(f"books: already registered, node id {ids['books']},")
        assert all(n["public-key"] == pubs[n["name"]].read_text().strip() for n in listed)

        assert main([*nodes, "unregister", "books"]) == 0  # by name
        assert capsys.readouterr().out.startswith(f"books: unregistered, node id {ids['books']}, key ")
        assert main([*nodes, "unregister", str(ids["toys"])]) == 0  # by id
        capsys.readouterr()
        assert main([*nodes, "list", "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["nodes"] == []
        assert main([*nodes, "list", "--all", "--format", "json"]) == 0
        assert {n["status"] for n in json.loads(capsys.readouterr().out)["nodes"]} == {"unregistered"}
        assert main([*nodes, "unregister", "books"]) == 2
        assert "no registered node is named or numbered 'books'" in capsys.readouterr().err
    finally:
        link.stop()
    assert main(["nodes", "--run", str(run), "list"]) == 2  # the coordinator is gone now
    assert "no coordinator answers" in capsys.readouterr().err
    assert Path(run).is_dir()
