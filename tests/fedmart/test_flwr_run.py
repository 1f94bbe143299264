"""``flwr run . --stream`` as the README shows it, for a newcomer: a fresh ``FLWR_HOME``, the
local simulation SuperLink that ``flwr`` starts on demand, runtime dependency installation
off (no second environment with torch in it), the built-in data with small overrides."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from fedmart.supervise import free_port, stop_pids

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
NODES = 3  # the small federation's departments: one simulated SuperNode each


def _local_superlinks(home: Path) -> list[int]:
    """Pids of the ``flower-superlink`` that ``flwr run`` started for this FLWR_HOME (its log lives there)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if any(Path(a).name == "flower-superlink" for a in argv[:2]) and any(str(home) in a for a in argv):
                pids.append(int(entry.name))
    return pids


def test_flwr_run_from_a_fresh_flower_home(tmp_path, small_federation):
    home, run = tmp_path / "flwr-home", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # the README's way
        # the local SuperLink's ports (39091/39093 by default), free ones so parallel runs never share one
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    run_config = " ".join([*small_federation, "federation.num_rounds=1", f'sim.run_dir="{run}"'])
    pyproject = (ROOT / "pyproject.toml").read_text()
    argv = ["flwr", "run", str(ROOT), "--stream", "--federation-config", f"num-supernodes={NODES}"]
    try:
        # cwd: what the apps write by relative path (signing key, built-in nodes' state) stays out of the checkout
        proc = subprocess.run(
            [*argv, "--run-config", run_config], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
    finally:
        stop_pids(_local_superlinks(home), grace=10.0)
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0 and "Successfully started run" in proc.stdout, out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1], out
    assert len(rows[0]["replied"]) == NODES and rows[0]["aggregated"], rows[0]
    assert (run / "report.md").is_file() and len(list((run / "registry").glob("v0001-*"))) == 1
    assert not (home / "runtime-envs").exists(), "Flower built a runtime environment for the app"
    assert (ROOT / "pyproject.toml").read_text() == pyproject, "flwr run rewrote pyproject.toml"
