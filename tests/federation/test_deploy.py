"""A real deployment on 127.0.0.1, set up and run with the runbooks' own commands: a SuperLink
and department SuperNodes as separate processes, TLS and SuperNode authentication on, DP-SGD
and secure aggregation on, faults injected.

Every operator command is a marked block of docs/runbook-node.md, docs/runbook-coordinator.md
or docs/serving.md, run word for word with this test's values for the blocks' variables
(``tests/runbook.py``); test-only flags (a fault, the tiny model) are appended at the end. One
federation serves every assertion (Flower and torch start slowly on a small CPU):

* the platform's one interactions file becomes five departments' raw CSVs, each with its own
  column names and item ids (``data split``); each department makes its own keys (``node
  keygen``) and prepares its export (``data prepare``); the coordinator makes the CA and its
  certificate (``certs``, no node keys) and its signing key, and takes the departments' ``.pub``;
* ``coordinate`` runs 4 rounds with four ``node`` processes: three healthy departments and one
  whose (test-only) fault makes it emit NaN updates; a node with an unregistered key and one
  with invalid (hand-made) data try to join;
* during round 2 the coordinator's whole process group is SIGKILLed once a node has trained
  that round, and ``coordinate resume=`` is started;
* as the resumed round 2 starts, the fifth department prepares, is registered (``nodes
  register``) and starts: it trains from the next round; one healthy node's process group is
  SIGKILLed as soon as it starts training that round, and started again with the same command:
  it rejoins without an error;
* after the run: ``registry promote``, ``serve`` with the run's catalog, one ``/recommend``.

It prints the time from the first runbook command to round 1's metrics row (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROUNDS = 4
KILL_ROUND = 2  # the coordinator dies in it, and on its resumed run a node crashes and is restarted
TINY = [
    "data.synthetic.num_users=300",
    "data.synthetic.num_items=100",
    "data.synthetic.num_departments=5",
    "data.synthetic.num_merchants=6",
    "data.max_len=20",
    "model.hidden=16",
    "model.heads=1",
    "model.layers=1",
    "train.batch_size=32",
    "federation.local_steps=0",
]
# Semi-honest secure aggregation: this scenario's faults (a NaN node every round, and a node
# killed in round 2: two dropouts of four) exceed what the active mode tolerates at n = 4
# (one; docs/secagg.md). The active mode's refusals are shown in tests/adversary/secagg/.
TEST_OVERRIDES = [*TINY, "privacy=dp", "secagg=on", "secagg.adversary=semi-honest", "federation.eval_every=3",
                  "federation.round_timeout=60", "secagg.timeout=45"]  # fmt: skip
POLICY = "secagg_threat_model: semi-honest\nmax_epsilon: 100\n"  # each department's policy.yaml
NODE_DOC, COORD_DOC, SERVE_DOC = "runbook-node.md", "runbook-coordinator.md", "serving.md"
RUN = "outputs/dep"
DEADLINE = 15 * 60  # the whole scenario; it takes about 5 minutes on a loaded 2-core machine


class Procs:
    """Processes this test started, each in its own session, killed by process group."""

    def __init__(self, base: Path, runbook) -> None:
        self.base, self.runbook = base, runbook
        self.procs: dict[str, subprocess.Popen] = {}

    def step(self, name: str, doc: str, step: str, env: dict, cwd: Path, append: tuple | list = ()) -> None:
        """Start a runbook step (a coordinator, a node, a server); its output goes to ``name.log``."""
        self.procs[name] = self.runbook.start_step(doc, step, env, cwd, self.base / f"{name}.log", append=append)

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.base / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(argv, cwd=self.base, stdout=log, stderr=subprocess.STDOUT,
                                                env=self.runbook.environment(), start_new_session=True)  # fmt: skip

    def log(self, name: str) -> str:
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def kill(self, name: str) -> None:
        p = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def stop_all(self) -> None:
        running = [(n, p) for n, p in list(self.procs.items()) if p.poll() is None]
        for _, p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for name, p in running:
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
    logs = "\n".join(f"--- {n}\n{procs.log(n)[-2500:]}" for n in list(procs.procs))
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def _ok(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


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


def _resumed_round_started(run_dir: Path, server_round: int) -> bool:
    events = _audit(run_dir)
    resumed = [i for i, e in enumerate(events) if e["event"] == "run_resume"]
    return bool(resumed) and any(
        e["event"] == "round_start" and e["round"] == server_round for e in events[resumed[-1] :]
    )


def _train_starts(log: str, server_round: int) -> int:
    return log.count(f"task train (round {server_round}, secure aggregation: masked-input)")


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


def _write_badshop(base: Path) -> None:
    """A hand-made node directory (no ``prepare``): half its rows name items the catalog lacks."""
    bad = base / "nodes" / "badshop"
    bad.mkdir(parents=True)
    shutil.copy(base / "catalog.parquet", bad / "catalog.parquet")
    rows = pq.read_table(base / "world" / "interactions.parquet").slice(0, 800)
    items = [f"no-such-item-{i}" if i % 2 else v for i, v in enumerate(rows.column("item_id").to_pylist())]
    pacsv.write_csv(rows.set_column(rows.column_names.index("item_id"), "item_id", pa.array(items)),
                    bad / "interactions.csv")  # fmt: skip


def _department(runbook, base: Path, name: str, superlink: str, source: str | None = None) -> SimpleNamespace:
    """Department ``name`` on a machine of its own (``sites/NAME``): what the coordinator sent it
    (``ca.pem``, ``catalog.parquet``), its raw export, its policy; then the runbook's keygen and
    prepare steps there. ``source``: whose export it holds (the rogue holds a real department's)."""
    source = source or name
    site = base / "sites" / name
    site.mkdir(parents=True)
    shutil.copy(base / "certs" / "ca.pem", site / "ca.pem")
    shutil.copy(base / "catalog.parquet", site / "catalog.parquet")
    for f in (f"{source}.csv", f"{source}.columns.yaml", f"{source}.item-map.csv"):
        shutil.copy(base / "raw" / f, site / f)
    (site / "policy.yaml").write_text(POLICY)
    env = {"NODE": name, "KEYS": "keys", "EXPORT": f"{source}.csv", "COLUMNS": f"{source}.columns.yaml",
           "DATA": f"data/{name}", "SUPERLINK": superlink}  # fmt: skip
    keygen = _ok(runbook.run_step(NODE_DOC, "keygen", env, site), f"{name}: node keygen")
    prepare = _ok(runbook.run_step(NODE_DOC, "prepare", env, site), f"{name}: data prepare")
    return SimpleNamespace(site=site, env=env, data=site / env["DATA"], keygen=keygen.stdout, prepare=prepare.stdout)


def _send_public_key(base: Path, dept: SimpleNamespace) -> None:
    """The department sends ``NAME.pub``; the coordinator puts it into ``certs/nodes/``."""
    name = dept.env["NODE"]
    (base / "certs" / "nodes").mkdir(exist_ok=True)
    shutil.copy(dept.site / "keys" / f"{name}.pub", base / "certs" / "nodes" / f"{name}.pub")


def _recommend(port: int, history: list[str]) -> dict:
    body = json.dumps({"history": history, "k": 5}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=body,
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def federation(tmp_path_factory, runbook):
    from fedmart.supervise import free_port

    t0 = time.monotonic()
    base = tmp_path_factory.mktemp("deploy")
    port, control_port, serve_port = free_port(), free_port(), free_port()
    superlink = f"127.0.0.1:{port}"
    coord = {"HOSTS": "localhost", "PORT": str(port), "CONTROL_PORT": str(control_port),
             "CATALOG": "catalog.parquet", "ROUNDS": str(ROUNDS), "RUN": RUN}  # fmt: skip
    # Given: the platform's catalog and one interactions file (fedmart schema) to split.
    synth = [sys.executable, "-m", "fedmart", "data", "synth", "--dest", "world", "--users", "300", "--items", "100",
             "--departments", "5", "--merchants", "6", "--seed", "0"]  # fmt: skip
    _ok(subprocess.run(synth, cwd=base, env=runbook.environment(), capture_output=True, text=True), "data synth")
    shutil.copy(base / "world" / "catalog.parquet", base / "catalog.parquet")
    _write_badshop(base)

    # From here on, the runbooks.
    started = time.time()
    for step in ("certs", "signing-key"):
        _ok(runbook.run_step(COORD_DOC, step, coord, base), step)
    _ok(runbook.run_step(NODE_DOC, "split", {"INTERACTIONS": "world/interactions.parquet"}, base), "data split")
    names = sorted(p.name.removesuffix(".columns.yaml") for p in (base / "raw").glob("*.columns.yaml"))
    assert len(names) == 5, names
    healthy, nan_node, newcomer = names[:3], names[3], names[4]
    victim = healthy[2]
    with ThreadPoolExecutor(5) as pool:  # departments work at once, each on its own machine
        first = [*healthy, nan_node, "rogue"]
        sources = [*healthy, nan_node, healthy[0]]  # the rogue holds valid data, but its key is never registered
        made = pool.map(lambda n, s: _department(runbook, base, n, superlink, s), first, sources)
        sites = dict(zip(first, made, strict=True))
    for name in [*healthy, nan_node]:
        _send_public_key(base, sites[name])

    run_dir = base / RUN
    procs = Procs(base, runbook)
    out = SimpleNamespace(base=base, run_dir=run_dir, healthy=healthy, nan_node=nan_node, victim=victim,
                          newcomer=newcomer, sites=sites, crash_errors=[])  # fmt: skip
    restarted = f"{victim}-restarted"

    def crash_and_restart(before: int) -> None:
        """As soon as the victim starts training the resumed round: SIGKILL, then the same command again."""
        try:
            _wait(lambda: _train_starts(procs.log(victim), KILL_ROUND) > before, 420,
                  f"{victim} training the resumed round {KILL_ROUND}", procs, interval=0.1)  # fmt: skip
            procs.kill(victim)
            out.victim_ledger_at_kill = _ledger_rounds(sites[victim].data, "dep")
            procs.step(restarted, NODE_DOC, "node", sites[victim].env, sites[victim].site)
        except BaseException as exc:  # re-raised by the fixture
            out.crash_errors.append(exc)

    try:
        procs.step("coordinator", COORD_DOC, "coordinate", coord, base, append=TEST_OVERRIDES)
        # Nodes join once their keys are registered (runbook-coordinator.md: register, then start nodes).
        _wait(lambda: "SuperLink on https://" in procs.log("coordinator"), 240, "the SuperLink and keys", procs)
        for name in [*healthy, nan_node, "rogue"]:
            fault = ["--fault", "nan-update"] if name == nan_node else []
            procs.step(name, NODE_DOC, "node", sites[name].env, sites[name].site, append=fault)
        procs.start("badshop", [
            sys.executable, "-m", "fedmart", "node", "--data", "nodes/badshop", "--superlink", superlink,
            "--root-cert", "certs/ca.pem", "--auth-key", f"sites/{healthy[0]}/keys/{healthy[0]}.key",
            "--max-quarantine-fraction", "0.2", "--policy", f"sites/{healthy[0]}/policy.yaml",
        ])  # fmt: skip

        _wait(lambda: len(_metrics(run_dir)) >= 1, 420, "round 1", procs, interval=0.5)
        out.first_round_seconds = (run_dir / "metrics.jsonl").stat().st_mtime - started
        print(f"\ntime to first round, following the runbooks: {out.first_round_seconds:.0f} s")
        # During round 2 the coordinator dies once a node has trained it.
        _wait(lambda: KILL_ROUND in _ledger_rounds(sites[healthy[0]].data, "dep"), 300, "a node training round 2",
              procs)  # fmt: skip
        assert len(_metrics(run_dir)) == 1, "the kill must land inside round 2"
        procs.kill("coordinator")
        out.killed_coordinator_after = [r["round"] for r in _metrics(run_dir)]
        out.stale_after_kill = bool(_flower_children_of(control_port))  # `coordinate resume=` stops them
        crash = threading.Thread(target=crash_and_restart, args=(_train_starts(procs.log(victim), KILL_ROUND),))
        procs.step("coordinator-resumed", COORD_DOC, "resume", coord, base)
        crash.start()

        # The resumed round 2 has started: a fifth department prepares, is registered and starts.
        _wait(lambda: _resumed_round_started(run_dir, KILL_ROUND), 420, "the resumed round 2", procs)
        out.registered_during = KILL_ROUND
        sites[newcomer] = _department(runbook, base, newcomer, superlink)
        _send_public_key(base, sites[newcomer])
        out.register = runbook.run_step(COORD_DOC, "register", {**coord, "NODE": newcomer}, base)
        procs.step(newcomer, NODE_DOC, "node", sites[newcomer].env, sites[newcomer].site)
        list_nodes = [sys.executable, "-m", "fedmart", "nodes", "--run", RUN, "list", "--format", "json"]
        listing = subprocess.Popen(list_nodes, cwd=base, stdout=subprocess.PIPE, text=True, env=runbook.environment())
        out.node_list = json.loads(listing.communicate(timeout=120)[0])

        crash.join(timeout=480)
        if out.crash_errors:
            raise out.crash_errors[0]
        remaining = DEADLINE - (time.monotonic() - t0)
        out.coordinator_rc = procs.procs["coordinator-resumed"].wait(timeout=max(60, remaining))
        out.coordinator_log = procs.log("coordinator-resumed")
        out.rogue = (procs.procs["rogue"].wait(timeout=120), procs.log("rogue"))
        out.badshop = (procs.procs["badshop"].wait(timeout=120), procs.log("badshop"))

        # After the run: the newest version promoted and served, as docs/serving.md says.
        out.version = sorted(p.name for p in (run_dir / "registry").glob("v*"))[-1]
        serving = {"RUN": RUN, "VERSION": out.version, "EPSILON": "100", "PORT": str(serve_port),
                   "XDG_STATE_HOME": str(base / "state")}  # fmt: skip
        out.promote = runbook.run_step(SERVE_DOC, "promote", serving, base)
        procs.step("serve", SERVE_DOC, "serve", serving, base, append=["--no-search", "--threads", "1"])
        _wait(lambda: _healthy(serve_port) or procs.procs["serve"].poll() is not None, 180, "fedmart serve", procs)
        out.served = _recommend(serve_port, ["SKU-0000001", "SKU-0000042"]) if _healthy(serve_port) else None
        out.logs = {n: procs.log(n) for n in procs.procs}
        out.logs[victim] += out.logs.get(restarted, "")  # one node, two processes
        out.seconds = time.monotonic() - t0
        print(f"deployment scenario: {out.seconds:.0f} s in all")
    finally:
        procs.stop_all()
    out.serve_log = procs.log("serve")
    out.dirs = {n: sites[n].data for n in [*healthy, nan_node, newcomer]}
    return out


def test_run_completes_all_rounds_and_publishes_signed_models(federation):
    f = federation
    assert f.coordinator_rc == 0, f.coordinator_log[-3000:]
    rows = _metrics(f.run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["aggregated"] for r in rows), [r["abort_reason"] for r in rows]
    assert all(m["epsilon"] > 0 for r in rows for m in r["node_metrics"].values()), "DP-SGD ran on every node"
    verify = subprocess.run(
        [sys.executable, "-m", "fedmart", "registry", "verify", "--root", str(f.run_dir / "registry"),
         "--public-key", "keys/coordinator.key.pub"],
        cwd=f.base, capture_output=True, text=True,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count("ok") >= ROUNDS
    audit = subprocess.run(
        [sys.executable, "-m", "fedmart", "audit", "verify", str(f.run_dir / "audit.jsonl"),
         "--public-key", "keys/coordinator.key.pub"],
        cwd=f.base, capture_output=True, text=True,
    )  # fmt: skip
    assert audit.returncode == 0 and "chain intact" in audit.stdout, audit.stdout + audit.stderr


def test_departments_join_from_their_own_raw_exports_and_keys(federation):
    from federation.catalog import Catalog

    f = federation
    version = Catalog.load(f.base / "catalog.parquet").version
    for name, data in f.dirs.items():
        raw = (f.base / "raw" / f"{name}.csv").read_text().splitlines()
        assert "user_id" not in raw[0] and "item_id" not in raw[0], raw[0]  # the department's own column names
        assert f'"{name}-' in raw[1], raw[1]  # and its own item ids, mapped by prepare
        assert json.loads((data / "node.json").read_text())["catalog_version"] == version
        assert "quarantined 0" in f.sites[name].prepare, f.sites[name].prepare
        assert "data ok" in f.logs[name], f.logs[name][-2000:]
        assert oct((f.sites[name].site / "keys" / f"{name}.key").stat().st_mode & 0o777) == "0o600"
    # the coordinator made no node private key: it holds only what the departments sent
    assert sorted(p.name for p in (f.base / "certs" / "nodes").iterdir()) == sorted(f"{n}.pub" for n in f.dirs)


def test_nan_node_is_rejected_every_round_and_never_aggregated(federation):
    f = federation
    for r in _metrics(f.run_dir):
        assert f.nan_node in r["rejected"] and "non-finite" in r["rejected"][f.nan_node], r["rejected"]
        assert f.nan_node not in r["replied"]
    ends = [e for e in _audit(f.run_dir) if e["event"] == "round_end"]
    assert all(f.nan_node in e["rejected"] for e in ends)


def test_killed_node_is_a_dropout_and_the_round_completes(federation):
    f = federation
    row = _metrics(f.run_dir)[KILL_ROUND - 1]
    assert f.victim in row["timed_out"] and f.victim not in row["replied"]
    assert row["aggregated"] and sorted(row["replied"]) == sorted(set(f.healthy) - {f.victim})
    end = [e for e in _audit(f.run_dir) if e["event"] == "round_end" and e["round"] == KILL_ROUND][-1]
    assert f.victim in end["dropped"] and end["aggregated"]


def test_a_crashed_node_started_again_rejoins_without_error(federation):
    f = federation
    log = f.logs[f"{f.victim}-restarted"]
    for bad in ("fedmart: error", "Traceback", "stale channel key"):
        assert bad not in log, log[-3000:]
    rows = _metrics(f.run_dir)
    assert not [r["failed"] for r in rows if r["failed"]], "no node's round failed"
    trained_after = [r["round"] for r in rows if r["round"] > KILL_ROUND and f.victim in r["replied"]]
    assert trained_after, [(r["round"], r["replied"], r["timed_out"]) for r in rows]
    rejoined = sum(r.get("secure_aggregation", {}).get("rejoined", 0) for r in rows)
    assert rejoined >= 1, "it came back with a new channel key"


def test_a_department_registered_mid_run_trains_from_the_next_round(federation):
    f = federation
    assert f.register.returncode == 0, f.register.stderr
    assert f.register.stdout.startswith(f"{f.newcomer}: registered, node id "), f.register.stdout
    rows = _metrics(f.run_dir)
    joined = [r["round"] for r in rows if f.newcomer in r.get("joined", [])]
    assert len(joined) == 1 and joined[0] > f.registered_during, [(r["round"], r.get("joined")) for r in rows]
    assert all(f.newcomer not in r["sampled"] for r in rows if r["round"] < joined[0])
    assert all(f.newcomer in r["replied"] for r in rows if r["round"] >= joined[0]), rows
    assert f"joined (registered during the run): {f.newcomer}" in f.coordinator_log


def test_coordinator_restart_resumes_after_the_last_completed_round(federation):
    f = federation
    assert f.killed_coordinator_after == [1]
    events = _audit(f.run_dir)
    resumes = [e for e in events if e["event"] == "run_resume"]
    assert len(resumes) == 1 and resumes[0]["start_round"] == 2
    ends = Counter(e["round"] for e in events if e["event"] == "round_end")
    assert ends == {r: 1 for r in range(1, ROUNDS + 1)}, "every round completed exactly once"
    assert [e["event"] for e in events if e["event"] != "promotion"][-1] == "run_end"
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
    # the crash and the restart lost no spend: the ledger is on disk, written before an update leaves
    assert Counter(f.victim_ledger_at_kill) <= Counter(_ledger_rounds(f.dirs[f.victim], "dep"))


def _trained(log: str, server_round: int) -> int:
    """How many times the node's log says it trained ``server_round`` (clients/app.py logs each training)."""
    return log.count(f"trained round {server_round} of run dep")


def test_registered_nodes_are_listed_by_name_and_full_fingerprint(federation):
    from privacy.pki import ssh_fingerprint

    f = federation
    nodes = f.node_list["nodes"]
    certs = f.base / "certs" / "nodes"
    assert {n["name"]: n["fingerprint"] for n in nodes} == {
        name: ssh_fingerprint((certs / f"{name}.pub").read_bytes()) for name in f.dirs
    }
    # listed just after the newcomer's registration, while the victim may be crashing
    allowed = {f.newcomer: {"registered", "online"}, f.victim: {"online", "offline"}}
    assert all(n["status"] in allowed.get(n["name"], {"online"}) for n in nodes), nodes


def test_unregistered_node_is_refused_by_the_superlink(federation):
    rc, log = federation.rogue
    assert rc != 0
    assert "fedmart: error:" in log and "not registered" in log, log[-2000:]


def test_node_with_invalid_data_refuses_to_join_with_its_report(federation):
    rc, log = federation.badshop
    assert rc == 2
    errors = [line for line in log.splitlines() if line.startswith("fedmart: error:")]
    # one line: what was wrong, and the flag that changes it
    assert len(errors) == 1 and "refuses to join" in errors[0] and "--max-quarantine-fraction 0.2" in errors[0]
    assert "unknown_item=400" in errors[0], errors
    assert not (federation.base / "nodes" / "badshop" / ".fedmart" / "supernode.log").exists()


def test_the_promoted_version_is_served_with_the_documented_commands(federation):
    f = federation
    assert f.promote.returncode == 0, f.promote.stdout + f.promote.stderr
    assert f"promoted {f.version} as #1" in f.promote.stdout, f.promote.stdout
    assert f.served is not None, f.serve_log[-3000:]
    assert f.served["model_version"] == f.version and not f.served["fallback"], f.served
    assert len(f.served["items"]) == 5 and f.served["history_used"] == 2, f.served
