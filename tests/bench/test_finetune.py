"""bench/finetune.py's own logic on tiny data: the user split and the rounds-to-target summary.

The bench's runs themselves (train-central, three simulations) take minutes; its smoke command
is in its docstring.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clients.datasets import load_dataset
from conf.settings import DataSettings
from federation.catalog import Catalog

_PATH = Path(__file__).resolve().parents[2] / "bench" / "finetune.py"
_spec = importlib.util.spec_from_file_location("bench_finetune", _PATH)
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)


def _grouplens(d: Path, users: int = 40, items: int = 6) -> int:
    """A GroupLens-layout ML-100K of ``users`` users with ``items`` events each; returns the row count."""
    d.mkdir()
    rows = [
        f"{u}\t{10 + (u + k) % items}\t4\t{881250000 + 100 * u + k}" for u in range(1, users + 1) for k in range(items)
    ]
    (d / "u.data").write_text("\n".join(rows) + "\n")
    flags = "|".join(["0"] * 8 + ["1"] + ["0"] * 10)  # Drama
    movies = [f"{10 + i}|Movie {i} (1995)|01-Jan-1995||http://x|{flags}\n" for i in range(items)]
    (d / "u.item").write_text("".join(movies))
    (d / "u.user").write_text("".join(f"{u}|30|M|other|00000\n" for u in range(1, users + 1)))
    return len(rows)


def test_halves_cover_every_row_split_users_whole_and_load_as_files_sources(tmp_path):
    total = _grouplens(tmp_path / "ml")

    info = finetune.split_halves(tmp_path / "ml", tmp_path / "out", seed=0)

    a, b = (pq.read_table(info[h]["path"]) for h in "ab")
    assert a.num_rows + b.num_rows == total
    users_a, users_b = set(a["user_id"].to_pylist()), set(b["user_id"].to_pylist())
    assert users_a and users_b and not users_a & users_b  # a user's whole history is in one half
    assert all(finetune.user_half(u, 0) == 1 for u in users_b)
    for h in "ab":  # what `data=files` reads: every row valid against the one shared catalog
        loaded = load_dataset(DataSettings(source="files", path=info[h]["path"], catalog=info["catalog"]))
        assert len(loaded.interactions) == info[h]["events"]
        assert loaded.catalog.version == Catalog.load(info["catalog"]).version == info["catalog_version"]


def test_the_split_depends_on_the_seed_and_nothing_else():
    ids = [str(u) for u in range(200)]
    assert [finetune.user_half(u, 0) for u in ids] == [finetune.user_half(u, 0) for u in ids]
    assert [finetune.user_half(u, 0) for u in ids] != [finetune.user_half(u, 1) for u in ids]


def _curve(test: list[float]) -> list[dict]:
    return [{"round": r, "valid_ndcg@10": v, "test_ndcg@10": v, "test_hr@10": 0.0} for r, v in enumerate(test)]


def test_rounds_to_reach_the_scratch_runs_final_quality():
    arms = {"scratch/sasrec": _curve([0.0, 0.02, 0.04, 0.05]), "finetune/sasrec": _curve([0.03, 0.046, 0.05, 0.06])}

    s = finetune.summarise(arms, "scratch/sasrec")

    assert s["target_test_ndcg@10"] == 0.05
    assert (s["arms"]["scratch/sasrec"]["rounds_to_100pct"], s["arms"]["scratch/sasrec"]["rounds_to_90pct"]) == (3, 3)
    assert (s["arms"]["finetune/sasrec"]["rounds_to_100pct"], s["arms"]["finetune/sasrec"]["rounds_to_90pct"]) == (2, 1)
    assert s["arms"]["finetune/sasrec"]["start_test_ndcg@10"] == 0.03
    assert finetune.first_round(_curve([0.01, 0.02]), 0.05) is None


@pytest.mark.parametrize("models", ["sasrec_text", "bert"])
def test_the_id_only_baseline_is_required(models, monkeypatch):
    monkeypatch.setattr("sys.argv", ["finetune.py", "--models", models])
    with pytest.raises(SystemExit, match="--models"):
        finetune.main()
