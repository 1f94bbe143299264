"""``fedmart serve`` cannot be rolled back or misled (serving/snapshot.py, serving/policy.py): a rolled-back,
edited or unsigned promotion, and a version whose signed metadata does not meet ``--require``, are refused,
at start and on reload, while the last good version keeps serving."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from serving.config import ServeError
from serving.engine import Server
from serving.http import create_app

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

DP = {"mode": "target", "secagg": {"enabled": True}, "epsilon_max": 3.0}
PLAIN = {"mode": "off", "secagg": {"enabled": False}, "epsilon_max": None}
REQUIRE = ("dp", "secagg", "epsilon<=8")


@pytest.fixture
def dp_world(tmp_path, support):
    """v1 and v2, both DP under secure aggregation, promoted in that order (#1, #2)."""
    world = support.make_world(tmp_path, num_items=60, promote=False)
    world.versions.clear()
    for seed in (1, 2):
        support.publish(world, seed, privacy=DP)
    return world


def _promotions(world) -> list[str]:
    return (world.registry_path / "promotions.jsonl").read_text().splitlines(keepends=True)


def _serve(world, **kw) -> TestClient:
    return TestClient(create_app(world.serve_config(require=REQUIRE, **kw)))


def test_a_rolled_back_promotions_file_is_refused_and_the_newest_keeps_serving(dp_world):
    v1, v2 = dp_world.versions
    with _serve(dp_world) as client:
        assert client.get("/model").json()["promotion_counter"] == 2
        path = dp_world.registry_path / "promotions.jsonl"
        path.write_text(_promotions(dp_world)[0])  # cut the newest line: v1's #1 is the newest left

        assert client.app.state.server.maybe_reload() is None

        model = client.get("/model").json()
        assert model["version"] == v2 and "#1 is older than #2" in model["refused"][v1]
        assert "rolled back" in model["refused"][v1]


def test_a_restart_does_not_forget_what_it_served(dp_world, tmp_path):
    state = tmp_path / "state" / "serve.json"
    Server(dp_world.serve_config(require=REQUIRE, state=state))
    (dp_world.registry_path / "promotions.jsonl").write_text(_promotions(dp_world)[0])

    with pytest.raises(ServeError, match=r"promotion #1 is older than #2 .*rolled back"):
        Server(dp_world.serve_config(require=REQUIRE, state=state))


@pytest.mark.parametrize("edit", ["counter", "signature", "version"])
def test_an_edited_or_unsigned_promotion_is_refused(dp_world, support, edit):
    v1, v2 = dp_world.versions
    with _serve(dp_world) as client:
        v3 = support.publish(dp_world, 3, privacy=DP)  # promoted #3
        lines = _promotions(dp_world)
        record = json.loads(lines[-1])
        if edit == "counter":
            record["counter"] = 10
        elif edit == "signature":
            del record["signature"]
        else:  # point the signed #3 at another version
            record["version"] = v1
        (dp_world.registry_path / "promotions.jsonl").write_text("".join(lines[:-1]) + json.dumps(record) + "\n")

        assert client.app.state.server.maybe_reload() is None

        model = client.get("/model").json()
        assert model["version"] == v2 and v3 != model["version"]
        reason = model["refused"]["promotions.jsonl line 3"]
        assert ("unsigned" if edit == "signature" else "does not verify") in reason


def test_a_version_without_dp_is_refused_under_require_dp(dp_world, support):
    v2 = dp_world.versions[-1]
    with _serve(dp_world) as client:
        plain = support.publish(dp_world, 3, privacy=PLAIN)  # signed, promoted #3, but not private

        assert client.app.state.server.maybe_reload() is None

        model = client.get("/model").json()
        assert model["version"] == v2 and model["required"] == "dp,secagg,epsilon<=8"
        assert model["refused"][plain].startswith("--require dp: the signed metadata says privacy mode 'off'")


def test_a_version_over_the_epsilon_bound_is_refused_at_start(tmp_path, support):
    world = support.make_world(tmp_path, num_items=60, promote=False)
    world.versions.clear()
    support.publish(world, 1, privacy={**DP, "epsilon_max": 9.5})

    with pytest.raises(ServeError, match="epsilon<=8: the signed metadata records ε 9.5"):
        Server(world.serve_config(require=REQUIRE))
    assert Server(world.serve_config(require=("dp", "epsilon<=10"))).snapshot.version == world.versions[0]


def test_promoting_an_older_version_again_is_a_rollback_the_server_follows(dp_world):
    v1, _ = dp_world.versions
    with _serve(dp_world) as client:
        dp_world.registry.promote(v1, by="operator")  # #3: signed, by the key holder

        assert client.app.state.server.maybe_reload() == v1
        assert client.get("/model").json()["promotion_counter"] == 3


def test_serve_with_a_missing_key_path_is_a_one_line_error(dp_world, tmp_path, capsys):
    from fedmart.cli import main

    argv = ["serve", "--registry", str(dp_world.registry_path), "--catalog", str(dp_world.catalog_path)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--public-key", str(tmp_path / "keys" / "typo.pub"), "--state", str(tmp_path / "s.json")])

    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedmart: error:") and "public key not found" in err


def test_a_cut_and_repromoted_file_serves_neither_promotion(dp_world):
    v1, _ = dp_world.versions
    lines = _promotions(dp_world)
    (dp_world.registry_path / "promotions.jsonl").write_text(lines[0])  # cut to #1 (v1) ...
    dp_world.registry.promote(v1, by="a")  # ... and promoted again: a second #2, naming v1
    (dp_world.registry_path / "promotions.jsonl").write_text("".join(lines) + _promotions(dp_world)[-1])

    with pytest.raises(ServeError, match="carry the same counter 2"):
        Server(dp_world.serve_config(require=REQUIRE))
