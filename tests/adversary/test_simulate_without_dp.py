"""``fedmart simulate privacy=none`` under the default node policy (issue 13, "Must show").

The coordinator's request says no DP; every node's own policy (``conf/node/default.yaml``)
requires it. The run must end with a non-zero exit, one line that names each node and the
policy key that declined, and publish nothing: no model version, no metrics, no report, and
no spend in any node's ledger.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_simulate_without_dp_is_declined_by_every_node_and_publishes_nothing(tmp_path, small_federation):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmart", "simulate", *small_federation, "privacy=none", "federation.num_rounds=1"]
    cmd += ["train.batch_size=32", f"registry.signing_key={tmp_path / 'keys' / 'coordinator.key'}"]
    cmd += [f"hydra.run.dir={run_dir}"]

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("fedmart: error:")]
    names = [n["node"] for n in json.loads((run_dir / "nodes.json").read_text())]
    assert len(names) == 3 and f"every node declined ({len(names)} of {len(names)})" in line
    for name in names:
        assert f"node {name}: policy.require_dp:" in line, line
    assert not (run_dir / "registry").exists() or not list((run_dir / "registry").glob("v*"))
    for output in ("metrics.jsonl", "report.md"):
        assert not (run_dir / output).exists(), f"a declined run wrote {output}"
    for ledger in (run_dir / "nodes").glob("*/.fedmart/privacy-ledger.json"):
        assert json.loads(ledger.read_text())["entries"] == [], ledger
