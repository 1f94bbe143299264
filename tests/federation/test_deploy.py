"""A real deployment on 127.0.0.1: a SuperLink and department SuperNodes as separate processes,
TLS and SuperNode authentication on, DP-SGD and secure aggregation on, faults injected.

One federation serves every assertion (Flower and torch start slowly on a small CPU):

* ``fedmart certs`` issues the CA, the SuperLink's certificate and four node keys;
* ``fedmart coordinate`` runs 3 rounds with four ``fedmart node`` processes: three healthy
  departments and one whose (test-only) fault makes it emit NaN updates;
* a fifth node with an unregistered key and a sixth with invalid data try to join;
* during round 2 the coordinator's whole process group is SIGKILLed once a node has trained
  that round, and ``fedmart coordinate resume=...`` is started;
* during round 3 one healthy node's process group is SIGKILLed as soon as it starts training.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROUNDS = 3
TINY = [
    "data.synthetic.num_users=300",
    "data.synthetic.num_items=100",
    "data.synthetic.num_departments=4",
    "data.synthetic.num_merchants=6",
    "data.max_len=20",
    "model.hidden=16",
    "model.heads=1",
    "model.layers=1",
    "train.batch_size=32",
    "federation.local_steps=0",
]
DEADLINE = 15 * 60  # the whole scenario; it normally takes 5-7 minutes on a loaded 2-core machine
CLI = [sys.executable, "-m", "fedmart"]


def _prepare_data(base: Path) -> dict[str, Path]:
    """Department silos of a tiny synthetic shop, each in its own directory as Parquet."""
    from clients.datasets import load_dataset
    from clients.partition import partition
    from conf.settings import DataSettings, PartitionSettings, SyntheticSettings

    synthetic = SyntheticSettings(num_users=300, num_items=100, num_departments=4, num_merchants=6, seed=0)
    data = load_dataset(DataSettings(source="synthetic", max_len=20, synthetic=synthetic))
    part = partition(data.interactions, data.catalog, PartitionSettings(scheme="department", seed=0))
    data.catalog.save(base / "catalog.parquet")
    dirs = {}
    for name, rows in zip(part.names, part.rows, strict=True):
        inter = data.interactions.take(rows)
        d = base / "nodes" / "".join(c for c in name.lower() if c.isalnum())
        d.mkdir(parents=True)
        data.catalog.save(d / "catalog.parquet")
        table = pa.table(
            {
                "user_id": inter.user_ids[inter.user],
                "item_id": data.catalog.item_id[inter.item - 1],
                "timestamp": inter.timestamp,
            }
        )
        pq.write_table(table, d / "interactions.parquet")
        dirs[d.name] = d
    # a node with invalid data: half its rows name items the catalog does not have
    bad = base / "nodes" / "badshop"
    bad.mkdir()
    data.catalog.save(bad / "catalog.parquet")
    first = pq.read_table(next(iter(dirs.values())) / "interactions.parquet")
    items = [f"no-such-item-{i}" if i % 2 else v for i, v in enumerate(first.column("item_id").to_pylist())]
    pacsv.write_csv(first.set_column(1, "item_id", pa.array(items)), bad / "interactions.csv")
    # the rogue node holds valid data, but its key was never registered
    rogue = base / "nodes" / "rogue"
    rogue.mkdir()
    data.catalog.save(rogue / "catalog.parquet")
    pq.write_table(first, rogue / "interactions.parquet")
    return dirs


class Procs:
    """Processes this test started, each in its own session, killed by process group."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.base / f"{name}.log", "w")  # noqa: SIM115 - the child owns it
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        p = subprocess.Popen(args, cwd=self.base, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        p = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for name, p in self.procs.items():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill(name)


def _wait(predicate, timeout: float, what: str, procs: Procs, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    logs = "\n".join(f"--- {n}\n{procs.log(n)[-2500:]}" for n in procs.procs)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def _ledger_rounds(data_dir: Path, run: str) -> list[int]:
    path = data_dir / ".fedmart" / "privacy-ledger.json"
    if not path.is_file():
        return []
    return [e["round"] for e in json.loads(path.read_text())["entries"] if e["run"] == run]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _audit(run_dir: Path) -> list[dict]:
    path = run_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _flower_children_of(port: int) -> list[int]:
    """Pids of the SuperLink's ServerApp helpers (own sessions) still serving ``port``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"127.0.0.1:{port}" in cmd and ("flwr-serverapp" in cmd or "flower-superexec" in cmd):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from fedmart.supervise import free_port

    t0 = time.monotonic()
    base = tmp_path_factory.mktemp("deploy")
    dirs = _prepare_data(base)
    names = sorted(dirs)
    healthy, nan_node = names[:3], names[3]
    victim = healthy[2]
    certs = subprocess.run(
        [*CLI, "certs", "--out", "certs", "--node-keys", ",".join(names)], cwd=base, capture_output=True, text=True
    )
    assert certs.returncode == 0, certs.stderr
    rogue_keys = subprocess.run(
        [*CLI, "node", "keygen", "--name", "rogue", "--out", "rogue-keys"], cwd=base, capture_output=True
    )
    assert rogue_keys.returncode == 0
    # The rogue is outside the federation: no roster membership either (a semi-honest node without a
    # roster still starts), so what refuses it is the SuperLink's node authentication.
    for stale in (base / "rogue-keys").glob("rogue.roster.key*"):
        stale.unlink()
    # The coordinator's signing key is made once, at set-up: `fedmart coordinate` never creates it.
    keygen = subprocess.run([*CLI, "registry", "keygen", "keys/coordinator.key"], cwd=base, capture_output=True)
    assert keygen.returncode == 0, keygen.stderr
    # Semi-honest secure aggregation: this scenario's faults (a NaN node every round, and a node
    # killed in round 3: two dropouts of four) exceed what the active mode tolerates at n = 4
    # (one; docs/secagg.md). The active mode's refusals are shown in tests/adversary/secagg/.
    (base / "semi-honest.yaml").write_text("secagg_threat_model: semi-honest\n")
    port, control_port = free_port(), free_port()
    run_dir = base / "outputs" / "dep"
    coordinate = [
        *CLI, "coordinate", *TINY, "privacy=dp", "secagg=on", "secagg.adversary=semi-honest",
        f"federation.num_rounds={ROUNDS}",
        "federation.eval_every=3", "federation.round_timeout=60", "secagg.timeout=45",
        "deploy.certs=certs", f"deploy.port={port}", f"deploy.control_port={control_port}",
        "deploy.catalog=catalog.parquet", "hydra.run.dir=outputs/dep",
    ]  # fmt: skip

    def node(name: str, *extra: str, key: str | None = None) -> list[str]:
        return [
            *CLI, "node", "--data", f"nodes/{name}", "--superlink", f"127.0.0.1:{port}", "--root-cert", "certs/ca.pem",
            "--auth-key", key or f"certs/nodes/{name}.key", "--max-epsilon", "100", "--max-quarantine-fraction", "0.2",
            "--policy", "semi-honest.yaml", *extra,
        ]  # fmt: skip

    procs = Procs(base)
    out = SimpleNamespace(base=base, run_dir=run_dir, dirs=dirs, healthy=healthy, nan_node=nan_node, victim=victim)
    try:
        procs.start("coordinator", coordinate)
        # Nodes join once their keys are registered (docs/runbook-coordinator.md: register, then start nodes).
        _wait(lambda: "SuperLink on https://" in procs.log("coordinator"), 240, "the SuperLink and keys", procs)
        for name in healthy:
            procs.start(name, node(name))
        procs.start(nan_node, node(nan_node, "--fault", "nan-update"))
        procs.start("rogue", node("rogue", key="rogue-keys/rogue.key"))
        procs.start("badshop", node("badshop", key=f"certs/nodes/{healthy[0]}.key"))

        # Round 1 completes; during round 2 the coordinator dies once a node has trained it.
        _wait(lambda: len(_metrics(run_dir)) >= 1, 420, "round 1", procs, interval=1.0)
        _wait(lambda: 2 in _ledger_rounds(dirs[healthy[0]], "dep"), 300, "a node training round 2", procs)
        assert len(_metrics(run_dir)) == 1, "the kill must land inside round 2"
        procs.kill("coordinator")
        out.killed_coordinator_after = [r["round"] for r in _metrics(run_dir)]
        out.stale_after_kill = bool(_flower_children_of(control_port))  # `coordinate resume=` stops them
        procs.start("coordinator-resumed", [*CLI, "coordinate", "resume=outputs/dep"])

        # While the resumed run goes on: the registered nodes as the SuperLink lists them.
        _wait(lambda: len(_metrics(run_dir)) >= 2, 420, "round 2 after the restart", procs, interval=0.2)
        list_nodes = [*CLI, "nodes", "--run", "outputs/dep", "list", "--format", "json"]
        listing = subprocess.Popen(list_nodes, cwd=base, stdout=subprocess.PIPE, text=True)
        # Round 3: the victim dies as soon as it starts training.
        _wait(lambda: "task train (round 3, secure aggregation: masked-input)" in procs.log(victim), 420,
              f"{victim} training round 3", procs, interval=0.1)  # fmt: skip
        procs.kill(victim)
        out.victim_ledger_at_kill = _ledger_rounds(dirs[victim], "dep")

        out.node_list = json.loads(listing.communicate(timeout=120)[0])
        remaining = DEADLINE - (time.monotonic() - t0)
        rc = procs.procs["coordinator-resumed"].wait(timeout=max(60, remaining))
        out.coordinator_rc = rc
        out.coordinator_log = procs.log("coordinator-resumed")
        out.rogue = (procs.procs["rogue"].wait(timeout=120), procs.log("rogue"))
        out.badshop = (procs.procs["badshop"].wait(timeout=120), procs.log("badshop"))
        out.logs = {n: procs.log(n) for n in procs.procs}
        out.seconds = time.monotonic() - t0
    finally:
        procs.stop_all()
    return out


def test_run_completes_all_rounds_and_publishes_signed_models(federation):
    f = federation
    assert f.coordinator_rc == 0, f.coordinator_log[-3000:]
    rows = _metrics(f.run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["aggregated"] for r in rows), [r["abort_reason"] for r in rows]
    assert all(m["epsilon"] > 0 for r in rows for m in r["node_metrics"].values()), "DP-SGD ran on every node"
    verify = subprocess.run(
        [*CLI, "registry", "verify", "--root", str(f.run_dir / "registry"), "--public-key", "keys/coordinator.key.pub"],
        cwd=f.base,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count("ok") >= ROUNDS
    audit = subprocess.run(
        [*CLI, "audit", "verify", str(f.run_dir / "audit.jsonl"), "--public-key", "keys/coordinator.key.pub"],
        cwd=f.base,
        capture_output=True,
        text=True,
    )
    assert audit.returncode == 0 and "chain intact" in audit.stdout, audit.stdout + audit.stderr


def test_nan_node_is_rejected_every_round_and_never_aggregated(federation):
    f = federation
    for r in _metrics(f.run_dir):
        assert f.nan_node in r["rejected"] and "non-finite" in r["rejected"][f.nan_node], r["rejected"]
        assert f.nan_node not in r["replied"]
    ends = [e for e in _audit(f.run_dir) if e["event"] == "round_end"]
    assert all(f.nan_node in e["rejected"] for e in ends)


def test_killed_node_is_a_dropout_and_the_round_completes(federation):
    f = federation
    last = _metrics(f.run_dir)[-1]
    assert f.victim in last["timed_out"] and f.victim not in last["replied"]
    assert last["aggregated"] and sorted(last["replied"]) == sorted(set(f.healthy) - {f.victim})
    end = [e for e in _audit(f.run_dir) if e["event"] == "round_end" and e["round"] == ROUNDS][-1]
    assert f.victim in end["dropped"] and end["aggregated"]


def test_coordinator_restart_resumes_after_the_last_completed_round(federation):
    f = federation
    assert f.killed_coordinator_after == [1]
    events = _audit(f.run_dir)
    resumes = [e for e in events if e["event"] == "run_resume"]
    assert len(resumes) == 1 and resumes[0]["start_round"] == 2
    ends = Counter(e["round"] for e in events if e["event"] == "round_end")
    assert ends == {r: 1 for r in range(1, ROUNDS + 1)}, "every round completed exactly once"
    assert [e["event"] for e in events][-1] == "run_end"
    # A node that trained round 2 before the crash trained it again for the restarted coordinator,
    # with fresh DP randomness: it never puts the same update into a second secure sum.
    retrained = [n for n in f.healthy if Counter(_ledger_rounds(f.dirs[n], "dep"))[2] == 2]
    assert retrained, {n: Counter(_ledger_rounds(f.dirs[n], "dep")) for n in f.healthy}
    assert all(_trained(f.logs[n], 2) == 2 for n in retrained)


def test_every_ledger_holds_one_spend_per_training_the_node_did(federation):
    f = federation
    rows = _metrics(f.run_dir)
    for name, data_dir in f.dirs.items():
        spent = Counter(_ledger_rounds(data_dir, "dep"))
        # one spend per training, recorded before the update left: what was released, or more
        assert spent == Counter({r: _trained(f.logs[name], r) for r in spent}), (name, spent)
        delivered = {r["round"] for r in rows if name in r["replied"] or name in r["rejected"]}
        died = {r["round"] for r in rows if name in r["timed_out"]}
        assert delivered <= set(spent) <= delivered | died | {2}, (name, spent, delivered, died)
    assert ROUNDS not in f.victim_ledger_at_kill or ROUNDS in _ledger_rounds(f.dirs[f.victim], "dep")


def _trained(log: str, server_round: int) -> int:
    """How many times the node's log says it trained ``server_round`` (clients/app.py logs each training)."""
    return log.count(f"trained round {server_round} of run dep")


def test_registered_nodes_are_listed_online_by_name_and_full_fingerprint(federation):
    from privacy.pki import ssh_fingerprint

    nodes = federation.node_list["nodes"]
    assert len(nodes) == len(federation.dirs) and all(n["status"] == "online" for n in nodes), nodes
    certs = federation.base / "certs" / "nodes"
    assert {n["name"]: n["fingerprint"] for n in nodes} == {
        name: ssh_fingerprint((certs / f"{name}.pub").read_bytes()) for name in federation.dirs
    }


def test_unregistered_node_is_refused_by_the_superlink(federation):
    rc, log = federation.rogue
    assert rc != 0
    assert "fedmart: error:" in log and "not registered" in log, log[-2000:]


def test_node_with_invalid_data_refuses_to_join_with_its_report(federation):
    rc, log = federation.badshop
    assert rc == 2
    errors = [line for line in log.splitlines() if line.startswith("fedmart: error:")]
    assert len(errors) == 1 and "refuses to join" in errors[0] and "failed validation" in errors[0]
    assert "unknown_item" in log, log[-2000:]
    assert not (federation.base / "nodes" / "badshop" / ".fedmart" / "supernode.log").exists()
