"""The Fleet gate's routing (fedmart/fleet_gate.py), in process: what is refused never leaves the gate.

The real-process test with a SuperLink and a SuperNode is tests/federation/test_fleet_gate.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fedmart.fleet_gate import FLEET_ROUTES, create_gate
from privacy.pki import ensure_pki

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture
def gate(tmp_path):
    layout = ensure_pki(tmp_path / "certs").layout
    with TestClient(create_gate("127.0.0.1:1", layout.ca_cert)) as client:  # nothing listens upstream
        yield client


def test_the_fleet_routes_are_the_twelve_a_supernode_calls():
    from flwr.supernode import fleet_http_client

    source = Path(fleet_http_client.__file__).read_text()  # Flower's own client, read as text
    called = {line.split('"')[1] for line in source.splitlines() if 'path="/v1/fleet/' in line}
    assert called == set(FLEET_ROUTES)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/stop-run"),
        ("POST", "/v1/runtime/pull-task-input"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet/pull-messages/"),
        ("GET", "/v1/fleet/pull-messages"),
        ("PUT", "/v1/fleet/push-messages"),
        ("GET", "/health"),
        ("GET", "/openapi.json"),
    ],
)
def test_anything_but_a_fleet_post_is_refused_at_the_gate(gate, method, path, caplog):
    r = gate.request(method, path, content=b"x")

    assert r.status_code == 403 and "only Flower's Fleet API" in r.text
    assert f"refused {method}" in caplog.text


def test_a_fleet_post_goes_upstream(gate):
    r = gate.post("/v1/fleet/pull-messages", content=b"")

    assert r.status_code == 502 and "not reachable" in r.text  # it tried: the SuperLink is the one that is missing


def test_an_oversized_body_is_refused_before_it_is_read(gate):
    r = gate.post("/v1/fleet/push-object", content=b"", headers={"content-length": str(1 << 40)})

    assert r.status_code == 413


def test_a_node_joining_or_leaving_is_logged_with_its_key_fingerprint(gate, tmp_path, caplog):
    import logging
    from base64 import b64encode

    from cryptography.hazmat.primitives import serialization

    from fedmart.node_keys import make_node_keys
    from privacy.pki import load_node_public_key

    caplog.set_level(logging.INFO, logger="fedmart.fleet_gate")
    keys = make_node_keys(tmp_path / "keys", "books")
    pem = load_node_public_key(keys.pub.read_bytes()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )  # what Flower's SuperNode sends with every signed Fleet request

    gate.post("/v1/fleet/activate-node", content=b"", headers={"flwr-public-key": b64encode(pem).decode()})
    gate.post("/v1/fleet/pull-messages", content=b"", headers={"flwr-public-key": b64encode(pem).decode()})

    joined = [r.getMessage() for r in caplog.records if "node key" in r.getMessage()]
    assert joined == [f"activate-node: node key {keys.fingerprint} from testclient: HTTP 502"]  # not per poll
