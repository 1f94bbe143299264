"""End to end: ``fedmart simulate`` -> ``fedmart registry promote`` -> ``fedmart serve`` -> HTTP.

A small federation writes signed versions to ``outputs/<run>/registry`` and an audit
log; the newest version is promoted through the CLI; a real server on 127.0.0.1
serves it; ``/recommend`` and ``/search`` answer from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from federation.catalog import Catalog
from fedmart.cli import main
from privacy.audit import verify_audit
from privacy.signing import load_public_key
from serving.config import ServeConfig
from serving.http import create_app, serve_in_thread

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _fedmart(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return exc.value.code


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_federation) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("e2e")
    run_dir, key = base / "run", base / "keys" / "coordinator.key"
    cmd = [
        sys.executable, "-m", "fedmart", "simulate", *small_federation, "federation.num_rounds=2",
        f"registry.signing_key={key}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    # cwd=base: whatever the run writes by relative path stays out of the working tree.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pub = key.with_name(key.name + ".pub")
    if not pub.is_file():  # the run used its default key location under cwd
        pub = base / "keys" / "coordinator.key.pub"
    return {"run": run_dir, "registry": run_dir / "registry", "pub": pub, "catalog": run_dir / "catalog.parquet"}


def test_simulate_promote_serve_recommend_and_search(run, capsys):
    registry, pub = run["registry"], run["pub"]
    versions = sorted(p.name for p in registry.glob("v*") if p.is_dir())
    assert len(versions) == 2, "one signed version per round"
    assert _fedmart("registry", "verify", "--root", str(registry), "--public-key", str(pub)) == 0

    key = pub.with_name(pub.name.removesuffix(".pub"))  # the key `fedmart simulate` created
    promote = ("registry", "promote", versions[-1], "--root", str(registry), "--public-key", str(pub))
    assert _fedmart(*promote, "--signing-key", str(key)) == 0
    audit = run["run"] / "audit.jsonl"
    assert verify_audit(audit, public_key=load_public_key(pub)).ok, "the run's entries and the promotion: all signed"
    assert json.loads(audit.read_text().splitlines()[-1])["event"] == "promotion"

    catalog = Catalog.load(run["catalog"])
    config = ServeConfig(registry=registry, public_key=pub, catalog=run["catalog"], text_cache=run["run"] / "t.npy")
    app = create_app(config)
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        deadline = time.time() + 300
        while http.get("/model").json()["search"] != "ready" and time.time() < deadline:
            time.sleep(0.2)
        model = http.get("/model").json()
        history = [str(i) for i in catalog.item_id[:5]]
        rec = http.post("/recommend", json={"history": history, "k": 10}).json()
        word = str(catalog.title[0]).split()[1]  # "<Adjective> <Noun> <number>"
        found = http.post("/search", json={"query": word, "k": 5}).json()

    assert model["version"] == versions[-1] and model["round"] == 2 and model["search"] == "ready"
    assert rec["model_version"] == versions[-1] and len(rec["items"]) == 10 and rec["fallback"] is None
    assert not set(history) & {it["item_id"] for it in rec["items"]}
    assert any(word in it["title"] for it in found["items"][:5]), (word, found["items"])
