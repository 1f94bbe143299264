"""``python -m fedmart serve`` on a real 127.0.0.1 port refuses a rolled-back promotion and a version without DP
under ``--require dp``: while running (the last good version keeps serving) and at start (exit code 2, one line).

Three server processes in all: one that runs through the refusals, two that are refused at start.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from fedmart.supervise import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DP = {"mode": "target", "secagg": {"enabled": True}, "epsilon_max": 3.0}
PLAIN = {"mode": "off", "secagg": {"enabled": False}, "epsilon_max": None}


def _argv(world, state, port: int) -> list[str]:
    return [
        sys.executable, "-m", "fedmart", "serve", "--registry", str(world.registry_path),
        "--public-key", str(world.pub), "--catalog", str(world.catalog_path), "--port", str(port),
        "--no-search", "--reload-interval", "0.2", "--log-level", "warning", "--threads", "1",
        "--require", "dp", "--require", "epsilon<=8", "--state", str(state),
    ]  # fmt: skip


def _refused_at_start(world, state) -> tuple[int, str]:
    proc = subprocess.run(_argv(world, state, free_port()), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def test_serve_refuses_a_rollback_and_a_version_without_dp(tmp_path, support):
    world = support.make_world(tmp_path, num_items=60, promote=False)
    world.versions.clear()
    v1, v2 = (support.publish(world, seed, privacy=DP) for seed in (1, 2))  # promotions #1, #2
    promotions = world.registry_path / "promotions.jsonl"
    both = promotions.read_text()
    state, port = tmp_path / "state" / "serve.json", free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(_argv(world, state, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def model() -> dict:
        if proc.poll() is not None:
            raise AssertionError(f"fedmart serve exited {proc.returncode}:\n{proc.stdout.read()}")
        try:
            return httpx.get(f"{base}/model", timeout=2).json()
        except httpx.HTTPError:
            return {}

    try:
        assert support.wait_until(lambda: model().get("version") == v2, timeout=240, interval=0.2)
        assert model()["promotion_counter"] == 2 and json.loads(state.read_text())["counter"] == 2

        promotions.write_text(both.splitlines(keepends=True)[0])  # rolled back: #2 cut off, #1 (v1) is newest
        assert support.wait_until(lambda: v1 in model().get("refused", {}), timeout=60)
        assert "rolled back" in model()["refused"][v1]

        promotions.write_text(both)
        plain = support.publish(world, 3, privacy=PLAIN)  # signed and promoted (#3), but not private
        assert support.wait_until(lambda: plain in model().get("refused", {}), timeout=60)
        assert model()["refused"][plain].startswith("--require dp:")
        rec = httpx.post(f"{base}/recommend", json={"history": world.ids([1, 2]), "k": 3}, timeout=30).json()
        assert rec["model_version"] == v2 and model()["version"] == v2
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # A fresh process: the newest promotion (#3) is the version without DP.
    rc, err = _refused_at_start(world, state)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("fedmart: error:"), err
    assert "--require dp: the signed metadata says privacy mode 'off'" in err

    # A fresh process on a rolled-back file: the state file remembers #2.
    promotions.write_text(both.splitlines(keepends=True)[0])
    rc, err = _refused_at_start(world, state)
    assert rc == 2 and err.count("\n") == 1 and "promotion #1 is older than #2" in err and "rolled back" in err, err
