"""End-to-end federations in Flower's simulation engine, driven through the real CLI.

Ray is slow to start, so the runs are shared:

* ``full``: DP-SGD on the nodes, FedAdam, secure aggregation, 2 rounds uninterrupted;
* ``resumed``: the same, 1 round, then ``resume=`` to 2 rounds;
* ``budget``: secure aggregation off (the nodes' policy allows it), 2 rounds, with a node
  budget just below the largest round-2 epsilon of ``full``: in round 2 that node declines and
  the others train (if every node declined, the run would end: ``RunRefused``);
* ``open`` / ``open_resumed`` / ``open_plain``: no DP (the nodes' policy allows it), secure
  aggregation on, 2 rounds; the same as 1 round + resume; and 1 round without secure aggregation.

With DP the nodes draw their sampling and noise from the operating system: a resumed or
repeated run spends the same budget but never repeats the noise. Without DP the run seed
drives everything, and a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PRIVATE = ("privacy=dp", "federation=fedadam", "node.max_epsilon=1000")
OPEN = ("privacy=none", "federation=fedadam", "node=open")
AUDIT = ("privacy_audit=on", "node.audit.canaries=40")


def _simulate(small: tuple[str, ...], run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedmart", "simulate", *small, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _resume(run_dir: Path, rounds: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedmart", "simulate", f"resume={run_dir}", f"federation.num_rounds={rounds}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _metrics(run_dir: Path) -> list[dict]:
    """The round rows (after them, ``metrics.jsonl`` may hold the nodes' privacy audit)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "round" in r]


def _weights(run_dir: Path, version: str) -> dict[str, np.ndarray]:
    return load_file(str(sorted((run_dir / "registry").glob(f"{version}-*/weights.safetensors"))[0]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_federation):
    base = tmp_path_factory.mktemp("sim")
    out = {name: base / name for name in ("full", "resumed", "budget", "open", "open_resumed", "open_plain")}
    # The private runs audit themselves (40 canaries a node): about 20 more users of ~200 leave
    # each node's sampling rate (1 / ceil(users / 128)) and so its epsilon unchanged.
    _simulate(small_federation, out["full"], *PRIVATE, *AUDIT, "federation.num_rounds=2")
    _simulate(small_federation, out["resumed"], *PRIVATE, *AUDIT, "federation.num_rounds=1")
    out["first_rounds"] = _metrics(out["resumed"])
    _resume(out["resumed"], 2)
    # The nodes' spend is deterministic (the same request, plan and accountant): a budget just below
    # the largest round-2 epsilon of `full` makes that node, and only the nodes that reach it, decline.
    eps_r2 = [m["epsilon"] for m in _metrics(out["full"])[1]["node_metrics"].values()]
    _simulate(
        small_federation,
        out["budget"],
        *PRIVATE,
        "federation.num_rounds=2",
        "secagg=off",
        "node.require_secagg=false",
        f"node.max_epsilon={max(eps_r2) - 1e-6}",
    )
    _simulate(small_federation, out["open"], *OPEN, "federation.num_rounds=2")
    _simulate(small_federation, out["open_resumed"], *OPEN, "federation.num_rounds=1")
    _resume(out["open_resumed"], 2)
    _simulate(small_federation, out["open_plain"], *OPEN, "federation.num_rounds=1", "secagg=off")
    return out


def test_three_nodes_ran_and_outputs_were_written(runs):
    run = runs["full"]
    rows = _metrics(run)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["sampled"]) == 3 and len(r["replied"]) == 3
        assert r["aggregated"]
        assert 0.0 <= r["central_eval"]["test_ndcg@10"] <= 1.0
        assert r["federated_eval"] == {}  # the default node policy answers no federated evaluation
    for name in ("config.yaml", "report.md", "plots/metrics.png", "catalog.parquet", "audit.jsonl"):
        assert (run / name).is_file(), name
    assert "| 2 | 3/3 |" in (run / "report.md").read_text()
    assert _metrics(runs["open"])[-1]["federated_eval"]["test_ndcg@10"] >= 0.0  # a policy that allows it


def test_global_model_changed_every_round(runs):
    run = runs["full"]
    models = sorted((run / "registry").glob("v*/weights.safetensors"))
    assert len(models) == 2, "one signed registry version per round"
    w = [load_file(str(m)) for m in models]
    for a, b in zip(w, w[1:], strict=False):
        assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_training_improves_over_rounds(runs):
    rows = _metrics(runs["open"])
    assert rows[-1]["train_metrics"]["train_loss"] < rows[0]["train_metrics"]["train_loss"]
    private = _metrics(runs["full"])  # under DP the nodes keep their exact loss (a statistic outside the mechanism)
    assert all("train_loss" not in r["train_metrics"] for r in private)


def test_without_dp_resume_equals_uninterrupted_bit_for_bit(runs):
    full, resumed = _metrics(runs["open"]), _metrics(runs["open_resumed"])
    assert [r["round"] for r in resumed] == [1, 2]
    for a, b in zip(full, resumed, strict=True):
        assert a["central_eval"] == b["central_eval"], f"round {a['round']} differs after resume"
        assert a["train_metrics"]["train_loss"] == b["train_metrics"]["train_loss"]
    for version in ("v0001", "v0002"):  # two non-private runs of the same seed publish the same weights
        fa, fb = _weights(runs["open"], version), _weights(runs["open_resumed"], version)
        assert all(np.array_equal(fa[k], fb[k]) for k in fa), version


def test_with_dp_a_resumed_run_spends_the_same_but_never_repeats_the_noise(runs):
    full, resumed = _metrics(runs["full"]), _metrics(runs["resumed"])
    assert [r["round"] for r in resumed] == [1, 2]
    assert resumed[:1] == runs["first_rounds"], "resume rewrote the rounds it had already completed"
    for a, b in zip(full, resumed, strict=True):  # the same ledger spend, round by round and node by node
        spent_a = {n: m["epsilon"] for n, m in a["node_metrics"].items()}
        assert spent_a == {n: m["epsilon"] for n, m in b["node_metrics"].items()}
    for version in ("v0001", "v0002"):  # two private runs of the same seed publish different weights
        fa, fb = _weights(runs["full"], version), _weights(runs["resumed"], version)
        assert any(not np.array_equal(fa[k], fb[k]) for k in fa), version


def test_bad_override_gives_a_readable_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedmart", "simulate", "federation.strategy=fedsgd", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "fedsgd" in proc.stderr and "Traceback" not in proc.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "fedmart", "simulate", "federation.num_roundz=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unknown.returncode != 0
    assert "num_roundz" in unknown.stderr


def test_help_lists_config_groups():
    proc = subprocess.run(
        [sys.executable, "-m", "fedmart", "simulate", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0
    for group in ("data:", "federation:", "partition:", "model:"):
        assert group in proc.stdout


def test_private_rounds_report_epsilon_per_node(runs):
    rows = _metrics(runs["full"])
    for r in rows:
        eps = [m["epsilon"] for m in r["node_metrics"].values()]
        assert len(eps) == 3 and all(e > 0 for e in eps)
    first = {n: m["epsilon"] for n, m in rows[0]["node_metrics"].items()}
    last = {n: m["epsilon"] for n, m in rows[-1]["node_metrics"].items()}
    assert all(last[n] > first[n] for n in first), "epsilon accumulates over rounds"
    report = (runs["full"] / "report.md").read_text()
    assert "## Privacy" in report and "one user's whole interaction history at one node" in report


def test_every_ledger_equals_the_completed_rounds(runs):
    run = runs["resumed"]
    for ledger in sorted((run / "nodes").glob("node-*/.fedmart/privacy-ledger.json")):
        entries = json.loads(ledger.read_text())["entries"]
        assert sorted(e["round"] for e in entries) == [1, 2], ledger


def test_secure_aggregation_matches_plain_within_quantisation(runs):
    # Without DP the nodes' local training is identical; only the aggregation path differs.
    secure, plain = _metrics(runs["open"])[0], _metrics(runs["open_plain"])[0]
    assert secure["train_metrics"]["train_loss"] == pytest.approx(plain["train_metrics"]["train_loss"], rel=1e-6)
    for key in ("valid_ndcg@10", "test_ndcg@10", "test_hr@10"):
        assert abs(secure["central_eval"][key] - plain["central_eval"][key]) < 0.01, key
    # With DP the noise differs, but the spend does not: the same ledgers.
    dp_secure, dp_plain = _metrics(runs["full"])[0], _metrics(runs["budget"])[0]
    spent = {n: m["epsilon"] for n, m in dp_secure["node_metrics"].items()}
    assert spent == {n: m["epsilon"] for n, m in dp_plain["node_metrics"].items()}


def test_a_node_over_its_budget_declines_and_the_run_goes_on(runs):
    rows = _metrics(runs["budget"])
    assert [r["round"] for r in rows] == [1, 2]
    assert not rows[0]["declined"]
    declined = rows[1]["declined"]
    assert declined, "the node with the largest round-2 epsilon must decline round 2"
    assert rows[1]["replied"] and rows[1]["aggregated"], "the others train on: the run goes on"
    for reason in declined.values():
        parsed = json.loads(reason)
        assert parsed["code"] == "budget_exceeded" and parsed["epsilon_after"] > parsed["epsilon_now"]
    assert len(rows[1]["replied"]) + len(declined) == 3
    assert "declined" in (runs["budget"] / "report.md").read_text()


def test_client_level_dp_composes_with_dp_sgd_and_secure_aggregation(tmp_path, small_federation):
    """The optional second layer: nodes clip their updates and weigh 1, the coordinator
    noises the sum; its epsilon (unit: a node) is reported per round, apart from the users'."""
    from privacy.client_dp import ClientDPConfig

    run = tmp_path / "client-dp"
    _simulate(
        small_federation,
        run,
        *PRIVATE,
        "federation.num_rounds=2",
        "federation.client_dp.enabled=true",
        "federation.client_dp.clipping_norm=0.05",
        "federation.client_dp.noise_multiplier=0.8",
        "federation.client_dp.delta=0.01",
        # the client-level audit: 4 canary nodes (no data), through secure aggregation like the others
        "privacy_audit=on",
        "node.audit.canaries=0",
        "simulation.canary_nodes=4",
    )
    rows = _metrics(run)
    assert [r["aggregated"] for r in rows] == [True, True]
    config = ClientDPConfig(noise_multiplier=0.8, clipping_norm=0.05, delta=0.01)
    canaries = {f"canary-node-{i:02d}" for i in range(4)}
    for i, r in enumerate(rows, start=1):
        assert r["train_metrics"]["client_dp_epsilon"] == pytest.approx(config.epsilon(i))
        assert set(r["replied"]) >= canaries and len(r["replied"]) == 7
        for name, m in r["node_metrics"].items():
            assert m["num-examples"] == 1  # every node weighs the same, canary nodes too
            if name not in canaries:
                assert m["users_trained"] > 1
                assert m["epsilon"] > 0  # the users' DP-SGD guarantee is still there, reported apart
    assert rows[1]["train_metrics"]["client_dp_epsilon"] > rows[0]["train_metrics"]["client_dp_epsilon"]
    report = (run / "report.md").read_text()
    assert "### Client-level DP (second layer)" in report and "one whole node" in report
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["privacy_audit"]
    pooled = last["client-level (canary nodes)"]
    assert set(last) == {"client-level (canary nodes)"}  # the real nodes do not audit themselves here
    assert pooled["canaries"] == 4 and pooled["guesses"] == 2
    assert pooled["epsilon"] == pytest.approx(config.epsilon(2)) and pooled["delta"] == 0.01
    assert 0.0 <= pooled["epsilon_lower_bound"] <= pooled["epsilon"]
    assert "*client-level (canary nodes)*: 4 simulated nodes without data" in report


def test_every_node_audits_itself_and_the_report_shows_it(runs):
    run = runs["full"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    audits = rows[-1]["privacy_audit"]
    spent = {n: m["epsilon"] for n, m in _metrics(run)[-1]["node_metrics"].items()}
    assert set(audits) == set(spent)  # every node answered, under secure aggregation and DP
    for name, a in audits.items():
        assert a["canaries"] == 40 and a["guesses"] == 20 and 0 <= a["correct"] <= 20
        assert a["epsilon"] == pytest.approx(spent[name])  # the accountant's epsilon beside the bound
        # (20 guesses cannot give more than 1.8 against an epsilon of ~8: this checks the plumbing;
        # whether a bound can catch a broken mechanism is tests/clients/test_canary_audit.py)
        assert 0.0 <= a["epsilon_lower_bound"] <= a["epsilon"]
    report = (run / "report.md").read_text()
    assert "## Empirical privacy audit" in report and "WARNING" not in report
    for name in audits:
        assert f"| {name} | 40 | 20 |" in report
    events = [json.loads(line)["event"] for line in (run / "audit.jsonl").read_text().splitlines()]
    assert events[-2:] == ["privacy_audit", "run_end"]
    assert "## Empirical privacy audit" not in (runs["open"] / "report.md").read_text()  # no canaries, no section
