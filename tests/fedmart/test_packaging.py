"""The wheel, outside editable mode: built from a copy of the source tree, installed into a
fresh venv, and run from there (``fedmart --help``, a one-round ``fedmart simulate``).

The venv sees the system's site-packages (torch & co. are not installed twice), so the test
checks that every fedmart package it imports comes from the venv, not from the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
# What is not source: at the top, VCS, run outputs, local data and keys, earlier builds; anywhere, caches.
NOT_SOURCE_TOP = {".git", "outputs", "multirun", "data", "keys", "build", "dist", ".venv", ".whl", ".gl"}
NOT_SOURCE = ("*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis")
PACKAGES = ("fedmart", "federation", "clients", "privacy", "privacy.secagg", "conf")


def _not_source(directory: str, names: list[str]) -> set[str]:
    top = NOT_SOURCE_TOP if Path(directory) == ROOT else set()
    return (set(names) & top) | shutil.ignore_patterns(*NOT_SOURCE)(directory, names)


def _setuptools_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


def _run(argv: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # A copy: an in-tree build would leave build/ and fedmart.egg-info/ in the checkout.
    src = shutil.copytree(ROOT, base / "src", ignore=_not_source)
    # Without build isolation when a recent setuptools is installed here (an isolated build fetches one).
    isolation = [] if _setuptools_major() < 69 else ["--no-build-isolation"]
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", base / "dist", src]
    _run(build, env=env, cwd=base, timeout=600)
    (wheel,) = (base / "dist").glob("fedmart-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", base / "venv"], env=env, timeout=300)
    python = base / "venv" / "bin" / "python"
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel]
    _run(install, env=env, cwd=base, timeout=600)
    work = base / "work"
    work.mkdir()
    return SimpleNamespace(root=base / "venv", python=python, bin=base / "venv" / "bin", wheel=wheel, env=env, cwd=work)


def test_the_wheel_ships_every_package_and_every_config(venv):
    names = set(zipfile.ZipFile(venv.wheel).namelist())
    for path in ("privacy/secagg/__init__.py", "privacy/secagg/mod.py", "fedmart/cli.py", "federation/app.py"):
        assert path in names, path
    for path in ("conf/config.yaml", "conf/coordinate.yaml", "conf/data/synthetic.yaml", "conf/experiment/ml100k.yaml"):
        assert path in names, path
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_the_installed_code_is_the_wheels(venv):
    probe = (
        "import importlib, json; from fedmart.staging import app_packages; "
        f"print(json.dumps({{'files': {{m: importlib.import_module(m).__file__ for m in {PACKAGES!r}}}, "
        "'staged': app_packages()}))"
    )
    out = json.loads(_run([venv.python, "-c", probe], env=venv.env, cwd=venv.cwd, timeout=300).stdout)
    for module, path in out["files"].items():
        assert Path(path).is_relative_to(venv.root), f"{module} imported from {path}, not from the venv"
    # the Flower app `fedmart coordinate` stages holds what the wheel installed (its top_level.txt)
    assert {"fedmart", "federation", "clients", "privacy", "conf"} <= set(out["staged"])


def test_fedmart_help_and_a_one_round_simulation_run_from_the_venv(venv, small_federation):
    help_ = _run([venv.bin / "fedmart", "--help"], env=venv.env, cwd=venv.cwd, timeout=300)
    for command in ("simulate", "coordinate", "node", "certs", "registry", "serve"):
        assert command in help_.stdout, command

    run = venv.cwd / "run"
    _run(
        [venv.bin / "fedmart", "simulate", *small_federation, "federation.num_rounds=1", f"hydra.run.dir={run}"],
        env=venv.env,
        cwd=venv.cwd,
        timeout=900,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["aggregated"]
    assert (run / "report.md").is_file() and len(list((run / "registry").glob("v0001-*"))) == 1
