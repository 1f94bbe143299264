"""End-to-end federations in Flower's simulation engine, driven through the real CLI.

Ray is slow to start, so the runs are shared: one uninterrupted 3-round run, and
one 2-round run that is then resumed to 3 rounds. Every assertion reads their outputs.
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

SMALL = [
    "data.synthetic.num_users=600",
    "data.synthetic.num_items=150",
    "data.synthetic.num_departments=3",
    "data.synthetic.num_merchants=6",
    "data.max_len=20",
    "model.hidden=16",
    "model.heads=1",
    "federation.central_eval_users=0",
]


def _simulate(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "federation.cli", "simulate", *SMALL, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    full = base / "full"
    _simulate(full, "federation.num_rounds=3")
    part = base / "resumed"
    _simulate(part, "federation.num_rounds=2")
    first_rounds = _metrics(part)
    resumed = subprocess.run(
        [sys.executable, "-m", "federation.cli", "simulate", f"resume={part}", "federation.num_rounds=3"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"full": full, "resumed": part, "first_rounds": first_rounds}


def test_three_nodes_ran_and_outputs_were_written(runs):
    run = runs["full"]
    rows = _metrics(run)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert len(r["sampled"]) == 3 and len(r["replied"]) == 3
        assert r["aggregated"]
        assert 0.0 <= r["central_eval"]["test_ndcg@10"] <= 1.0
        assert r["federated_eval"]["test_ndcg@10"] >= 0.0
    for name in ("config.yaml", "report.md", "plots/metrics.png", "catalog.parquet", "audit.jsonl"):
        assert (run / name).is_file(), name
    assert "| 3 | 3/3 |" in (run / "report.md").read_text()


def test_global_model_changed_every_round(runs):
    run = runs["full"]
    models = sorted((run / "registry").glob("v*/weights.safetensors"))
    assert len(models) == 3, "one signed registry version per round"
    w = [load_file(str(m)) for m in models]
    for a, b in zip(w, w[1:], strict=False):
        assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_training_improves_over_rounds(runs):
    rows = _metrics(runs["full"])
    assert rows[-1]["train_metrics"]["train_loss"] < rows[0]["train_metrics"]["train_loss"]


def test_resume_equals_uninterrupted(runs):
    full, resumed = _metrics(runs["full"]), _metrics(runs["resumed"])
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == runs["first_rounds"], "resume rewrote the rounds it had already completed"
    for a, b in zip(full, resumed, strict=True):
        assert a["central_eval"] == b["central_eval"], f"round {a['round']} differs after resume"
        assert a["train_metrics"]["train_loss"] == b["train_metrics"]["train_loss"]
    fa = load_file(str(sorted((runs["full"] / "registry").glob("v0003-r3-*/weights.safetensors"))[0]))
    fb = load_file(str(sorted((runs["resumed"] / "registry").glob("v0003-r3-*/weights.safetensors"))[0]))
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_bad_override_gives_a_readable_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "federation.cli", "simulate", "federation.strategy=fedsgd", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "fedsgd" in proc.stderr and "Traceback" not in proc.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "federation.cli", "simulate", "federation.num_roundz=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unknown.returncode != 0
    assert "num_roundz" in unknown.stderr


def test_help_lists_config_groups():
    proc = subprocess.run(
        [sys.executable, "-m", "federation.cli", "simulate", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0
    for group in ("data:", "federation:", "partition:", "model:"):
        assert group in proc.stdout
