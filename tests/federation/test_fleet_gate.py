"""Only nodes' traffic reaches the coordinator's node-facing port (issue 14, item 2), with real processes.

``fedmart coordinate``'s own :func:`fedmart.coordinate.start_link` starts ``flower-superlink`` on
loopback and the Fleet gate (``fedmart/fleet_gate.py``) on the node-facing port; the coordinator
registers one node key over loopback, as ``fedmart coordinate`` does. A real ``flower-supernode``
with that key joins through the gate (so the Fleet API passes), and then, from the node's side of
the gate, Flower's own ``flwr`` CLI tries to register another key, submit a run and stop a run:
each is refused at the gate, and the SuperLink (asked over loopback) still has one node and no run.
No federation is run: the refusals need none.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import tomli_w

from conf.deploy_settings import DeploySettings
from fedmart.coordinate import Deployment, start_link
from fedmart.nodes_admin import ControlClient, register_node_keys
from fedmart.staging import stage_app
from fedmart.supervise import Child, flwr_cli, flwr_env, free_port
from privacy.pki import ensure_pki

pytestmark = [pytest.mark.slow, pytest.mark.integration]

COORDINATOR, NODE_SIDE = "fedmart", "through-gate"  # the two connections in the flwr CLI's config


def _flwr_home(home: Path, deploy: Deployment) -> None:
    ca = str(deploy.certs / "ca.pem")
    doc = {
        "superlink": {
            "default": COORDINATOR,
            COORDINATOR: {"address": deploy.control_address, "root-certificates": ca},
            NODE_SIDE: {"address": deploy.node_address, "root-certificates": ca},
        }
    }
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(doc))


def _nodes(home: Path) -> list[dict]:
    proc = flwr_cli(["supernode", "list", COORDINATOR, "--format", "json"], home, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)["nodes"]


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    base = tmp_path_factory.mktemp("gate")
    ensure_pki(base / "certs", node_names=["dept", "sybil"], hosts=["localhost"])  # 127.0.0.1 is added
    settings = DeploySettings(
        certs=str(base / "certs"),
        port=free_port(),
        control_port=free_port(),
        database=str(base / "state.db"),
        startup_timeout=180,
    )
    deploy = Deployment.from_settings(settings)
    flwr_dir, home = base / "flwr", base / "flwr" / "home"
    _flwr_home(home, deploy)
    with start_link(deploy, flwr_dir, home):
        with ControlClient.from_home(home, where=str(base)) as control:
            registered = register_node_keys(control, [deploy.certs / "nodes" / "dept.pub"])
        node = Child(
            "flower-supernode",
            [
                "flower-supernode",
                "--superlink",
                deploy.node_address,
                "--root-certificates",
                str(deploy.certs / "ca.pem"),
                "--auth-supernode-private-key",
                str(deploy.certs / "nodes" / "dept.key"),
                "--isolation",
                "subprocess",
                "--port",
                str(free_port()),
            ],  # fmt: skip
            env=flwr_env(base / "node-home"),
            cwd=base,
            log_path=base / "supernode.log",
        )
        try:
            yield base, deploy, home, registered, node
        finally:
            node.stop()


def test_a_registered_node_joins_through_the_gate(link):
    _, _, home, registered, node = link
    # over loopback: the coordinator's own Control API
    assert [(r.name, r.status) for r in registered] == [("dept", "registered")] and registered[0].node_id

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not [n for n in _nodes(home) if n["status"] == "online"]:
        assert node.alive(), node.tail()
        time.sleep(1.0)

    nodes = _nodes(home)
    assert [n["status"] for n in nodes] == ["online"], (nodes, node.tail())


def test_the_node_cannot_register_a_key_submit_a_run_or_stop_one(link):
    base, deploy, home, _, _ = link
    app = stage_app(base / "app", {})
    attempts = {
        "register a key": ["supernode", "register", str(deploy.certs / "nodes" / "sybil.pub"), NODE_SIDE],
        "submit a run": ["run", str(app), NODE_SIDE],
        "stop a run": ["stop", "1", NODE_SIDE],
        "list runs": ["ls", NODE_SIDE],
    }
    env = flwr_env(home)
    for what, args in attempts.items():
        proc = subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0, f"the node could {what}: {proc.stdout}{proc.stderr}"

    gate_log = (base / "flwr" / "fleet-gate.log").read_text()
    for route in ("register-node", "start-run", "stop-run", "list-runs"):
        assert f"refused POST /v1/control/{route}" in gate_log, gate_log[-3000:]
    # The SuperLink itself, asked over loopback: still one node, and no run.
    assert len(_nodes(home)) == 1
    runs = flwr_cli(["ls", COORDINATOR, "--format", "json"], home, timeout=120)
    assert runs.returncode == 0 and json.loads(runs.stdout)["runs"] == [], runs.stdout + runs.stderr


def test_only_the_fleet_routes_pass_whatever_the_path_says(link):
    _, deploy, _, _, _ = link
    ca = str(deploy.certs / "ca.pem")
    with httpx.Client(base_url=f"https://{deploy.node_address}", verify=ca, timeout=30) as node_side:
        for method, path in [
            ("POST", "/v1/control/register-node"),
            ("POST", "/v1/runtime/get-nodes"),  # the ServerApp's API: not the nodes' either
            ("POST", "/v1/fleet/../control/start-run"),
            ("POST", "/v1/fleet/pull-messages/../../control/stop-run"),
            ("POST", "/v1/fleet%2F..%2Fcontrol/start-run"),
            ("GET", "/v1/fleet/pull-messages"),
            ("GET", "/docs"),
            ("GET", "/health"),
        ]:
            r = node_side.request(method, path, content=b"\x00")
            assert r.status_code == 403 and "only Flower's Fleet API" in r.text, (method, path, r.status_code)
        # A Fleet route passes to the SuperLink, which answers for itself (no node signature: 401).
        r = node_side.post("/v1/fleet/pull-messages", content=b"", headers={"content-type": "application/protobuf"})
        assert r.status_code != 403, r.text
    with httpx.Client(base_url=f"https://{deploy.control_address}", verify=ca, timeout=30) as loopback:
        assert loopback.get("/health").status_code == 200  # the coordinator's own side still has everything


def test_the_superlink_listens_on_loopback_only(link):
    _, deploy, _, _, _ = link
    port_hex = f":{deploy.control_port:04X}"
    rows = [r.split() for r in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    listening = [r for r in rows if r[1].endswith(port_hex) and r[3] == "0A"]  # state 0A: LISTEN
    assert listening and all(r[1].startswith("0100007F") for r in listening), listening  # 127.0.0.1, not 0.0.0.0
